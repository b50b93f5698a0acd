"""`palmrl grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath,
https://arxiv.org/abs/2402.03300), with the Dr. GRPO variant (Liu et al. 2025,
https://arxiv.org/abs/2503.20783).

One iteration: `group_size` responses to each prompt → scores (a reward model or a `reward_fn`) →
advantage of a response = its score minus its group's mean, divided by the group's std
(`grpo.scale=std`; `none` for Dr. GRPO) → `epochs` passes of clipped policy updates over
minibatches, with β·KL(π‖π_ref) (the k3 estimator) in the loss rather than in the reward. No
critic: the group is the baseline.

Everything but the advantages and the loss is the online recipe PPO uses (palmrl/rlhf.py): the
same models (the actor is a LoRA scope of the frozen SFT base, which is also the reference; a LoRA
reward model on the same base is a frozen scope too), the same sampling and scoring, evaluation,
checkpoints and resume=auto.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from omegaconf import DictConfig

from palmrl import rl
from palmrl.config import Invalid
from palmrl.rlhf import OnlineRecipe, Rollout, Sampled, gather_rows, run_online
from palmrl.runtime import any_rank


@dataclass(frozen=True)
class GRPOConfig:
    """The `grpo:` section of configs/grpo.yaml, typed and checked once at the stage's boundary."""

    rollout_batch: int = 128            # responses per iteration per rank (rollout_batch / group_size prompts)
    group_size: int = 8                 # G: responses per prompt, the baseline of each other
    minibatch: int = 32                 # sequences per optimizer step
    epochs: int = 2                     # passes over each rollout
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0                      # truncation makes the log-probs off-policy: keep it off
    top_p: float = 1.0
    scale: Literal["std", "none"] = "std"   # std: GRPO; none: Dr. GRPO (no std division, no length normalisation)
    clip_low: float = 0.2               # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2              # DAPO's clip-higher raises this (0.28) to keep exploring
    beta: float = 0.04                  # weight of the k3 KL to the reference in the loss; 0 drops the term
    entropy_coef: float = 0.0
    missing_eos_penalty: float | None = -1.0
    normalise_scores: bool = True       # reward-model scores over its held-out distribution
    score_clip: float | None = 5.0
    max_kl: float = 25.0                # stop (keeping the last good checkpoint) past this mean KL per sequence
    gather_for_rollout: bool = True     # ZeRO-3: gather the policy once per rollout
    dynamic_sampling: int = 4           # DAPO: up to this many rollouts per iteration while groups score alike; 1 = off

    def __post_init__(self):
        for key in ("rollout_batch", "minibatch", "epochs", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise Invalid(key, f"must be >= 1, got {getattr(self, key)}")
        if self.group_size < 2:
            raise Invalid("group_size", f"must be >= 2 (the group is the baseline), got {self.group_size}")
        if self.rollout_batch % self.group_size:
            raise Invalid("group_size", f"must divide grpo.rollout_batch ({self.rollout_batch}), got {self.group_size}")
        if self.rollout_batch % self.minibatch:
            raise Invalid("rollout_batch", f"must be a multiple of grpo.minibatch ({self.minibatch}), "
                                           f"got {self.rollout_batch}")
        for key in ("beta", "temperature", "top_k", "entropy_coef"):
            if getattr(self, key) < 0:
                raise Invalid(key, f"must be >= 0, got {getattr(self, key)}")
        if not 0 < self.top_p <= 1:
            raise Invalid("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.dynamic_sampling < 1:
            raise Invalid("dynamic_sampling", f"must be >= 1 (1 = off), got {self.dynamic_sampling}")
        if not 0 < self.clip_low < 1:
            raise Invalid("clip_low", f"must be in (0, 1), got {self.clip_low}")
        for key in ("clip_high", "max_kl", "score_clip"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise Invalid(key, f"must be > 0, got {getattr(self, key)}")

    # what PPO's shared recipe reads
    rloo = True                 # no critic
    critic_init = "policy"
    variant = "standard"
    kl_kind = "k1"              # the monitored (and max_kl-checked) KL per sequence, as PPO reports it

    @property
    def samples_per_prompt(self) -> int:
        return self.group_size

    @property
    def updates_per_iter(self) -> int:
        return self.epochs * (self.rollout_batch // self.minibatch)


class GRPORecipe(OnlineRecipe):
    """The shared online recipe with group-relative advantages and GRPO's loss; no critic, KL in the loss."""

    stage = "grpo"

    @property
    def critic(self) -> bool:
        return False

    @property
    def group(self) -> int:
        return self.ppo.group_size

    def kl_controller(self):
        return rl.FixedKLController(self.ppo.beta)  # β is fixed; kept for the resume state the recipe saves

    def kl_description(self) -> str:
        return f"β={self.ppo.beta} · k3 in the loss" if self.ppo.beta else "none (β=0)"

    def critic_note(self) -> str:
        return f"none: the {self.group} responses to each prompt are each other's baseline"

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[Rollout, dict]:
        sampled = self.sample_and_score(step)
        stats = sampled.stats
        flat = self.flat(sampled.scores)
        stats["flat_groups"] = flat.float().mean().item()  # no signal: all alike
        informative = None
        if self.ppo.dynamic_sampling > 1:
            sampled, informative, rounds = self.dynamic_sampling(step, sampled, flat)
            useful = informative.view(-1, self.group)[:, 0].float().mean().item()
            stats.update(sampling_rounds=rounds, informative_groups=useful)
        seq, attn, mask, P, _, logprobs, ref_logprobs, values, scores, _ = sampled
        advantages = rl.group_advantages(scores, self.group, scale=self.ppo.scale)  # (B,)
        kl = (torch.where(mask, logprobs - ref_logprobs, 0.0)).sum(1).mean().item()  # k1 per sequence, as PPO's
        stats = {"reward": stats.pop("reward"), "kl": kl, "kl_coef": self.ppo.beta, **stats}
        zeros = torch.zeros_like(logprobs)
        per_token = advantages[:, None].expand_as(logprobs).contiguous()
        return Rollout(seq, attn, mask, logprobs, ref_logprobs, values, zeros, per_token, zeros, scores, P,
                       None, informative), stats

    def flat(self, scores: torch.Tensor) -> torch.Tensor:
        """(groups,) bool: every response to the prompt scored the same (its advantages are all 0)."""
        groups = scores.view(-1, self.group)
        return (groups == groups[:, :1]).all(dim=1)

    def dynamic_sampling(self, step: int, first: Sampled, flat: torch.Tensor) -> tuple[Sampled, torch.Tensor, int]:
        """DAPO's dynamic sampling (Yu et al. 2025): while fewer than all of the iteration's groups differ
        in score, sample groups for other prompts (up to `dynamic_sampling` rollouts in all; every rank
        takes as many, since forwards may be collectives), keep the informative ones, and fill what is
        left with the first rollout's flat groups. Returns the batch, its rows' informative flags, rounds."""
        G, wanted = self.group, flat.numel()
        parts, found = [first], [(0, (~flat).nonzero().flatten())]
        count = int((~flat).sum())
        rounds = 1
        while rounds < self.ppo.dynamic_sampling and any_rank(count < wanted)[0]:
            extra = self.sample_and_score(step, extra_round=rounds)
            for key in ("time_generate_s", "time_score_s"):
                first.stats[key] += extra.stats[key]
            groups = (~self.flat(extra.scores)).nonzero().flatten()[:max(wanted - count, 0)]
            parts.append(extra)
            found.append((rounds, groups))
            count += groups.numel()
            rounds += 1
        if len(parts) == 1 and count == wanted:
            return first, torch.ones(first.scores.shape[0], dtype=torch.bool, device=first.scores.device), 1
        fill = flat.nonzero().flatten()[:wanted - count]  # the first rollout's flat groups, where too few differ
        picks = [(part, groups, True) for part, groups in found] + [(0, fill, False)]
        picks = [(part, (groups[:, None] * G + torch.arange(G, device=groups.device)).flatten(), useful)
                 for part, groups, useful in picks if groups.numel()]
        informative = torch.cat([torch.full((rows.numel(),), useful, dtype=torch.bool) for _, rows, useful in picks])
        batch = gather_rows(parts, [(part, rows) for part, rows, _ in picks], self.tokenizer.pad_id)
        return batch, informative.to(first.scores.device), rounds

    def minibatch_loss(self, data: Rollout, idx, logits, values) -> tuple[torch.Tensor, dict]:
        grpo, mask = self.ppo, data.mask[idx]
        logprobs = rl.token_logprobs(logits, data.sequences[idx, data.prompt_length:])
        out = rl.grpo_policy_loss(logprobs, data.logprobs[idx], data.advantages[idx, 0], mask,
                                  clip_low=grpo.clip_low, clip_high=grpo.clip_high, ref_logprobs=data.ref_logprobs[idx],
                                  beta=grpo.beta, length_norm=grpo.scale == "std", max_tokens=grpo.max_new_tokens,
                                  informative=None if data.informative is None else data.informative[idx])
        loss = out.loss
        if grpo.entropy_coef:
            loss = loss - grpo.entropy_coef * rl.masked_mean(rl.entropy_from_logits(logits), mask)
        return loss, {"policy_loss": out.policy_loss.item(), "kl_loss": out.kl.item(),
                      "clip_frac": out.clip_frac.item()}

    def start_rows(self) -> dict:
        rows = super().start_rows()
        rows.pop("critic init", None)
        rows["advantage"] = (f"group of {self.group}: (score − mean) / std" if self.ppo.scale == "std"
                             else f"group of {self.group}: score − mean (Dr. GRPO)")
        return rows


def run(cfg: DictConfig) -> Path:
    return run_online(cfg, GRPORecipe, GRPOConfig)
