"""`palmrl pretrain`: next-token prediction on raw text (PaLM §3), through the shared Trainer.

build tokenizer → tokenise the corpus once into cached shards → build PaLM (or init_from) →
train → write runs/<run>/pretrain/final. Validation reports loss, perplexity and the loss of a
unigram model fitted on the training tokens: the baseline any language model must beat.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from palmrl import checkpoint
from palmrl.data.sources import load_texts, source_fingerprint
from palmrl.data.tokens import TokenBatches, build_token_shards
from palmrl.engine import Trainer
from palmrl.errors import UserError
from palmrl.model.palm import ModelConfig, PaLM
from palmrl.runtime import init_distributed, seed_everything
from palmrl.model.registry import check_vocab
from palmrl.stages.common import tokenizer_for_training


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under add-one-smoothed train frequencies."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T+1) window, computed in fp32."""
    logits = model(tokens[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def run(cfg: DictConfig) -> Path:
    dist = init_distributed()
    seed_everything(int(cfg.seed))
    if cfg.model.get("family") == "hf":
        raise UserError("model=hf: pretrain builds a PaLM; start from a Hugging Face model with "
                        "`palmrl sft model=hf model.path=...`")
    if cfg.data.get("kind") != "text":
        raise UserError(f"data: pretrain needs a text source (data=embedded|local|hf|pile), got kind={cfg.data.get('kind')}")

    # the tokenizer: from init_from's checkpoint when continuing, else tokenizer.path (trained if missing)
    parent = None
    if cfg.init_from:
        parent = checkpoint.load(cfg.init_from, key="init_from", stages=["pretrain"])
        tokenizer, model_config = parent.tokenizer(), ModelConfig.from_dict(parent.model_config)
    else:
        tokenizer, model_config = tokenizer_for_training(cfg, dist.is_main), ModelConfig.from_dict(cfg.model)
    check_vocab(tokenizer, model_config, where=str(parent.path if parent else cfg.tokenizer.path))
    seq_len = int(cfg.train.seq_len)
    if seq_len > model_config.max_seq_len:
        raise UserError(f"train.seq_len ({seq_len}) exceeds model.max_seq_len ({model_config.max_seq_len})")

    # tokenise once; cached by content + tokenizer
    splits = build_token_shards(lambda: load_texts(cfg.data), tokenizer, fingerprint=source_fingerprint(cfg.data),
                                cache_dir=Path(str(cfg.cache_dir)).expanduser() / "tokens",
                                val_fraction=float(cfg.data.val_fraction), is_writer=dist.is_main)
    micro, accum = int(cfg.train.micro_batch_size), int(cfg.train.grad_accum)
    batches = TokenBatches(splits.train, seq_len=seq_len, batch_size=micro, seed=int(cfg.seed),
                           rank=dist.rank, world_size=dist.world_size)
    val = TokenBatches(splits.val, seq_len=seq_len, batch_size=micro, seed=int(cfg.seed))
    baseline = unigram_loss(np.asarray(splits.train), np.asarray(splits.val), tokenizer.vocab_size)

    model = PaLM(model_config)
    if parent is not None:
        checkpoint.load_trunk_weights(model, parent.weights(), where=str(parent.path))
    trainer = Trainer(cfg, dist, model, stage="pretrain", model_config=model_config.to_dict(),
                      tokenizer=tokenizer, parent=parent,
                      tokens_per_step=micro * accum * dist.world_size * seq_len)
    engine, device = trainer.engine, dist.device

    def step_fn(step: int) -> dict:
        losses = []
        for micro_step in range(accum):
            tokens = batches.batch((step - 1) * accum + micro_step).to(device)
            loss = lm_loss(engine, tokens)
            trainer.backward_step(loss)
            losses.append(loss.item())
        return {"loss": sum(losses) / len(losses)}

    def eval_fn() -> dict:
        losses = [lm_loss(engine, tokens.to(device)).item() for tokens in val.eval_batches(int(cfg.train.eval_batches))]
        loss = sum(losses) / len(losses)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "unigram_loss": baseline}

    return trainer.fit(step_fn, eval_fn, start_rows={
        "train tokens": f"{len(splits.train):,}", "val tokens": f"{len(splits.val):,}",
        "unigram baseline loss": round(baseline, 4)})
