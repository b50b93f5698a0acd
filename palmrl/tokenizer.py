"""Tokenizers: a SentencePiece model trained on the corpus, and a byte-level fallback.

PaLM uses a SentencePiece vocabulary that is lossless and reversible: whitespace is kept, and
characters outside the vocabulary are split into UTF-8 bytes instead of becoming <unk> (PaLM
paper, section 5, "Vocabulary"). We train the same kind of model (BPE or unigram, byte fallback,
identity normalisation, digits split) in memory, so `decode(encode(text)) == text` for any text.

Both kinds share the special tokens and their ids, fixed by position in `SPECIAL_TOKENS`:

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)   4 <|system|>   5 <|user|>   6 <|assistant|>

Special tokens are control symbols: `encode` never produces them, so a user who types
"<|assistant|>" gets the ordinary pieces of that text, and cannot forge a chat-template turn. Code
that builds templates inserts them by id (`token_id("<|user|>")`).

Two more choices make the SentencePiece kind exactly reversible and additive
(`decode(encode(a) + encode(b)) == a + b`, which the chat template and token-by-token decoding
rely on): no dummy prefix space is added, and the character U+2581 ("▁", SentencePiece's own
space marker) is encoded through its UTF-8 byte pieces, since SentencePiece would decode it as a
space. Newline is a user-defined piece of its own: SentencePiece trains on lines and never sees it.

The byte kind needs no training: ids 0..6 are the specials and id 7 + b is byte b, so its
vocab_size is 263. It is not padded: palmrl checks that model.vocab_size equals the tokenizer's
(set model.vocab_size=263 to use it).

A checkpoint made from a Hugging Face model carries that model's fast tokenizer instead
(`HFTokenizer`, in `hf_tokenizer/`): its own chat template when it has one (rendered turn by turn
so the SFT loss covers exactly the assistant turns), otherwise palmrl's template as plain-text
headers (`### User:` ... `### Assistant:`), each reply closed by eos. `Tokenizer.load` picks the kind
from what the folder holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from palmrl.errors import UserError
from palmrl.io import transformers

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SENTENCEPIECE_FILE = "tokenizer.model"
BYTE_FILE = "tokenizer.json"

_BYTE_OFFSET = len(SPECIAL_TOKENS)  # byte b has id 7 + b in the byte kind
_BYTE_VOCAB_SIZE = _BYTE_OFFSET + 256
_SPACE_MARK = "\u2581"  # SentencePiece's whitespace symbol; decoded as " " if it came in as a piece
_NEWLINE_PIECE = "\n"  # user-defined piece: one token per newline, never a byte fallback
_MIN_SENTENCEPIECE_VOCAB = _BYTE_VOCAB_SIZE + 1  # specials + 256 byte pieces + the newline piece


class Tokenizer:
    """Text <-> token ids for one trained or loaded model; build with `train_tokenizer` or `load`."""

    def __init__(self, kind: str, model_bytes: bytes, *, origin: str = "tokenizer") -> None:
        """Wrap serialized model bytes (a SentencePiece proto or byte-tokenizer JSON); `origin`
        names where they came from in error messages."""
        if kind not in ("sentencepiece", "byte"):
            raise UserError(f"tokenizer.kind={kind!r} is unknown; use 'sentencepiece' or 'byte'")
        self.kind = kind
        self._model_bytes = bytes(model_bytes)
        self._sp: spm.SentencePieceProcessor | None = None
        if kind == "sentencepiece":
            self._sp = _load_sentencepiece(self._model_bytes, origin)
            self.vocab_size = self._sp.get_piece_size()
            self._space_mark_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode()]
        else:
            _check_byte_json(self._model_bytes, origin)
            self.vocab_size = _BYTE_VOCAB_SIZE
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
        self.special_ids = frozenset(range(len(SPECIAL_TOKENS)))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, hash={self.content_hash()[:12]})"

    def token_id(self, piece: str) -> int:
        """Id of a special token by its text, e.g. "<|user|>" -> 5."""
        if piece not in SPECIAL_TOKENS:
            raise ValueError(f"{piece!r} is not a special token; they are {', '.join(SPECIAL_TOKENS)}")
        return SPECIAL_TOKENS.index(piece)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos; special-token text is encoded as ordinary text."""
        if self._sp is not None and _SPACE_MARK not in text:
            # one text straight to SentencePiece: its list call starts a thread pool each time, ~10x the
            # encoding itself for a short text (40,000 task prompts: 5 s against 0.5 s)
            return self._sp.encode(text)
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of many texts at once (SentencePiece encodes a list on all cores)."""
        if self._sp is None:
            return [[b + _BYTE_OFFSET for b in text.encode("utf-8")] for text in texts]

        # plain texts go to SentencePiece in one call; texts holding "▁" are encoded around it
        plain = [i for i, text in enumerate(texts) if _SPACE_MARK not in text]
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain])):
            out[i] = ids
        for i, text in enumerate(texts):
            if _SPACE_MARK in text:
                out[i] = self._encode_with_space_marks(text)
        return out

    def _encode_with_space_marks(self, text: str) -> list[int]:
        """Encode text holding U+2581 as its three byte pieces, so decode gives it back."""
        parts = self._sp.encode(text.split(_SPACE_MARK))
        ids = list(parts[0])
        for part in parts[1:]:
            ids += self._space_mark_ids + part
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped, or written as their text if not skip_special."""
        pieces: list[str] = []
        run: list[int] = []  # ordinary ids waiting to be decoded together
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary (size {self.vocab_size})")
            if token in self.special_ids:
                pieces.append(self._decode_ordinary(run))
                run = []
                if not skip_special:
                    pieces.append(SPECIAL_TOKENS[token])
            else:
                run.append(token)
        pieces.append(self._decode_ordinary(run))
        return "".join(pieces)

    def _decode_ordinary(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._sp is None:
            return bytes(i - _BYTE_OFFSET for i in ids).decode("utf-8", errors="replace")
        return self._sp.decode(ids)

    def save(self, folder: Path) -> Path:
        """Write the model into `folder` (tokenizer.model or tokenizer.json) and return its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sentencepiece = self.kind == "sentencepiece"
        name, other = (SENTENCEPIECE_FILE, BYTE_FILE) if sentencepiece else (BYTE_FILE, SENTENCEPIECE_FILE)
        path = folder / name
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(self._model_bytes)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        (folder / other).unlink(missing_ok=True)  # one model per folder, so `load` is unambiguous
        return path

    @classmethod
    def load(cls, folder: Path) -> Tokenizer:
        """Load the tokenizer saved in `folder` (or the tokenizer.model / tokenizer.json given)."""
        folder = Path(folder)
        if (folder / TOKENIZER_DIR).is_dir():  # a checkpoint made from a Hugging Face model
            return HFTokenizer.load(folder / TOKENIZER_DIR)
        if folder.is_file():
            candidates = [folder]
        else:
            candidates = [folder / name for name in (SENTENCEPIECE_FILE, BYTE_FILE) if (folder / name).is_file()]
        if not candidates:
            raise UserError(f"no {SENTENCEPIECE_FILE} or {BYTE_FILE} in {folder}")
        if len(candidates) > 1:
            raise UserError(f"{folder} holds both {SENTENCEPIECE_FILE} and {BYTE_FILE}; keep one")
        path = candidates[0]
        kind = "byte" if path.suffix == ".json" else "sentencepiece"
        return cls(kind, path.read_bytes(), origin=str(path))

    def content_hash(self) -> str:
        """sha256 of the serialized model: equal hashes mean identical encodings."""
        return hashlib.sha256(self._model_bytes).hexdigest()


def train_tokenizer(
    texts: Iterable[str],
    *,
    kind: str = "sentencepiece",
    vocab_size: int = 8192,  # a multiple of 64 for the embedding matmul; PaLM's 256k is for 780B tokens
    model_type: str = "bpe",  # BPE trains ~5x faster than unigram here with the same round trip
    max_sentence_length: int = 16384,  # bytes; longer lines are cut into chunks, not skipped
    seed: int = 0,  # SentencePiece's sampling seed, so training is deterministic
) -> Tokenizer:
    """Train a tokenizer on `texts` (one document each). The byte kind ignores the texts."""
    if kind == "byte":
        if vocab_size < _BYTE_VOCAB_SIZE:
            raise UserError(f"tokenizer.vocab_size={vocab_size} is below the byte tokenizer's {_BYTE_VOCAB_SIZE}")
        return byte_tokenizer()
    if kind != "sentencepiece":
        raise UserError(f"tokenizer.kind={kind!r} is unknown; use 'sentencepiece' or 'byte'")
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"tokenizer.model_type={model_type!r} is unknown; use 'bpe' or 'unigram'")
    if vocab_size < _MIN_SENTENCEPIECE_VOCAB + 1:
        raise UserError(
            f"tokenizer.vocab_size={vocab_size} is too small: 7 specials, 256 byte pieces and newline "
            f"already take {_MIN_SENTENCEPIECE_VOCAB}"
        )

    sentences = _CountingIterator(_training_sentences(texts, max_sentence_length))
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            normalization_rule_name="identity",  # no NFKC: text comes back byte for byte
            remove_extra_whitespaces=False,  # keep runs of spaces, leading and trailing spaces
            add_dummy_prefix=False,  # no invented leading space, so encodings concatenate exactly
            byte_fallback=True,  # unseen characters become UTF-8 byte pieces, never <unk>
            split_digits=True,  # one piece per digit, as in PaLM, for arithmetic
            allow_whitespace_only_pieces=True,  # runs of spaces (indentation) may become one piece
            max_sentence_length=max_sentence_length,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece=SPECIAL_TOKENS[PAD_ID],
            unk_piece=SPECIAL_TOKENS[UNK_ID],
            bos_piece=SPECIAL_TOKENS[BOS_ID],
            eos_piece=SPECIAL_TOKENS[EOS_ID],
            control_symbols=list(SPECIAL_TOKENS[4:]),  # ids 4..6, never produced from text
            user_defined_symbols=[_NEWLINE_PIECE],  # id 7
            num_threads=os.cpu_count() or 1,
            minloglevel=2,  # SentencePiece logs every step to stderr otherwise
        )
    except RuntimeError as exc:
        raise _vocab_error(exc, vocab_size, sentences.count) from exc
    return Tokenizer("sentencepiece", model.getvalue())


def byte_tokenizer() -> Tokenizer:
    """The byte-level tokenizer: 7 specials + 256 bytes, no training."""
    return Tokenizer("byte", _byte_spec_bytes())


class _CountingIterator:
    """Iterator that counts what it yields (to tell an empty corpus from a bad vocab size)."""

    def __init__(self, items: Iterator[str]) -> None:
        self._items, self.count = items, 0

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> str:
        item = next(self._items)
        self.count += 1
        return item


def _training_sentences(texts: Iterable[str], max_sentence_length: int) -> Iterator[str]:
    """SentencePiece trains on lines: split documents at newlines, cut over-long lines into chunks."""
    chunk_chars = max(1, max_sentence_length // 4)  # a character is at most 4 UTF-8 bytes
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), chunk_chars):
                yield line[start : start + chunk_chars]


def _vocab_error(exc: RuntimeError, vocab_size: int, sentences: int) -> Exception:
    """Turn SentencePiece's vocabulary-size failures into one-line UserErrors."""
    message = str(exc)
    if sentences == 0:
        return UserError("the tokenizer's training corpus holds no text")
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        return UserError(
            f"tokenizer.vocab_size={vocab_size} is too small for this corpus: its characters, 256 byte "
            f"pieces and the specials need at least {too_small.group(1)}"
        )
    too_high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return UserError(
            f"tokenizer.vocab_size={vocab_size} is too large for this corpus: at most {too_high.group(1)} "
            f"pieces can be learned from it (lower tokenizer.vocab_size or add text)"
        )
    return exc


def _load_sentencepiece(model_bytes: bytes, origin: str) -> spm.SentencePieceProcessor:
    """Parse a SentencePiece proto and check it carries palmrl's special tokens and byte pieces."""
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError) as exc:
        raise UserError(f"{origin} is not a readable SentencePiece model ({str(exc).splitlines()[0][:80]})") from exc
    size = processor.get_piece_size()
    found = tuple(processor.id_to_piece(i) for i in range(min(size, len(SPECIAL_TOKENS))))
    if found != SPECIAL_TOKENS or not all(processor.is_control(i) for i in range(4, len(SPECIAL_TOKENS))):
        raise UserError(f"{origin} does not hold palmrl's special tokens at ids 0..6: {', '.join(SPECIAL_TOKENS)}")
    if processor.piece_to_id("<0xE2>") == processor.unk_id():
        raise UserError(f"{origin} was trained without byte_fallback; palmrl needs it to encode any text")
    return processor


def _check_byte_json(model_bytes: bytes, origin: str) -> None:
    """Check a byte tokenizer's JSON is the one this code writes."""
    try:
        spec = json.loads(model_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{origin} is not valid JSON ({exc})") from exc
    expected = json.loads(_byte_spec_bytes())
    if spec != expected:
        raise UserError(f"{origin} is not a palmrl byte tokenizer (expected {json.dumps(expected, sort_keys=True)})")


def _byte_spec_bytes() -> bytes:
    """The canonical JSON of the byte tokenizer (what `save` writes to tokenizer.json)."""
    spec = {"kind": "byte", "special_tokens": list(SPECIAL_TOKENS), "byte_offset": _BYTE_OFFSET,
            "vocab_size": _BYTE_VOCAB_SIZE}
    return json.dumps(spec, sort_keys=True, indent=1).encode()


TOKENIZER_DIR = "hf_tokenizer"   # inside a palmrl checkpoint folder
HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
# the same format as a Jinja chat template, written into exported folders of template-less models
HEADERS_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}### Assistant:\n{{ m['content'] }}{{ eos_token }}"
    "{% else %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}")


# ---------------------------------------------------------------------------------------------
# tokenizer


class HFTokenizer:
    """A transformers fast tokenizer behind palmrl's Tokenizer interface.

    Its chat template is a Jinja program: one rendering takes ~0.5 ms, and masking a reply takes
    three (before it, through it, the whole). Training renders every batch again each epoch, and the
    two halves of a preference pair share their prompt, so renderings are kept (`RENDERINGS`, as
    int32 arrays: ~200 bytes each) and looked up by the messages. On a 2-layer Llama the reward stage
    went from ~22k to ~28k tokens/s with the same numbers."""

    kind = "hf"
    RENDERINGS = 1 << 16  # the most kept; the oldest goes first

    def __init__(self, tokenizer, *, origin: str):
        self.tk = tokenizer
        self.origin = origin
        if tokenizer.eos_token_id is None:
            raise UserError(f"{origin}: the tokenizer has no eos token; palmrl needs one to end replies")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id
        self.bos_id = int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self._rendered: dict[tuple, array] = {}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.origin}, {self.vocab_size} ids, chat template: {self.has_template})"

    @classmethod
    def load(cls, folder: str | os.PathLike, *, trust_remote_code: bool = False,
             revision: str | None = None) -> HFTokenizer:
        tf = transformers()
        try:
            tk = tf.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, revision=revision)
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"{folder}: no usable tokenizer ({str(err).splitlines()[0][:160]})") from None
        if not getattr(tk, "is_fast", False):
            raise UserError(f"{folder}: palmrl needs a fast tokenizer (tokenizer.json)")
        return cls(tk, origin=str(folder))

    # ---- text <-> ids ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tk.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tk(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a reply or start a new turn: every special token (eos, pad, template markers)."""
        return frozenset(int(i) for i in self.tk.all_special_ids) | {self.eos_id, self.pad_id}

    # ---- chat --------------------------------------------------------------------------
    def _template(self, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool) -> list[int]:
        key = (generation_prompt, *(tuple(m.items()) for m in messages))
        try:
            return list(self._rendered[key])
        except KeyError:
            pass
        except TypeError:  # a value that cannot be a key (not a string): rendered every time
            key = None
        ids = self.tk.apply_chat_template([dict(m) for m in messages], tokenize=True,
                                          add_generation_prompt=generation_prompt)
        if isinstance(ids, Mapping) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        ids = [int(i) for i in ids]
        if key is not None:
            while self._rendered and len(self._rendered) >= self.RENDERINGS:
                self._rendered.pop(next(iter(self._rendered)), None)
            self._rendered[key] = array("i", ids)
        return ids

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool]]:
        """Token ids and the SFT loss mask (True on assistant replies and what closes them)."""
        if not self.has_template:
            tokens: list[int] = []
            mask: list[bool] = []
            for message in messages:
                head = self.encode(HEADERS[message["role"]])
                reply = message["role"] == "assistant"
                body = self.encode(message["content"]) + ([self.eos_id] if reply else [])
                tail = [] if reply else self.encode("\n\n")
                tokens += head + body + tail
                mask += [False] * len(head) + [reply] * len(body) + [False] * len(tail)
            return tokens, mask
        tokens, mask = [], []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._template(messages[:i], generation_prompt=True)
            through = self._template(messages[: i + 1], generation_prompt=False)
            if through[: len(before)] != before or before[: len(tokens)] != tokens:
                raise UserError(f"{self.origin}: its chat template does not render conversations "
                                f"incrementally, so assistant turns cannot be masked")
            mask += [False] * (len(before) - len(tokens)) + [True] * (len(through) - len(before))
            tokens = through
        full = self._template(messages, generation_prompt=False) if messages else []
        mask += [False] * (len(full) - len(tokens))
        return full, mask

    def render_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if not self.has_template:
            return self.render_chat(messages)[0] + self.encode(HEADERS["assistant"])
        return self._template(messages, generation_prompt=True)

    # ---- persistence -------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        target = Path(folder) / TOKENIZER_DIR
        self.tk.save_pretrained(str(target))
        return target

    def content_hash(self) -> str:
        """sha256 over what decides the encoding: the backend model, specials and chat template."""
        blob = json.dumps({"backend": json.loads(self.tk.backend_tokenizer.to_str()),
                           "special": {k: str(v) for k, v in sorted(self.tk.special_tokens_map.items())},
                           "template": getattr(self.tk, "chat_template", None)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()
