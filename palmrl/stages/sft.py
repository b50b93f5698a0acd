"""`palmrl sft`: supervised fine-tuning on instructions (InstructGPT §3.5), full or LoRA.

init_from a pretrain (or sft) checkpoint → render records with the chat template → loss on the
assistant tokens only → write runs/<run>/sft/final. With LoRA the adapters live in the `sft` scope
over the frozen base and are saved unmerged in adapters.safetensors; later stages merge them.

Packing is not used: examples are short and right-padded batches waste little here, while packing
would need a block-diagonal mask that turns off the fused causal attention kernel. (The data
module provides `packed_attention_mask` for a model that takes one.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from palmrl import tasks
from palmrl.data.instructions import IGNORE_INDEX, SFTBatches, build_sft_examples, load_instruction_records
from palmrl.engine import Hooks, Trainer
from palmrl.errors import UserError
from palmrl.evaluate import sampled_reward, task_score
from palmrl.runtime import init_distributed, seed_everything
from palmrl.model.registry import apply_lora
from palmrl.stages.common import export_split, policy_source

SCOPE = "sft"


def sft_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over trained (response) tokens; also returns their count."""
    logits = model(batch.tokens)  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    return loss, int((batch.targets != IGNORE_INDEX).sum())


def run(cfg: DictConfig) -> Path:
    dist = init_distributed()
    seed_everything(int(cfg.seed))
    if cfg.data.get("kind") != "instructions":
        raise UserError(f"data: sft needs instruction data (data=tasks|my_instructions), got kind={cfg.data.get('kind')}")

    # the policy to fine-tune: parent weights with any parent adapters merged in
    model, model_config, tokenizer, parent, source = policy_source(cfg, "init_from", ["pretrain", "sft"])
    max_len = int(cfg.train.max_len)
    if max_len > model_config.max_seq_len:
        raise UserError(f"train.max_len ({max_len}) exceeds the model's max_seq_len ({model_config.max_seq_len})")
    lora = apply_lora(model, cfg.lora, SCOPE)

    # data: chat-rendered, loss on assistant tokens
    train_examples, stats = build_sft_examples(tokenizer, load_instruction_records(cfg.data, "train"), max_len=max_len)
    val_examples, _ = build_sft_examples(tokenizer, load_instruction_records(cfg.data, "val"), max_len=max_len)
    micro, accum = int(cfg.train.micro_batch_size), int(cfg.train.grad_accum)
    batches = SFTBatches(train_examples, batch_size=micro, pad_id=tokenizer.pad_id, seed=int(cfg.seed),
                         rank=dist.rank, world_size=dist.world_size)
    # every rank evaluates the same examples: ZeRO-3 needs all ranks in every forward (only
    # eval_batches is used, which takes a last partial batch: a val set smaller than a batch is fine)
    val = SFTBatches(train_examples[:micro], val_examples, batch_size=micro,
                     pad_id=tokenizer.pad_id, seed=int(cfg.seed))
    on_tasks = str(cfg.data.get("source")) == "tasks"
    task_examples = tasks.make_examples("test", int(cfg.train.eval_examples), seed=int(cfg.seed),
                                        tasks=cfg.data.get("tasks")) if on_tasks else []

    trainer = Trainer(cfg, dist, model, stage="sft", model_config=model_config.to_dict(), tokenizer=tokenizer,
                      parent=parent, tokens_per_step=micro * accum * dist.world_size * max_len,
                      hooks=Hooks(export=export_split), manifest_extra={"lora": lora, "data_stats": stats, **source})
    engine, device = trainer.engine, dist.device

    def step_fn(step: int) -> dict:
        losses = []
        for micro_step in range(accum):
            batch = batches.batch((step - 1) * accum + micro_step)
            loss, _ = sft_loss(engine, batch._replace(tokens=batch.tokens.to(device), targets=batch.targets.to(device)))
            trainer.backward_step(loss)
            losses.append(loss.item())
        return {"loss": sum(losses) / len(losses)}

    def eval_fn() -> dict:
        total, count = 0.0, 0
        for batch in val.eval_batches():
            loss, n = sft_loss(engine, batch._replace(tokens=batch.tokens.to(device), targets=batch.targets.to(device)))
            total, count = total + loss.item() * n, count + n
        metrics = {"loss": total / max(count, 1)}
        if task_examples:
            score = task_score(engine.module, tokenizer, task_examples, max_new_tokens=int(cfg.train.max_new_tokens))
            metrics.update(accuracy=score.accuracy, format_rate=score.format_rate, response_tokens=score.mean_length,
                           sampled_reward=sampled_reward(engine.module, tokenizer, task_examples, seed=int(cfg.seed),
                                                         max_new_tokens=int(cfg.train.max_new_tokens)))
            trainer.manifest_extra["samples"] = score.samples
        return metrics

    start_rows = {"examples": f"{stats['kept']:,} kept, {stats['truncated']} truncated, {stats['dropped']} dropped",
                  "LoRA": f"rank {lora['scopes'][SCOPE]['rank']}" if lora else "none (full fine-tuning)"}
    if task_examples:
        # the starting point, so the gain from SFT is on record
        before = task_score(engine.module, tokenizer, task_examples, max_new_tokens=int(cfg.train.max_new_tokens))
        trainer.manifest_extra["init_accuracy"] = before.accuracy
        start_rows["checker accuracy before SFT"] = round(before.accuracy, 4)
    return trainer.fit(step_fn, eval_fn, start_rows=start_rows)
