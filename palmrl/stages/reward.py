"""`palmrl reward`: train the reward model on preference pairs (pairwise) or ratings (binned).

init_from an sft (or pretrain) checkpoint → trunk (full, or LoRA in the `reward` scope over the
frozen trunk) + scalar head → held-out accuracy, margin and score distribution in the manifest.
The distribution (mean, std over held-out replies) lets PPO and best-of-n normalise scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from omegaconf import DictConfig

from palmrl.config import Invalid, typed
from palmrl.data.instructions import ShuffledBatches, share_of
from palmrl.data.preferences import (
    collate_tokenized_pairs,
    collate_tokenized_ratings,
    load_preference_pairs,
    load_ratings,
    policy_task_pairs,
    tokenize_pairs,
    tokenize_ratings,
)
from palmrl.engine import Hooks, Trainer
from palmrl.errors import UserError
from palmrl.model.palm import paired_prefix
from palmrl.model.registry import apply_lora
from palmrl.reward import RewardModel, binned_loss, pairwise_loss
from palmrl.runtime import init_distributed, seed_everything
from palmrl.stages.common import export_split, policy_source

SCOPE = "reward"


def export_reward(state: dict) -> tuple[dict, dict]:
    """Module names `palm.*` become plain PaLM names; the head keeps `reward_head.*`."""
    return export_split({k.removeprefix("palm."): v for k, v in state.items()})


def with_policy_negatives(palm, tokenizer, cfg: DictConfig, share: float, train: list, val: list) -> tuple[list, list]:
    """Replace `share` of the synthetic pairs by pairs against the policy's own wrong samples."""
    mixed = []
    for split, items in (("train", train), ("val", val)):
        wanted = int(len(items) * share)
        sampled = policy_task_pairs(palm, tokenizer, split, wanted, seed=int(cfg.seed) + 1, tasks=cfg.data.get("tasks"),
                                    max_new_tokens=16, mixed_forms=share_of(cfg.data, "behaviour_pairs") > 0)
        mixed.append(items[:len(items) - len(sampled[:wanted])] + sampled[:wanted])
    return mixed[0], mixed[1]


@dataclass(frozen=True)
class RewardSettings:
    """The `reward:` section, typed once (reasons in configs/reward.yaml)."""

    objective: Literal["pairwise", "binned"]
    margin: float
    num_bins: int

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise Invalid("margin", f"must be >= 0, got {self.margin}")
        if self.num_bins < 2:
            raise Invalid("num_bins", f"must be >= 2, got {self.num_bins}")


@dataclass(frozen=True)
class ReplyLength:
    """The reward stage's own `train:` key."""

    max_len: int  # tokens per prompt + reply

    def __post_init__(self) -> None:
        if self.max_len <= 0:
            raise Invalid("max_len", f"must be positive, got {self.max_len}")


class RewardRecipe:
    """build_model → build_data → build_trainer, then `step` and `evaluate` on the shared loop."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.settings = typed(RewardSettings, cfg.reward, key="reward")
        self.max_len = typed(ReplyLength, cfg.train, key="train").max_len
        objective = self.settings.objective
        want = {"pairwise": "preferences", "binned": "ratings"}[objective]
        if cfg.data.get("kind") != want:
            raise UserError(f"data: reward.objective={objective} needs {want} data "
                            f"({'data=prefs|my_prefs' if want == 'preferences' else 'data=ratings'}), "
                            f"got kind={cfg.data.get('kind')}")
        self.pairwise = objective == "pairwise"
        self.dist = init_distributed()
        seed_everything(int(cfg.seed))

    def build_model(self) -> None:
        """The sft policy's trunk (full, or LoRA in the `reward` scope) under a scalar or binned head."""
        s = self.settings
        self.palm, self.model_config, self.tokenizer, self.parent, self.source = policy_source(
            self.cfg, "init_from", ["sft", "pretrain"])
        self.lora = apply_lora(self.palm, self.cfg.lora, SCOPE)
        self.model = RewardModel(self.palm, objective=s.objective, num_bins=s.num_bins)
        if self.max_len > self.model_config.max_seq_len:
            raise UserError(f"train.max_len ({self.max_len}) exceeds the model's max_seq_len "
                            f"({self.model_config.max_seq_len})")

    def build_data(self) -> None:
        cfg, tokenizer, max_len = self.cfg, self.tokenizer, self.max_len
        if self.pairwise:
            train_items, stats = load_preference_pairs(cfg.data, "train")
            val_items, val_stats = load_preference_pairs(cfg.data, "val")
            stats = {**stats, "val_dropped_identical": val_stats["dropped_identical"]}
            share = float(cfg.data.get("policy_negatives") or 0.0)
            if share > 0:
                if str(cfg.data.get("source")) != "tasks":
                    raise UserError("data.policy_negatives needs data.source=tasks (the checker labels the samples)")
                train_items, val_items = with_policy_negatives(self.palm, tokenizer, cfg, share, train_items, val_items)
                stats["policy_negative_pairs"] = {"train": len(train_items), "val": len(val_items)}
            tokenize = tokenize_pairs
            self.collate = lambda rows: collate_tokenized_pairs(rows, tokenizer.pad_id)
        else:
            num_bins = self.settings.num_bins
            train_items, val_items = load_ratings(cfg.data, "train", num_bins), load_ratings(cfg.data, "val", num_bins)
            stats = {"total": len(train_items)}
            tokenize = tokenize_ratings
            self.collate = lambda rows: collate_tokenized_ratings(rows, tokenizer.pad_id)
        # rendered and tokenized once here, like SFT's examples: not again at every step and evaluation
        # (the bench model's reward step spent ~4 ms of ~180 in SentencePiece)
        self.train_items = tokenize(tokenizer, train_items, max_len)
        self.val_items = tokenize(tokenizer, val_items, max_len)
        self.stats = stats
        self.order = ShuffledBatches(train_items, batch_size=int(cfg.train.micro_batch_size), pad_id=tokenizer.pad_id,
                                     seed=int(cfg.seed), rank=self.dist.rank, world_size=self.dist.world_size)

    def build_trainer(self) -> None:
        cfg, dist, s = self.cfg, self.dist, self.settings
        micro, accum = int(cfg.train.micro_batch_size), int(cfg.train.grad_accum)
        # score_mean/score_std join this entry at every evaluation (PPO and best-of-n normalise by them)
        self.reward_spec = {"objective": s.objective, "num_bins": s.num_bins, "pooling": "last", "margin": s.margin}
        self.trainer = Trainer(cfg, dist, self.model, stage="reward", model_config=self.model_config.to_dict(),
                               tokenizer=self.tokenizer, parent=self.parent,
                               tokens_per_step=micro * accum * dist.world_size * self.max_len,
                               hooks=Hooks(export=export_reward),
                               manifest_extra={"lora": self.lora, "reward": self.reward_spec,
                                               "data_stats": self.stats, **self.source})
        self.engine = self.trainer.engine

    def loss(self, batch) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(loss, scalar stats, the batch's scores) for a pair or rating batch."""
        device = self.dist.device
        if self.pairwise:
            both = torch.cat([batch.chosen_tokens, batch.rejected_tokens]).to(device)  # one forward for both halves
            last = torch.cat([batch.chosen_last, batch.rejected_last]).to(device)
            # a pair's replies share their prompt: computed once for both (PaLM.trunk's shared_prefix)
            chosen, rejected = self.engine(both, last, shared_prefix=paired_prefix(both)).chunk(2)
            out = pairwise_loss(chosen, rejected, self.settings.margin)
            stats = {"accuracy": out.accuracy.item(), "margin": out.margin.item()}
            return out.loss, stats, torch.cat([chosen, rejected])
        logits = self.engine(batch.tokens.to(device), batch.last.to(device))
        out = binned_loss(logits, batch.labels.to(device))
        stats = {"accuracy": out.accuracy.item(), "rating_mae": out.rating_mae.item()}
        return out.loss, stats, self.model.scores(logits)

    def step(self, step: int) -> dict:
        accum, totals = self.trainer.train.grad_accum, {}
        for micro_step in range(accum):
            batch = self.collate([self.train_items[i] for i in self.order.indices((step - 1) * accum + micro_step)])
            loss, stats, _ = self.loss(batch)
            self.trainer.backward_step(loss)
            for k, v in {"loss": loss.item(), **stats}.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        return totals

    def evaluate(self) -> dict:
        micro, val_items = self.trainer.train.micro_batch_size, self.val_items
        sums: dict[str, float] = {}
        scores = []
        for start in range(0, len(val_items), micro):
            chunk = val_items[start:start + micro]
            loss, stats, batch_scores = self.loss(self.collate(chunk))
            for k, v in {"loss": loss.item(), **stats}.items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
            scores.append(batch_scores.detach().float().cpu())
        metrics = {k: v / len(val_items) for k, v in sums.items()}
        all_scores = torch.cat(scores)
        metrics.update(score_mean=all_scores.mean().item(), score_std=all_scores.std().item())
        self.reward_spec.update(score_mean=metrics["score_mean"], score_std=metrics["score_std"])
        return metrics

    def run(self) -> Path:
        self.build_model()
        self.build_data()
        self.build_trainer()
        return self.trainer.fit(self.step, self.evaluate, start_rows={
            "objective": self.settings.objective, "train items": f"{len(self.train_items):,}",
            "val items": f"{len(self.val_items):,}", "dropped identical pairs": self.stats.get("dropped_identical", 0),
            "LoRA": f"rank {self.lora['scopes'][SCOPE]['rank']}" if self.lora else "none (full fine-tuning)"})


def run(cfg: DictConfig) -> Path:
    return RewardRecipe(cfg).run()
