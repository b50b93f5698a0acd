"""`palmrl tokenizer`: train a sentencepiece (or byte-level) tokenizer on a data source.

Writes runs/<run_name>/tokenizer/ (tokenizer.model or tokenizer.json), which `pretrain` picks up.
An existing tokenizer there is never replaced unless overwrite=true.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from palmrl.errors import UserError
from palmrl.stages.common import train_tokenizer_from_cfg
from palmrl.tracking import Tracker


def run(cfg: DictConfig) -> Path:
    out = Path(str(cfg.tokenizer.path))
    if any((out / name).is_file() for name in ("tokenizer.model", "tokenizer.json")) and not cfg.overwrite:
        raise UserError(f"tokenizer.path: {out} already holds a tokenizer (overwrite=true replaces it)")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer_from_cfg(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    sample = "Hello there! How are you doing today?"
    ids = tokenizer.encode(sample)
    Tracker(out, enabled=True, total_steps=0, stage="tokenizer").summary("palmrl tokenizer", {
        "output": str(out),
        "kind": tokenizer.kind,
        "vocab size": tokenizer.vocab_size,
        "seconds": round(time.perf_counter() - t0, 2),
        "example": f"{sample!r} -> {len(ids)} tokens",
        "round trip exact": tokenizer.decode(ids) == sample,
    })
    return out
