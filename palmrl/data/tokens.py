"""Packed token shards for pretraining, and batches that are a pure function of the step.

Pretraining reads one long stream of tokens: every document encoded and followed by eos, as in
GPT-2/PaLM-style packing (nanoGPT's `train.bin`). The stream is tokenised once and cached on disk
as flat uint16/uint32 arrays (`train.bin`, `val.bin`, described by `meta.json`) that every rank
memory-maps.

Batches never depend on what happened before: `TokenBatches.batch(step)` cuts the stream into
non-overlapping windows of seq_len + 1 tokens, shuffles them with a permutation seeded by
(seed, epoch), and hands rank r of W at step s the windows (s*W + r)*B ... (s*W + r)*B + B - 1 of
that sequence. Resuming at step s therefore replays exactly the data an uninterrupted run sees.

Multi-process: the writer (rank 0) builds the cache; the other ranks poll for the finished folder
(it appears atomically by rename) until a timeout. Polling needs no process group, so shards can
be built before DeepSpeed starts; if rank 0 dies, the launcher tears the other ranks down.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from palmrl.errors import UserError
from palmrl.tokenizer import Tokenizer

SHARD_FORMAT = 1  # bump when the layout or the split rule changes, so old caches are not reused
_ENCODE_BATCH_DOCS = 512  # documents per tokenizer call: big enough for SentencePiece's threads
_FLUSH_TOKENS = 1 << 20  # tokens buffered per split before appending to its file


@dataclass
class TokenSplits:
    """Packed token streams of one corpus and tokenizer (documents joined by eos)."""

    train: np.ndarray  # (N_train,) uint16 or uint32 memmap, read-only
    val: np.ndarray  # (N_val,) same dtype; an empty in-memory array when val_fraction is 0
    path: Path  # the cache folder holding train.bin, val.bin, meta.json
    meta: Mapping = field(default_factory=dict)  # meta.json: token and document counts, dtype, ...


def build_token_shards(
    texts_factory: Callable[[], Iterable[str]],
    tokenizer: Tokenizer,
    *,
    fingerprint: str,
    cache_dir: Path,
    val_fraction: float = 0.01,  # 1% of documents: a stable loss estimate without starving training
    is_writer: bool = True,
    wait_timeout_s: float = 6 * 3600.0,  # non-writers wait this long for rank 0 to tokenise
) -> TokenSplits:
    """Tokenise the corpus once into cache_dir/<key>/ and memory-map it; later calls just load.

    `texts_factory()` yields the documents; it is only called when the cache is missing. The key
    hashes `fingerprint` (see `sources.source_fingerprint`), the tokenizer's content hash and
    `val_fraction`. A document goes to val when a hash of its text falls below val_fraction, so the
    split does not depend on order and duplicate documents never straddle train and val.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    key = hashlib.sha256(
        json.dumps(
            {
                "format": SHARD_FORMAT,
                "fingerprint": fingerprint,
                "tokenizer": tokenizer.content_hash(),
                "val_fraction": val_fraction,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]
    cache_dir = Path(cache_dir)
    folder = cache_dir / key

    # another run (or rank 0 of this one) may have built it already
    if (folder / "meta.json").is_file():
        return _load_splits(folder)
    if not is_writer:
        _wait_for(folder, wait_timeout_s)
        return _load_splits(folder)

    # build in a private temporary folder, then rename: a crash never leaves a valid-looking cache
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = _tokenise_into(tmp, texts_factory, tokenizer, val_fraction)
        meta.update(
            format=SHARD_FORMAT, fingerprint=fingerprint, tokenizer_hash=tokenizer.content_hash(),
            val_fraction=val_fraction
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # a concurrent writer won the race: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_splits(folder)


def _tokenise_into(
    folder: Path, texts_factory: Callable[[], Iterable[str]], tokenizer: Tokenizer, val_fraction: float
) -> dict:
    """Encode every document into folder/train.bin and folder/val.bin; return the counts."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    threshold = int(val_fraction * (1 << 64))  # a document is val when its 64-bit hash is below this
    started = time.perf_counter()
    counts = {"train_tokens": 0, "val_tokens": 0, "train_documents": 0, "val_documents": 0}
    last_train_doc = (0, 0)  # (start, length) in train.bin of the latest train document

    with open(folder / "train.bin", "wb") as train_file, open(folder / "val.bin", "wb") as val_file:
        files = {"train": train_file, "val": val_file}
        buffers: dict[str, list[int]] = {"train": [], "val": []}

        def flush(split: str) -> None:
            np.asarray(buffers[split], dtype=dtype).tofile(files[split])
            buffers[split] = []

        for batch in _batched(texts_factory(), _ENCODE_BATCH_DOCS):
            for text, ids in zip(batch, tokenizer.encode_batch(batch)):
                digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
                split = "val" if int.from_bytes(digest, "little") < threshold else "train"
                if split == "train":
                    last_train_doc = (counts["train_tokens"], len(ids) + 1)
                buffers[split].extend(ids)
                buffers[split].append(tokenizer.eos_id)
                counts[f"{split}_tokens"] += len(ids) + 1
                counts[f"{split}_documents"] += 1
                if len(buffers[split]) >= _FLUSH_TOKENS:
                    flush(split)
        flush("train")
        flush("val")

    # a small corpus may hash no document into val: move the last train document there
    if val_fraction > 0 and counts["val_documents"] == 0 and counts["train_documents"] >= 2:
        start, length = last_train_doc
        tail = np.fromfile(folder / "train.bin", dtype=dtype, offset=start * np.dtype(dtype).itemsize)
        tail[:length].tofile(folder / "val.bin")
        os.truncate(folder / "train.bin", start * np.dtype(dtype).itemsize)
        counts.update(train_tokens=start, val_tokens=length, val_documents=1)
        counts["train_documents"] -= 1

    if counts["train_tokens"] == 0:
        raise UserError("the corpus produced no training tokens (it is empty, or every document went to val)")
    seconds = time.perf_counter() - started
    total = counts["train_tokens"] + counts["val_tokens"]
    return {
        **counts,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "build_seconds": round(seconds, 3),
        "tokens_per_second": round(total / max(seconds, 1e-9)),
    }


def _load_splits(folder: Path) -> TokenSplits:
    """Memory-map a finished cache folder, checking the files match meta.json."""
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        expected = meta[f"{split}_tokens"]
        if not path.is_file() or path.stat().st_size != expected * dtype.itemsize:
            raise UserError(
                f"token cache {folder} is damaged ({path.name} does not hold {expected} tokens); delete the folder"
            )
        # numpy cannot memory-map an empty file
        arrays[split] = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype)
    return TokenSplits(train=arrays["train"], val=arrays["val"], path=folder, meta=meta)


def _wait_for(folder: Path, timeout_s: float) -> None:
    """Poll until the writer has renamed its finished folder into place."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while not (folder / "meta.json").is_file():
        if time.monotonic() > deadline:
            raise UserError(f"waited {timeout_s:.0f} s for rank 0 to write the token cache {folder}; see rank 0's log")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)  # poll fast at first (cache hits), then gently


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class TokenBatches:
    """Deterministic windows of a packed token stream: `batch(step)` depends on (seed, step, rank) only."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        name: str = "the corpus",  # how error messages call the stream, e.g. "val split of local:x.txt"
    ) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens = tokens
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.window = seq_len + 1  # inputs are window[:-1], targets window[1:]
        self.num_windows = len(tokens) // self.window
        if self.num_windows < batch_size * world_size:
            raise UserError(
                f"{name} holds {len(tokens)} tokens = {self.num_windows} windows of seq_len+1={self.window}, "
                f"fewer than one step needs (batch_size {batch_size} x world_size {world_size}); "
                f"add data or lower seq_len/batch_size"
            )
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def tokens_per_step(self) -> int:
        """Tokens predicted per optimizer step over all ranks (before gradient accumulation)."""
        return self.batch_size * self.seq_len * self.world_size

    @property
    def steps_per_epoch(self) -> float:
        """Steps that see every window once over all ranks."""
        return self.num_windows / (self.batch_size * self.world_size)

    def batch(self, step: int) -> torch.Tensor:
        """Windows of this rank at `step`: (batch_size, seq_len + 1) int64."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        first = (step * self.world_size + self.rank) * self.batch_size
        positions = np.arange(first, first + self.batch_size, dtype=np.int64)  # (B,) in the shuffled sequence
        windows = np.array([self._permutation(int(p // self.num_windows))[p % self.num_windows] for p in positions])
        return self._gather(windows)  # (B, T+1)

    def eval_batches(self, num_batches: int) -> Iterator[torch.Tensor]:
        """Fixed validation batches of this rank, windows spread evenly over the stream.

        The ranks split one global set of num_batches * B * W windows; every rank gets the same
        number of batches (fewer than asked if the stream is short), so collective ops line up.
        """
        per_step = self.batch_size * self.world_size
        num_batches = min(num_batches, self.num_windows // per_step)
        total = num_batches * per_step
        spread = np.arange(total, dtype=np.int64) * self.num_windows // max(total, 1)  # distinct, ascending
        for index in range(num_batches):
            first = (index * self.world_size + self.rank) * self.batch_size
            yield self._gather(spread[first : first + self.batch_size])  # (B, T+1)

    def _permutation(self, epoch: int) -> np.ndarray:
        """The window order of one epoch, seeded by (seed, epoch); the last two are kept."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.num_windows)
        return self._permutations[epoch]

    def _gather(self, windows: np.ndarray) -> torch.Tensor:
        offsets = windows[:, None] * self.window + np.arange(self.window)  # (B, T+1) token indices
        return torch.from_numpy(np.asarray(self.tokens[offsets], dtype=np.int64))  # (B, T+1)
