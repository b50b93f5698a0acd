"""`palmrl reward`: train the reward model on preference pairs (pairwise) or ratings (binned).

init_from an sft (or pretrain) checkpoint → trunk (full, or LoRA in the `reward` scope over the
frozen trunk) + scalar head → held-out accuracy, margin and score distribution in the manifest.
The distribution (mean, std over held-out replies) lets PPO and best-of-n normalise scores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from palmrl.data.instructions import SFTBatches
from palmrl.data.preferences import (collate_pairs, collate_ratings, load_preference_pairs, load_ratings,
                                     policy_task_pairs)
from palmrl.engine import Hooks, Trainer
from palmrl.errors import UserError
from palmrl.reward import RewardModel, binned_loss, pairwise_loss
from palmrl.runtime import init_distributed, seed_everything
from palmrl.model.registry import apply_lora
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
                                    max_new_tokens=16)
        mixed.append(items[:len(items) - len(sampled[:wanted])] + sampled[:wanted])
    return mixed[0], mixed[1]


def run(cfg: DictConfig) -> Path:
    dist = init_distributed()
    seed_everything(int(cfg.seed))
    objective = str(cfg.reward.objective)
    want = {"pairwise": "preferences", "binned": "ratings"}.get(objective)
    if want is None:
        raise UserError(f"reward.objective must be pairwise or binned, got '{objective}'")
    if cfg.data.get("kind") != want:
        raise UserError(f"data: reward.objective={objective} needs {want} data "
                        f"({'data=prefs|my_prefs' if want == 'preferences' else 'data=ratings'}), got kind={cfg.data.get('kind')}")

    palm, model_config, tokenizer, parent, source = policy_source(cfg, "init_from", ["sft", "pretrain"])
    lora = apply_lora(palm, cfg.lora, SCOPE)
    model = RewardModel(palm, objective=objective, num_bins=int(cfg.reward.num_bins))
    max_len = int(cfg.train.max_len)
    if max_len > model_config.max_seq_len:
        raise UserError(f"train.max_len ({max_len}) exceeds the model's max_seq_len ({model_config.max_seq_len})")

    # data
    num_bins = int(cfg.reward.num_bins)
    if objective == "pairwise":
        train_items, stats = load_preference_pairs(cfg.data, "train")
        val_items, val_stats = load_preference_pairs(cfg.data, "val")
        stats = {**stats, "val_dropped_identical": val_stats["dropped_identical"]}
        share = float(cfg.data.get("policy_negatives") or 0.0)
        if share > 0:
            if str(cfg.data.get("source")) != "tasks":
                raise UserError("data.policy_negatives needs data.source=tasks (the checker labels the samples)")
            train_items, val_items = with_policy_negatives(palm, tokenizer, cfg, share, train_items, val_items)
            stats["policy_negative_pairs"] = {"train": len(train_items), "val": len(val_items)}
        collate = lambda items: collate_pairs(tokenizer, items, max_len)  # noqa: E731
    else:
        train_items, val_items = load_ratings(cfg.data, "train", num_bins), load_ratings(cfg.data, "val", num_bins)
        stats = {"total": len(train_items)}
        collate = lambda items: collate_ratings(tokenizer, items, max_len)  # noqa: E731
    micro, accum = int(cfg.train.micro_batch_size), int(cfg.train.grad_accum)
    order = SFTBatches(train_items, batch_size=micro, pad_id=tokenizer.pad_id, seed=int(cfg.seed),
                       rank=dist.rank, world_size=dist.world_size)

    reward_spec = {"objective": objective, "num_bins": num_bins, "pooling": "last", "margin": float(cfg.reward.margin)}
    trainer = Trainer(cfg, dist, model, stage="reward", model_config=model_config.to_dict(), tokenizer=tokenizer,
                      parent=parent, tokens_per_step=micro * accum * dist.world_size * max_len,
                      hooks=Hooks(export=export_reward),
                      manifest_extra={"lora": lora, "reward": reward_spec, "data_stats": stats, **source})
    engine, device = trainer.engine, dist.device

    def loss_of(batch):
        if objective == "pairwise":
            both = torch.cat([batch.chosen_tokens, batch.rejected_tokens]).to(device)  # one forward for both halves
            last = torch.cat([batch.chosen_last, batch.rejected_last]).to(device)
            chosen, rejected = engine(both, last).chunk(2)
            out = pairwise_loss(chosen, rejected, float(cfg.reward.margin))
            return out.loss, {"accuracy": out.accuracy.item(), "margin": out.margin.item()}, torch.cat([chosen, rejected])
        logits = engine(batch.tokens.to(device), batch.last.to(device))
        out = binned_loss(logits, batch.labels.to(device))
        return out.loss, {"accuracy": out.accuracy.item(), "rating_mae": out.rating_mae.item()}, model.scores(logits)

    def step_fn(step: int) -> dict:
        totals: dict[str, float] = {}
        for micro_step in range(accum):
            batch = collate([train_items[i] for i in order.indices((step - 1) * accum + micro_step)])
            loss, stats_, _ = loss_of(batch)
            trainer.backward_step(loss)
            for k, v in {"loss": loss.item(), **stats_}.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        return totals

    def eval_fn() -> dict:
        sums: dict[str, float] = {}
        scores = []
        for start in range(0, len(val_items), micro):
            chunk = val_items[start:start + micro]
            loss, stats_, batch_scores = loss_of(collate(chunk))
            for k, v in {"loss": loss.item(), **stats_}.items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
            scores.append(batch_scores.detach().float().cpu())
        metrics = {k: v / len(val_items) for k, v in sums.items()}
        all_scores = torch.cat(scores)
        metrics.update(score_mean=all_scores.mean().item(), score_std=all_scores.std().item())
        reward_spec.update(score_mean=metrics["score_mean"], score_std=metrics["score_std"])
        return metrics

    return trainer.fit(step_fn, eval_fn, start_rows={
        "objective": objective, "train items": f"{len(train_items):,}", "val items": f"{len(val_items):,}",
        "dropped identical pairs": stats.get("dropped_identical", 0),
        "LoRA": f"rank {lora['scopes'][SCOPE]['rank']}" if lora else "none (full fine-tuning)"})
