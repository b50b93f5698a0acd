"""`palmrl pretrain`: next-token prediction on raw text (PaLM §3), through the shared Trainer.

build tokenizer → tokenise the corpus once into cached shards → build PaLM (or init_from) →
train → write runs/<run>/pretrain/final. Validation reports loss, perplexity and the loss of a
unigram model fitted on the training tokens: the baseline any language model must beat.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import numpy as np
import torch
from omegaconf import DictConfig

from palmrl import checkpoint
from palmrl.config import Invalid, typed
from palmrl.data.sources import load_texts, source_fingerprint
from palmrl.data.tokens import TokenBatches, build_token_shards
from palmrl.engine import Trainer, ds_config
from palmrl.errors import UserError
from palmrl.model.palm import ModelConfig, PaLM
from palmrl.model.registry import check_vocab
from palmrl.runtime import init_distributed, seed_everything
from palmrl.stages.common import tokenizer_for_training


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under add-one-smoothed train frequencies."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T+1) window, computed in fp32 (in chunks: no full logits);
    every position counts, so none is looked for to leave out."""
    return model(tokens[:, :-1], targets=tokens[:, 1:], ignore_index=None)


@dataclass(frozen=True)
class PretrainSettings:
    """The pretrain stage's own `train:` keys (the shared ones are the Trainer's)."""

    seq_len: int  # tokens per training window
    eval_batches: int  # validation batches per pass

    def __post_init__(self) -> None:
        for key in ("seq_len", "eval_batches"):
            if getattr(self, key) <= 0:
                raise Invalid(key, f"must be positive, got {getattr(self, key)}")


class PretrainRecipe:
    """build_tokenizer → build_data → build_model, then `step` and `evaluate` on the shared loop."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.settings = typed(PretrainSettings, cfg.train, key="train")
        self.dist = init_distributed()
        seed_everything(int(cfg.seed))
        if cfg.model.get("family") == "hf":
            raise UserError("model=hf: pretrain builds a PaLM; start from a Hugging Face model with "
                            "`palmrl sft model=hf model.path=...`")
        if cfg.data.get("kind") != "text":
            raise UserError(f"data: pretrain needs a text source (data=embedded|local|hf|pile), "
                            f"got kind={cfg.data.get('kind')}")

    def build_tokenizer(self) -> None:
        """From init_from's checkpoint when continuing, else tokenizer.path (trained there if missing)."""
        cfg = self.cfg
        self.parent = None
        if cfg.init_from:
            self.parent = checkpoint.load(cfg.init_from, key="init_from", stages=["pretrain"])
            self.tokenizer, self.model_config = self.parent.tokenizer(), ModelConfig.from_dict(self.parent.model_config)
        else:
            self.tokenizer = tokenizer_for_training(cfg, self.dist.is_main)
            self.model_config = ModelConfig.from_dict(cfg.model)
        check_vocab(self.tokenizer, self.model_config,
                    where=str(self.parent.path if self.parent else cfg.tokenizer.path))
        if self.settings.seq_len > self.model_config.max_seq_len:
            raise UserError(f"train.seq_len ({self.settings.seq_len}) exceeds model.max_seq_len "
                            f"({self.model_config.max_seq_len})")

    def build_data(self) -> None:
        """Tokenise once (cached by content + tokenizer); windows are a pure function of the step."""
        cfg, dist, seq_len = self.cfg, self.dist, self.settings.seq_len
        self.splits = build_token_shards(lambda: load_texts(cfg.data), self.tokenizer,
                                         fingerprint=source_fingerprint(cfg.data),
                                         cache_dir=Path(str(cfg.cache_dir)).expanduser() / "tokens",
                                         val_fraction=float(cfg.data.val_fraction), is_writer=dist.is_main)
        micro = int(cfg.train.micro_batch_size)
        self.batches = TokenBatches(self.splits.train, seq_len=seq_len, batch_size=micro, seed=int(cfg.seed),
                                    rank=dist.rank, world_size=dist.world_size)
        self.val = TokenBatches(self.splits.val, seq_len=seq_len, batch_size=micro, seed=int(cfg.seed))
        self.baseline = unigram_loss(np.asarray(self.splits.train), np.asarray(self.splits.val),
                                     self.tokenizer.vocab_size)

    def build_model(self) -> None:
        cfg, dist = self.cfg, self.dist
        # ZeRO-3 on several ranks: build the model partitioned (zero.Init), so no rank ever holds all
        # of it in fp32; a model continued from init_from is built whole to load its weights
        partitioned = int(cfg.zero.stage) == 3 and dist.world_size > 1 and self.parent is None
        if self.parent is not None:  # its model.yaml against its weights, before anything is allocated
            checkpoint.check_fits_weights(self.model_config, self.parent.weight_shapes(), where=str(self.parent.path))
        with deepspeed.zero.Init(config_dict_or_path=ds_config(cfg, dist.world_size)) if partitioned \
                else contextlib.nullcontext():
            model = PaLM(self.model_config)
        if self.parent is not None:
            checkpoint.load_trunk_weights(model, self.parent.weights(), where=str(self.parent.path))
        micro, accum = int(cfg.train.micro_batch_size), int(cfg.train.grad_accum)
        self.trainer = Trainer(cfg, dist, model, stage="pretrain", model_config=self.model_config.to_dict(),
                               tokenizer=self.tokenizer, parent=self.parent,
                               tokens_per_step=micro * accum * dist.world_size * self.settings.seq_len)
        self.engine = self.trainer.engine

    def step(self, step: int) -> dict:
        accum, losses = self.trainer.train.grad_accum, []
        for micro_step in range(accum):
            tokens = self.batches.batch((step - 1) * accum + micro_step).to(self.dist.device)
            loss = lm_loss(self.engine, tokens)
            self.trainer.backward_step(loss)
            losses.append(loss.item())
        return {"loss": sum(losses) / len(losses)}

    def evaluate(self) -> dict:
        losses = [lm_loss(self.engine, tokens.to(self.dist.device)).item()
                  for tokens in self.val.eval_batches(self.settings.eval_batches)]
        loss = sum(losses) / len(losses)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "unigram_loss": self.baseline}

    def run(self) -> Path:
        self.build_tokenizer()
        self.build_data()
        self.build_model()
        return self.trainer.fit(self.step, self.evaluate, start_rows={
            "train tokens": f"{len(self.splits.train):,}", "val tokens": f"{len(self.splits.val):,}",
            "unigram baseline loss": round(self.baseline, 4)})


def run(cfg: DictConfig) -> Path:
    return PretrainRecipe(cfg).run()
