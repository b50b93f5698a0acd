"""What several training stages share: the tokenizer they agree on, where a fine-tune starts from
(a palmrl checkpoint or a Hugging Face model), and how a trained module is split for saving."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from palmrl import checkpoint
from palmrl.checkpoint import export_split  # noqa: F401 - the stages' import of it
from palmrl.errors import UserError

TOKENIZER_POLL_S = 2.0  # how often the other ranks look for the tokenizer rank 0 is training


def train_tokenizer_from_cfg(cfg: DictConfig):
    from palmrl.data.sources import load_texts
    from palmrl.tokenizer import train_tokenizer

    texts = load_texts(cfg.data)
    limit = cfg.tokenizer.get("max_documents")
    if limit:
        texts = (t for i, t in enumerate(texts) if i < int(limit))
    return train_tokenizer(texts, kind=str(cfg.tokenizer.kind), vocab_size=int(cfg.tokenizer.vocab_size),
                           model_type=str(cfg.tokenizer.model_type), seed=int(cfg.seed))


def tokenizer_for_training(cfg: DictConfig, is_main: bool):
    """Load the tokenizer at tokenizer.path, training it there first (rank 0) when it is missing."""
    from palmrl.tokenizer import Tokenizer

    path = Path(str(cfg.tokenizer.path))

    def exists() -> bool:  # Tokenizer.save renames into place: a file that exists is whole
        return (path / "tokenizer.model").is_file() or (path / "tokenizer.json").is_file()

    if not exists() and is_main:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer_from_cfg(cfg)
        path.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
        print(f"palmrl: trained a {tokenizer.kind} tokenizer ({tokenizer.vocab_size} ids) in "
              f"{time.perf_counter() - t0:.1f}s -> {path}", flush=True)
    # the other ranks wait for the file, not in a collective: NCCL's barrier times out (10-30 min)
    # while rank 0 trains on a large corpus; the launcher stops them if rank 0 fails
    while not exists():
        time.sleep(TOKENIZER_POLL_S)
    return Tokenizer.load(path)


def policy_source(cfg: DictConfig, key: str, stages: list[str]):
    """What sft/reward start from: `model=hf model.path=...` (a Hugging Face model: no parent
    checkpoint) or the palmrl checkpoint at cfg.<key>. Returns (model, config, tokenizer, parent, facts)."""
    model_cfg = cfg.get("model")
    if model_cfg is not None and model_cfg.get("family") != "hf":
        raise UserError(f"model: {cfg.stage} takes its architecture from {key}; model= only selects model=hf "
                        f"(a Hugging Face model as the starting point)")
    if model_cfg is not None:
        model, tokenizer = checkpoint.load_source(model_cfg)
        return model, model.config, tokenizer, None, {"hf_source": model.config.source}
    parent = checkpoint.load(cfg[key], key=key, stages=stages, trust_remote_code=bool(cfg.trust_remote_code))
    tokenizer = parent.tokenizer()
    model, config = checkpoint.policy_from_checkpoint(parent)
    return model, config, tokenizer, parent, {}
