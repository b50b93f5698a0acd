"""`palmrl sft`: supervised fine-tuning on instructions (InstructGPT §3.5), full or LoRA.

init_from a pretrain (or sft) checkpoint → render records with the chat template → loss on the
assistant tokens only → write runs/<run>/sft/final. With LoRA the adapters live in the `sft` scope
over the frozen base and are saved unmerged in adapters.safetensors; later stages merge them.

Packing is not used: examples are short and right-padded batches waste little here, while packing
would need a block-diagonal mask that turns off the fused causal attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from palmrl import tasks
from palmrl.config import Invalid, typed
from palmrl.data.instructions import IGNORE_INDEX, ShuffledBatches, build_sft_examples, load_instruction_records
from palmrl.engine import Hooks, Trainer
from palmrl.errors import UserError
from palmrl.evaluate import sampled_reward, task_score
from palmrl.model.registry import apply_lora
from palmrl.runtime import init_distributed, seed_everything
from palmrl.stages.common import export_split, policy_source

SCOPE = "sft"


def sft_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over trained (response) tokens; also returns their count."""
    loss = model(batch.tokens, targets=batch.targets, ignore_index=IGNORE_INDEX)  # fp32, in chunks
    return loss, int((batch.targets != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class SFTSettings:
    """The sft stage's own `train:` keys (the shared ones are the Trainer's); reasons in configs/sft.yaml."""

    max_len: int
    eval_examples: int
    max_new_tokens: int

    def __post_init__(self) -> None:
        for key in ("max_len", "max_new_tokens"):
            if getattr(self, key) <= 0:
                raise Invalid(key, f"must be positive, got {getattr(self, key)}")
        if self.eval_examples < 0:
            raise Invalid("eval_examples", f"must be >= 0, got {self.eval_examples}")


class SFTRecipe:
    """build_model → build_data → build_trainer, then `step` and `evaluate` on the shared loop."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.settings = typed(SFTSettings, cfg.train, key="train")
        if cfg.data.get("kind") != "instructions":
            raise UserError(f"data: sft needs instruction data (data=tasks|my_instructions), "
                            f"got kind={cfg.data.get('kind')}")
        self.dist = init_distributed()
        seed_everything(int(cfg.seed))

    def build_model(self) -> None:
        """The policy to fine-tune: parent weights with any parent adapters merged in, then LoRA."""
        cfg = self.cfg
        self.model, self.model_config, self.tokenizer, self.parent, self.source = policy_source(
            cfg, "init_from", ["pretrain", "sft"])
        if self.settings.max_len > self.model_config.max_seq_len:
            raise UserError(f"train.max_len ({self.settings.max_len}) exceeds the model's max_seq_len "
                            f"({self.model_config.max_seq_len})")
        self.lora = apply_lora(self.model, cfg.lora, SCOPE)

    def build_data(self) -> None:
        """Chat-rendered examples with the loss on assistant tokens; held-out task prompts for the checker."""
        cfg, tokenizer, max_len = self.cfg, self.tokenizer, self.settings.max_len
        train_examples, self.stats = build_sft_examples(tokenizer, load_instruction_records(cfg.data, "train"),
                                                        max_len=max_len)
        val_examples, _ = build_sft_examples(tokenizer, load_instruction_records(cfg.data, "val"), max_len=max_len)
        micro = int(cfg.train.micro_batch_size)
        self.batches = ShuffledBatches(train_examples, batch_size=micro, pad_id=tokenizer.pad_id, seed=int(cfg.seed),
                                       rank=self.dist.rank, world_size=self.dist.world_size)
        # every rank evaluates the same examples: ZeRO-3 needs all ranks in every forward (only
        # eval_batches is used, which takes a last partial batch: a val set smaller than a batch is fine)
        self.val = ShuffledBatches(train_examples[:micro], val_examples, batch_size=micro,
                                   pad_id=tokenizer.pad_id, seed=int(cfg.seed))
        on_tasks = str(cfg.data.get("source")) == "tasks"
        self.task_examples = tasks.make_examples("test", self.settings.eval_examples, seed=int(cfg.seed),
                                                 tasks=cfg.data.get("tasks")) if on_tasks else []

    def build_trainer(self) -> None:
        cfg, dist = self.cfg, self.dist
        micro, accum = int(cfg.train.micro_batch_size), int(cfg.train.grad_accum)
        self.trainer = Trainer(cfg, dist, self.model, stage="sft", model_config=self.model_config.to_dict(),
                               tokenizer=self.tokenizer, parent=self.parent,
                               tokens_per_step=micro * accum * dist.world_size * self.settings.max_len,
                               hooks=Hooks(export=export_split),
                               manifest_extra={"lora": self.lora, "data_stats": self.stats, **self.source})
        self.engine = self.trainer.engine

    def _loss(self, batch) -> tuple[torch.Tensor, int]:
        device = self.dist.device
        return sft_loss(self.engine, batch._replace(tokens=batch.tokens.to(device), targets=batch.targets.to(device)))

    def step(self, step: int) -> dict:
        accum, losses = self.trainer.train.grad_accum, []
        for micro_step in range(accum):
            loss, _ = self._loss(self.batches.batch((step - 1) * accum + micro_step))
            self.trainer.backward_step(loss)
            losses.append(loss.item())
        return {"loss": sum(losses) / len(losses)}

    def evaluate(self) -> dict:
        total, count = 0.0, 0
        for batch in self.val.eval_batches():
            loss, n = self._loss(batch)
            total, count = total + loss.item() * n, count + n
        metrics = {"loss": total / max(count, 1)}
        if self.task_examples:
            new_tokens = self.settings.max_new_tokens
            score = task_score(self.engine.module, self.tokenizer, self.task_examples, max_new_tokens=new_tokens)
            metrics.update(accuracy=score.accuracy, format_rate=score.format_rate, response_tokens=score.mean_length,
                           sampled_reward=sampled_reward(self.engine.module, self.tokenizer, self.task_examples,
                                                         seed=int(self.cfg.seed), max_new_tokens=new_tokens))
            self.trainer.manifest_extra["samples"] = score.samples
        return metrics

    def run(self) -> Path:
        self.build_model()
        self.build_data()
        self.build_trainer()
        stats, lora = self.stats, self.lora
        start_rows = {"examples": f"{stats['kept']:,} kept, {stats['truncated']} truncated, {stats['dropped']} dropped",
                      "LoRA": f"rank {lora['scopes'][SCOPE]['rank']}" if lora else "none (full fine-tuning)"}
        if self.task_examples:
            # the starting point, so the gain from SFT is on record
            before = task_score(self.engine.module, self.tokenizer, self.task_examples,
                                max_new_tokens=self.settings.max_new_tokens)
            self.trainer.manifest_extra["init_accuracy"] = before.accuracy
            start_rows["checker accuracy before SFT"] = round(before.accuracy, 4)
        return self.trainer.fit(self.step, self.evaluate, start_rows=start_rows)


def run(cfg: DictConfig) -> Path:
    return SFTRecipe(cfg).run()
