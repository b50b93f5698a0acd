"""Quality filters and deduplication for instruction records, as Alpaca and self-instruct did them.

Self-instruct (Wang et al. 2022, https://arxiv.org/abs/2212.10560) and Stanford Alpaca keep a
generated instruction only if it is not too short or too long, asks for nothing a text model
cannot do (images, files, plots: a blocklist of phrasings), and is not a near-copy of one already
in the pool (ROUGE-L >= 0.7). We apply the same checks, plus the ones a generated *response*
needs (empty, cut off by the token limit, echoing the instruction), to every record, and count
what each check removed. One `RecordFilter` serves both `palmrl dedup` (a file at once) and
`palmrl selfinstruct` (instruction first, response later, the pool growing as records are kept).

Near-duplicates, `dedup.method`:
- `minhash` (default): word n-gram sets, candidates found by MinHash LSH (`datasketch`), each
  candidate then verified by its exact Jaccard similarity, so `threshold` means "Jaccard >= t"
  and the only approximation is a rare missed candidate (recall, never precision);
- `rouge`: ROUGE-L F1 against every pooled record (`rouge-score`'s LCS, Alpaca's exact rule),
  pruned by an upper bound (the bag-of-words overlap bounds the LCS) so few pairs pay the LCS;
- `exact`: normalised-text equality only (exact duplicates are always removed).

Record shapes (any of them, per line): alpaca `{instruction, input?, output}`, `{prompt,
response|completion}`, chat `{messages: [...]}` (prompt = the user turns, output = the last
assistant turn).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from palmrl.errors import UserError

# every way a record can be removed, in the order the checks run (the first that fires counts)
REASONS = ("unparsable", "empty", "truncated", "length", "blocklist", "echo", "exact_duplicate", "near_duplicate")

# Alpaca's blocklist (generate_instruction.py): what a text-only model cannot do or see
ALPACA_BLOCKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                    "map", "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
# refusals and model self-talk that make useless training targets
OUTPUT_BLOCKLIST = ("as an ai language model", "as an ai assistant", "i am an ai", "i'm an ai")


@dataclass(frozen=True)
class FilterConfig:
    """The quality checks (the `filters:` config block); every field is a config key."""

    min_instruction_words: int = 3  # Alpaca drops instructions of 3 words or fewer; a tiny model's noise is short
    max_instruction_words: int = 150  # Alpaca's upper bound: longer ones are rambling, not tasks
    max_input_chars: int = 2000  # inputs beyond this crowd the prompt out of a small context
    min_output_chars: int = 1  # an answer of nothing teaches nothing
    max_output_chars: int = 4000  # beyond ~1k tokens an SFT example no longer fits a small model's context
    blocklist: tuple[str, ...] = ALPACA_BLOCKLIST  # instruction phrasings a text model cannot serve
    output_blocklist: tuple[str, ...] = OUTPUT_BLOCKLIST  # response phrasings that make bad targets
    drop_truncated: bool = True  # a response cut by max_tokens is unfinished (Alpaca dropped finish_reason=length)

    @classmethod
    def from_cfg(cls, cfg: Mapping | None) -> FilterConfig:
        return dataclass_from_cfg(cls, cfg, "filters")


@dataclass(frozen=True)
class DedupConfig:
    """Duplicate detection (the `dedup:` config block); every field is a config key."""

    method: str = "minhash"  # minhash | rouge | exact (exact duplicates are removed by all three)
    threshold: float = 0.7  # near-duplicate at or above this similarity: Alpaca's ROUGE-L cut-off
    key: str = "prompt"  # what is compared: prompt (instruction + input) | instruction (Alpaca) | all (+ output)
    ngram: int = 1  # minhash: words per shingle; 1 keeps a one-word edit of a 10-word instruction above 0.7
    num_perm: int = 128  # minhash permutations: LSH recall ~99% at the threshold; verification is exact anyway

    def __post_init__(self) -> None:
        if self.method not in ("minhash", "rouge", "exact"):
            raise UserError(f"dedup.method must be minhash, rouge or exact, got {self.method!r}")
        if not 0 < float(self.threshold) <= 1:
            raise UserError(f"dedup.threshold must be in (0, 1], got {self.threshold}")
        if self.key not in ("prompt", "instruction", "all"):
            raise UserError(f"dedup.key must be prompt, instruction or all, got {self.key!r}")
        if int(self.ngram) < 1:
            raise UserError(f"dedup.ngram must be >= 1, got {self.ngram}")
        if int(self.num_perm) < 16:
            raise UserError(f"dedup.num_perm must be >= 16, got {self.num_perm}")

    @classmethod
    def from_cfg(cls, cfg: Mapping | None) -> DedupConfig:
        return dataclass_from_cfg(cls, cfg, "dedup")


def dataclass_from_cfg(cls, cfg: Mapping | None, prefix: str):
    """A config block -> the dataclass whose fields are its keys; an unknown key names itself."""
    known = {f.name for f in dataclass_fields(cls)}
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{prefix}.{unknown[0]}: unknown key; expected one of {', '.join(sorted(known))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ---------------------------------------------------------------------------------------------
# record shapes and text normalisation


class Fields(NamedTuple):
    """The three texts every filter looks at, whatever the record's shape."""

    instruction: str  # alpaca instruction, or the prompt / the user turns
    input: str  # alpaca input ("" when absent)
    output: str  # the response


def record_fields(record: Any) -> Fields | None:
    """The (instruction, input, output) of an alpaca, prompt/response or chat record; None if none fits."""
    if not isinstance(record, Mapping):
        return None
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) and isinstance(m.get("content"), str)
                                                     for m in messages):
            return None
        users = [m["content"] for m in messages if m.get("role") == "user"]
        replies = [m["content"] for m in messages if m.get("role") == "assistant"]
        if not users or not replies:
            return None
        return Fields("\n".join(users), "", replies[-1])
    if "instruction" in record:
        instruction, input, output = record.get("instruction"), record.get("input") or "", record.get("output")
    elif "prompt" in record:
        instruction, input = record.get("prompt"), ""
        output = record.get("response", record.get("completion"))
    else:
        return None
    if not all(isinstance(text, str) for text in (instruction, input, output)):
        return None
    return Fields(instruction, input, output)


_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


@functools.lru_cache(maxsize=1 << 14)  # the checks normalise the same few texts several times
def normalize(text: str) -> str:
    """Case-, accent-width- and punctuation-insensitive form: NFKC, casefold, words joined by one space."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def dedup_text(f: Fields, key: str) -> str:
    if key == "instruction":
        return f.instruction
    if key == "prompt":
        return f"{f.instruction}\n{f.input}"
    return f"{f.instruction}\n{f.input}\n{f.output}"


def _phrase_pattern(phrases: Iterable[str]) -> re.Pattern | None:
    """One regex matching any phrase as whole words of normalised text."""
    words = [normalize(p) for p in phrases if normalize(p)]
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b")


# ---------------------------------------------------------------------------------------------
# near-duplicate indexes: find(text) -> id of a pooled near-duplicate or None; add(text, id)


class MinHashIndex:
    """Word n-gram sets; MinHash LSH proposes candidates, exact Jaccard >= threshold decides."""

    def __init__(self, threshold: float, *, ngram: int = 1, num_perm: int = 128):
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.ngram, self.num_perm = float(threshold), int(ngram), int(num_perm)
        self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self._sets: dict[int, frozenset[bytes]] = {}
        self._template = MinHash(num_perm=self.num_perm, seed=1)  # permutations drawn once, shared

    def prepare(self, text: str):
        """(shingle set, its MinHash): computed once per text for both find and add."""
        words = normalize(text).split()
        n = min(self.ngram, max(1, len(words)))
        shingles = frozenset(" ".join(words[i:i + n]).encode() for i in range(max(1, len(words) - n + 1)))
        m = self._template.copy()  # empty, sharing the template's permutations
        m.update_batch(list(shingles))
        return shingles, m

    def find(self, prepared) -> int | None:
        shingles, m = prepared
        best, best_sim = None, 0.0
        for key in self._lsh.query(m) if self._sets else ():
            other = self._sets[key]
            sim = len(shingles & other) / len(shingles | other)
            if sim >= self.threshold and sim > best_sim:
                best, best_sim = key, sim
        return best

    def add(self, prepared, key: int) -> None:
        shingles, m = prepared
        self._sets[key] = shingles
        self._lsh.insert(key, m, check_duplication=False)


class RougeIndex:
    """ROUGE-L F1 against every pooled text (Alpaca's rule), skipping pairs that cannot reach it.

    LCS(a, b) <= sum over words of min(count in a, count in b), so a pair whose bag-of-words
    overlap gives F1 below the threshold is skipped without computing the LCS.
    """

    def __init__(self, threshold: float):
        from rouge_score import rouge_scorer

        self.threshold = float(threshold)
        self._tokenize = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer.tokenize
        self._lcs = rouge_scorer._score_lcs  # what Alpaca calls on pre-tokenised lists
        self._tokens: dict[int, list[str]] = {}
        self._postings: dict[str, list[tuple[int, int]]] = defaultdict(list)  # word -> [(key, count)]

    def prepare(self, text: str) -> list[str]:
        return self._tokenize(text)

    def find(self, tokens: list[str]) -> int | None:
        if not tokens:
            return None
        bound: Counter[int] = Counter()
        for word, count in Counter(tokens).items():
            for key, other_count in self._postings.get(word, ()):
                bound[key] += min(count, other_count)
        best, best_f = None, 0.0
        for key, overlap in bound.items():
            other = self._tokens[key]
            if 2 * overlap / (len(tokens) + len(other)) < self.threshold:
                continue
            f1 = self._lcs(other, tokens).fmeasure
            if f1 >= self.threshold and f1 > best_f:
                best, best_f = key, f1
        return best

    def add(self, tokens: list[str], key: int) -> None:
        self._tokens[key] = tokens
        for word, count in Counter(tokens).items():
            self._postings[word].append((key, count))


class DedupPool:
    """Every text kept so far: exact matches by normalised-text hash, near ones by the chosen index."""

    def __init__(self, config: DedupConfig):
        self.config = config
        self._exact: dict[bytes, int] = {}
        self._last: tuple | None = None
        if config.method == "minhash":
            self._near = MinHashIndex(config.threshold, ngram=config.ngram, num_perm=config.num_perm)
        elif config.method == "rouge":
            self._near = RougeIndex(config.threshold)
        else:
            self._near = None

    def __len__(self) -> int:
        return len(self._exact)

    def _prepare(self, text: str):
        """Digest and index form of a text, remembered for the `add` that usually follows `find`."""
        if self._last is None or self._last[0] != text:
            digest = hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()
            self._last = (text, digest, self._near.prepare(text) if self._near is not None else None)
        return self._last[1], self._last[2]

    def find(self, text: str) -> tuple[str, int] | None:
        """('exact_duplicate' | 'near_duplicate', id of the pooled text it repeats), or None."""
        digest, prepared = self._prepare(text)
        key = self._exact.get(digest)
        if key is not None:
            return "exact_duplicate", key
        if self._near is not None:
            key = self._near.find(prepared)
            if key is not None:
                return "near_duplicate", key
        return None

    def add(self, text: str, key: int) -> None:
        digest, prepared = self._prepare(text)
        self._exact.setdefault(digest, key)
        if self._near is not None:
            self._near.add(prepared, key)


# ---------------------------------------------------------------------------------------------
# the filter chain


class Verdict(NamedTuple):
    """What happened to one record."""

    reason: str | None  # None: kept; otherwise one of REASONS
    duplicate_of: int | None  # for duplicates: the pool id of the record it repeats


@dataclass
class RecordFilter:
    """Quality checks then dedup against a growing pool; counts what each check removed."""

    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def __post_init__(self) -> None:
        self.pool = DedupPool(self.dedup)
        self.removed: Counter[str] = Counter()
        self.kept = 0
        self._blocked = _phrase_pattern(self.filters.blocklist)
        self._blocked_output = _phrase_pattern(self.filters.output_blocklist)

    # checks on parts of a record (selfinstruct runs the instruction checks before asking for a response)

    def instruction_problem(self, instruction: str, input: str = "") -> str | None:
        words = len(instruction.split())
        if not instruction.strip():
            return "empty"
        if not self.filters.min_instruction_words <= words <= self.filters.max_instruction_words \
                or len(input) > self.filters.max_input_chars:
            return "length"
        if self._blocked is not None and self._blocked.search(normalize(instruction)):
            return "blocklist"
        return None

    def response_problem(self, f: Fields, *, truncated: bool = False) -> str | None:
        if not f.output.strip():
            return "empty"
        if truncated and self.filters.drop_truncated:
            return "truncated"
        if not self.filters.min_output_chars <= len(f.output.strip()) <= self.filters.max_output_chars:
            return "length"
        if self._blocked_output is not None and self._blocked_output.search(normalize(f.output)):
            return "blocklist"
        out = normalize(f.output)
        if not out:  # punctuation or symbols only
            return "empty"
        if out in (normalize(f.instruction), normalize(f.input), normalize(f"{f.instruction} {f.input}")):
            return "echo"
        return None

    def duplicate(self, f: Fields) -> tuple[str, int] | None:
        return self.pool.find(dedup_text(f, self.dedup.key))

    def add(self, f: Fields, key: int) -> None:
        self.pool.add(dedup_text(f, self.dedup.key), key)

    # a whole record

    def offer(self, record: Any, key: int, *, truncated: bool = False) -> Verdict:
        """Run every check on one record; a kept record joins the pool under `key`."""
        f = record_fields(record)
        if f is None:
            return self._reject("unparsable")
        reason = self.instruction_problem(f.instruction, f.input) or self.response_problem(f, truncated=truncated)
        if reason is not None:
            return self._reject(reason)
        dup = self.duplicate(f)
        if dup is not None:
            return self._reject(dup[0], dup[1])
        self.add(f, key)
        self.kept += 1
        return Verdict(None, None)

    def reject(self, reason: str) -> None:
        """Count a record removed before it reached `offer` (e.g. an unparsable generation)."""
        self._reject(reason)

    def _reject(self, reason: str, duplicate_of: int | None = None) -> Verdict:
        assert reason in REASONS, reason
        self.removed[reason] += 1
        return Verdict(reason, duplicate_of)

    def counts(self) -> dict[str, int]:
        """Removed per reason, every reason listed (0 included), in check order."""
        return {reason: self.removed.get(reason, 0) for reason in REASONS}


def print_report(title: str, total: int, kept: int, removed: dict[str, int]) -> None:
    """A table of how many records each filter removed, and how many were kept."""
    from rich.table import Table

    from palmrl.tracking import console

    table = Table(title=title, title_justify="left")
    table.add_column("filter", style="bold cyan")
    table.add_column("removed", justify="right")
    table.add_column("share", justify="right")
    for reason in REASONS:
        table.add_row(reason, str(removed.get(reason, 0)), f"{removed.get(reason, 0) / max(total, 1):.1%}")
    table.add_row("kept", str(kept), f"{kept / max(total, 1):.1%}", style="bold")
    console.print(table)
