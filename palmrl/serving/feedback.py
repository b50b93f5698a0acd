"""Human feedback for `palmrl serve`'s web page: blind comparisons, the labels they produce, a
prompt queue and the statistics view.

A comparison is one prompt answered by two served checkpoints, shown as "A" and "B" with the names
hidden. Which checkpoint is A is decided by a shuffled deck per pair of checkpoints ([AB, BA],
redrawn when empty), so the sides are blind per prompt and yet balanced: every two comparisons of a
pair show each order once. The pairing stays on the server until the person judges it.

A judgement is appended to `feedback_dir` as one JSON line per file it feeds (`FeedbackLog`):

    judgements.jsonl  every judgement: prompt, both answers, which checkpoint was on which side, the
                      choice (A | B | tie | both_bad), the 1-5 ratings, sampling, annotator, time
    prefs.jsonl       {prompt, chosen, rejected, provenance} for A/B choices: `palmrl reward data=my_prefs`
                      and `palmrl dpo data=my_prefs` read it as is (data.path=<this file>)
    ratings.jsonl     {prompt, response, rating, provenance} per rated answer: `palmrl reward
                      data=my_ratings reward.objective=binned`

Each line is written with one `write` on an O_APPEND descriptor under an exclusive `flock`, then
fsync'd: concurrent clicks from several browsers (or several server processes sharing the folder)
never interleave or lose a line.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import re
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from palmrl.errors import UserError
from palmrl.serving.schemas import HTTPFailure

CHOICES = ("A", "B", "tie", "both_bad")
FILES = {"judgements": "judgements.jsonl", "prefs": "prefs.jsonl", "ratings": "ratings.jsonl"}
ANNOTATOR = re.compile(r"[A-Za-z0-9_-]{1,64}")


def append_line(path: Path, record: dict) -> None:
    """One JSON line appended atomically and made durable (see the module docstring)."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        written = os.write(fd, line)
        if written != len(line):  # a full disk mid-line: take the partial line back out
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock


def read_lines(path: Path) -> list[dict]:
    """The records of a JSONL file written by `append_line` (none when it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Model:
    """What a label records about a served checkpoint: enough to find the exact weights again."""

    name: str
    path: str
    sha256: str
    stage: str
    step: int

    @classmethod
    def of(cls, name: str, lineage: dict) -> Model:
        return cls(name, str(lineage["path"]), str(lineage.get("sha256") or ""), str(lineage.get("stage") or ""),
                   int(lineage.get("step") or 0))

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "stage": self.stage, "step": self.step}


@dataclass
class Pending:
    """A comparison shown and not yet judged: the answers and, secretly, whose they are."""

    id: str
    prompt: str
    answers: dict[str, str]  # side -> text
    models: dict[str, Model]  # side -> checkpoint
    sampling: dict
    annotator: str
    created: float = field(default_factory=time.time)


class SideDeck:
    """Which checkpoint goes on side A: a shuffled [AB, BA] deck per pair, redrawn when empty."""

    def __init__(self, rng: random.Random):
        self.rng, self.decks = rng, {}

    def sides(self, first: str, second: str) -> tuple[str, str]:
        key = tuple(sorted((first, second)))
        deck = self.decks.setdefault(key, [])
        if not deck:
            deck += [key, key[::-1]]
            self.rng.shuffle(deck)
        return deck.pop()


class Feedback:
    """The comparisons in flight and the log they are written to."""

    def __init__(self, folder: str | Path, model_names: list[str], *, num_bins: int = 5, seed: int = 0,
                 max_pending: int = 10_000):
        self.folder = check_feedback_dir(folder)
        self.paths = {key: self.folder / name for key, name in FILES.items()}
        self.model_names, self.num_bins, self.max_pending = list(model_names), int(num_bins), int(max_pending)
        self.rng = random.Random(seed)
        self.deck = SideDeck(self.rng)
        self.pending: OrderedDict[str, Pending] = OrderedDict()
        self.lock = threading.Lock()
        self.counts = {name: 0 for name in self.model_names}  # comparisons shown, per checkpoint

    # comparisons

    def pick_pair(self) -> tuple[str, str]:
        """The two checkpoints of the next comparison: the pair shown least so far (ties at random)."""
        if len(self.model_names) < 2:
            raise HTTPFailure(400, "comparing needs two checkpoints: start the server with ckpt_b=... "
                                   "(or compare=[...])", param="ckpt_b")
        with self.lock:
            pairs = list(combinations(self.model_names, 2))
            self.rng.shuffle(pairs)
            pair = min(pairs, key=lambda p: self.counts[p[0]] + self.counts[p[1]])
            for name in pair:
                self.counts[name] += 1
            return self.deck.sides(*pair)

    def new_seed(self) -> int:
        with self.lock:
            return self.rng.randrange(2**31)

    def open(self, prompt: str, answers: dict[str, str], models: dict[str, Model], sampling: dict,
             annotator: str) -> Pending:
        pending = Pending(uuid.uuid4().hex, prompt, answers, models, sampling, annotator)
        with self.lock:
            self.pending[pending.id] = pending
            while len(self.pending) > self.max_pending:  # the oldest unjudged comparisons are forgotten
                self.pending.popitem(last=False)
        return pending

    # judgements

    def judge(self, pair_id: str, choice: str | None, ratings: dict[str, int | None], annotator: str) -> dict:
        """Record one judgement; returns the judgements.jsonl record (which names both checkpoints)."""
        if choice is not None and choice not in CHOICES:
            raise HTTPFailure(400, f"choice must be one of {', '.join(CHOICES)}, got {choice!r}", param="choice")
        for side, rating in ratings.items():
            if side not in ("A", "B"):
                raise HTTPFailure(400, f"ratings: sides are A and B, got {side!r}", param="ratings")
            if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int)
                                       or not 1 <= rating <= self.num_bins):
                raise HTTPFailure(400, f"ratings.{side} must be an integer in 1..{self.num_bins}, got {rating!r}",
                                  param=f"ratings.{side}")
        ratings = {side: r for side, r in ratings.items() if r is not None}
        if choice is None and not ratings:
            raise HTTPFailure(400, "a judgement needs a choice (A, B, tie, both_bad) or a rating", param="choice")
        with self.lock:
            pending = self.pending.pop(pair_id, None)
        if pending is None:
            raise HTTPFailure(409, f"comparison {pair_id!r} is unknown or already judged", param="id")
        record = {
            "id": pending.id, "time": _now(), "annotator": annotator, "prompt": pending.prompt,
            "answers": pending.answers, "models": {side: m.to_dict() for side, m in pending.models.items()},
            "choice": choice, "ratings": ratings, "sampling": pending.sampling,
            "seconds_to_judge": round(time.time() - pending.created, 3),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        append_line(self.paths["judgements"], record)
        if choice in ("A", "B"):
            loser = "B" if choice == "A" else "A"
            append_line(self.paths["prefs"], {
                "prompt": pending.prompt, "chosen": pending.answers[choice], "rejected": pending.answers[loser],
                "provenance": self._provenance(record, chosen=pending.models[choice], rejected=pending.models[loser]),
            })
        for side, rating in ratings.items():
            append_line(self.paths["ratings"], {
                "prompt": pending.prompt, "response": pending.answers[side], "rating": rating,
                "provenance": self._provenance(record, model=pending.models[side]),
            })
        return record

    @staticmethod
    def _provenance(record: dict, **models: Model) -> dict:
        return {"id": record["id"], "time": record["time"], "annotator": record["annotator"],
                "sampling": record["sampling"], **{key: m.to_dict() for key, m in models.items()}}

    def stats(self) -> dict:
        return judgement_stats(read_lines(self.paths["judgements"]))


def check_feedback_dir(folder: str | Path) -> Path:
    """The label folder can be written, found at startup rather than at the first click (the folder
    itself is made then)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"feedback_dir: {folder} exists and is not a folder")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise UserError(f"feedback_dir: {existing} is not writable, so labels could not be saved under {folder}")
    for name in FILES.values():
        if (folder / name).exists() and not (folder / name).is_file():
            raise UserError(f"feedback_dir: {folder / name} exists and is not a file")
    return folder


def check_annotator(value: object) -> str:
    if not isinstance(value, str) or not ANNOTATOR.fullmatch(value):
        raise HTTPFailure(400, "annotator must be 1-64 letters, digits, '-' or '_'", param="annotator")
    return value


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# statistics

def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) with no data."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _winner(record: dict) -> str | None:
    """The checkpoint name a judgement prefers, "tie" / "both_bad", or None when only rated."""
    choice = record.get("choice")
    return record["models"][choice]["name"] if choice in ("A", "B") else choice


def judgement_stats(records: list[dict]) -> dict:
    """Counts, each checkpoint's win rate over its decisive comparisons (Wilson 95% interval), and
    how often two annotators who judged the same prompt between the same two checkpoints agreed."""
    per_model = defaultdict(lambda: {"comparisons": 0, "wins": 0, "losses": 0, "ties": 0, "both_bad": 0})
    choices = defaultdict(int)
    for r in records:
        choices[r.get("choice") or "rated_only"] += 1
        names = [r["models"][side]["name"] for side in ("A", "B")]
        winner = _winner(r)
        for name in names:
            row = per_model[name]
            row["comparisons"] += 1
            if winner == "tie":
                row["ties"] += 1
            elif winner == "both_bad":
                row["both_bad"] += 1
            elif winner is not None:
                row["wins" if winner == name else "losses"] += 1
    models = []
    for name, row in sorted(per_model.items()):
        decisive = row["wins"] + row["losses"]
        low, high = wilson(row["wins"], decisive)
        models.append({"name": name, **row, "win_rate": row["wins"] / decisive if decisive else None,
                       "ci_low": low, "ci_high": high})
    # agreement: judgements of the same prompt and pair of checkpoints by different annotators
    groups = defaultdict(list)
    for r in records:
        if r.get("choice"):
            key = (r["prompt"], tuple(sorted(r["models"][s]["name"] for s in ("A", "B"))))
            groups[key].append((r["annotator"], _winner(r)))
    pairs = agreed = 0
    for judged in groups.values():
        for (who_a, pick_a), (who_b, pick_b) in combinations(judged, 2):
            if who_a != who_b:
                pairs += 1
                agreed += pick_a == pick_b
    annotators = sorted({r["annotator"] for r in records})
    return {"judgements": len(records), "choices": dict(choices), "annotators": len(annotators), "models": models,
            "agreement": {"pairs": pairs, "agreed": agreed, "rate": agreed / pairs if pairs else None}}


# the labelling queue

def load_prompts(path: str | Path) -> list[str]:
    """`prompts=`: a .txt file (one prompt per line) or .jsonl with a "prompt" string per line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts: {path} is not a file")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise UserError(f"prompts: {path} is not UTF-8 text (byte {err.start})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise UserError(f"{path}:{number}: expected an object with a \"prompt\" string")
            line = record["prompt"]
        prompts.append(line)
    if not prompts:
        raise UserError(f"prompts: {path} holds no prompts")
    return prompts


class PromptQueue:
    """The prompts of `prompts=` served one after another to each annotator, skipping the ones that
    annotator already judged (read back from judgements.jsonl, so a restarted server resumes)."""

    def __init__(self, prompts: list[str], judgements: Path):
        self.prompts, self.judgements = prompts, judgements
        self.cursor: dict[str, int] = {}
        self.lock = threading.Lock()

    def next(self, annotator: str) -> dict:
        with self.lock:
            if annotator not in self.cursor:
                done = {r["prompt"] for r in read_lines(self.judgements) if r.get("annotator") == annotator}
                self.cursor[annotator] = next((i for i, p in enumerate(self.prompts) if p not in done),
                                              len(self.prompts))
            index = self.cursor[annotator]
            if index >= len(self.prompts):
                return {"done": True, "total": len(self.prompts)}
            self.cursor[annotator] = index + 1
            return {"done": False, "index": index, "total": len(self.prompts), "prompt": self.prompts[index]}
