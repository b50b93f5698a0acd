"""`palmrl ppo`: RLHF with PPO as in InstructGPT (https://arxiv.org/abs/2203.02155) and
"The N+ implementation details of RLHF with PPO" (Huang et al., 2024).

One iteration: sample responses to a batch of prompts with the KV cache → score them (reward model
at the last token, or a Python `reward_fn`) → per-token reward = −β·KL(actor ‖ frozen SFT
reference) plus the score at the last token → GAE → several epochs of clipped policy + value
updates over minibatches.

`PPOConfig` is the `ppo:` section, checked once; `PPORecipe` is the online RLHF recipe of
palmrl/rlhf.py (models, LoRA scopes, sampling, scoring, evaluation, checkpoints; GRPO shares it)
with PPO's advantages (GAE over a critic, or RLOO) and losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from omegaconf import DictConfig
from torch import Tensor

from palmrl import rl
from palmrl.config import Invalid
from palmrl.rlhf import OnlineRecipe, Rollout, run_online


@dataclass(frozen=True)
class PPOConfig:
    """The `ppo:` section of configs/ppo.yaml, typed and checked once at the stage's boundary."""

    variant: Literal["standard", "reference"] = "standard"  # reference: lucidrains' objective, only for comparison
    rollout_batch: int = 128            # responses per iteration per rank
    samples_per_prompt: int = 4         # contrasting a prompt's responses is the strongest signal a binary reward gives
    minibatch: int = 32                 # sequences per optimizer step
    epochs: int = 2                     # passes over each rollout batch
    max_new_tokens: int = 16            # response budget (task answers are short)
    temperature: float = 1.0            # 1.0 samples the policy's own distribution
    top_k: int = 0                      # 0 disables; truncation makes log-probs off-policy
    top_p: float = 1.0                  # 1.0 disables, for the same reason
    kl_coef: float = 0.1                # β (initial value when adaptive); higher resists hacking a weak reward model
    kl_target: float | None = None      # a target KL (nats per sequence) turns on the adaptive controller
    kl_horizon: int = 10000             # adaptive controller horizon, in sequences
    kl_kind: str = "k1"                 # per-token KL estimator, one of rl.KL_KINDS; k1 is InstructGPT's
    advantage: Literal["gae", "rloo"] = "gae"  # gae: learned critic (InstructGPT); rloo: leave-one-out, no critic
    gamma: float = 1.0                  # no discount: the episode is one short response
    lam: float = 0.95                   # GAE λ
    clip_eps: float = 0.2               # policy ratio clip (Schulman et al. 2017)
    value_clip: float = 0.2             # value prediction clip around the rollout values
    vf_coef: float = 0.1                # weight of the value loss
    entropy_coef: float = 0.0           # entropy bonus weight; the KL penalty already keeps the policy from collapsing
    whiten_advantages: bool = True      # zero mean / unit variance advantages per rollout batch
    normalise_scores: bool = True       # reward-model scores over the RM's held-out distribution
    score_clip: float | None = 5.0      # clip (normalised) scores to ±score_clip; null disables
    missing_eos_penalty: float | None = -1.0  # added to the score of a response cut without eos; null disables
    critic_init: Literal["reward", "policy"] = "reward"  # reward: value scope and head from the RM (InstructGPT)
    max_kl: float = 25.0                # stop (keeping the last good checkpoint) past this mean KL per sequence
    gather_for_rollout: bool = True     # ZeRO-3: weights gathered once per rollout instead of per forward

    def __post_init__(self):
        for key in ("rollout_batch", "minibatch", "epochs", "max_new_tokens", "samples_per_prompt"):
            if getattr(self, key) < 1:
                raise Invalid(key, f"must be >= 1, got {getattr(self, key)}")
        if self.rollout_batch % self.minibatch:
            raise Invalid("rollout_batch", f"must be a multiple of ppo.minibatch ({self.minibatch}), "
                                           f"got {self.rollout_batch}")
        if self.rollout_batch % self.samples_per_prompt:
            raise Invalid("samples_per_prompt", f"must divide ppo.rollout_batch ({self.rollout_batch}), "
                                                f"got {self.samples_per_prompt}")
        if self.advantage == "rloo" and self.samples_per_prompt < 2:  # a leave-one-out baseline needs another sample
            raise Invalid("samples_per_prompt", f"must be >= 2 with ppo.advantage=rloo, got {self.samples_per_prompt}")
        if self.advantage == "rloo" and self.variant != "standard":
            raise Invalid("variant", f"must be standard with ppo.advantage=rloo, got '{self.variant}'")
        if self.kl_kind not in rl.KL_KINDS:
            raise Invalid("kl_kind", f"must be one of {', '.join(rl.KL_KINDS)}, got '{self.kl_kind}'")
        for key in ("kl_coef", "temperature", "top_k", "vf_coef"):
            if getattr(self, key) < 0:
                raise Invalid(key, f"must be >= 0, got {getattr(self, key)}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise Invalid("kl_target", f"must be > 0 (or null for a fixed coefficient), got {self.kl_target}")
        if self.kl_horizon <= 0:
            raise Invalid("kl_horizon", f"must be > 0, got {self.kl_horizon}")
        if not 0 < self.top_p <= 1:
            raise Invalid("top_p", f"must be in (0, 1], got {self.top_p}")
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                raise Invalid(key, f"must be in [0, 1], got {getattr(self, key)}")
        for key in ("clip_eps", "value_clip", "score_clip", "max_kl"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise Invalid(key, f"must be > 0, got {getattr(self, key)}")

    @property
    def rloo(self) -> bool:
        return self.advantage == "rloo"

    @property
    def updates_per_iter(self) -> int:
        return self.epochs * (self.rollout_batch // self.minibatch)


def run(cfg: DictConfig) -> Path:
    return run_online(cfg, PPORecipe, PPOConfig)


class PPORecipe(OnlineRecipe):
    """InstructGPT's PPO on the shared recipe: per-token KL in the reward, GAE over a critic (or RLOO)."""

    stage = "ppo"

    @property
    def critic(self) -> bool:
        """A learned value function (GAE); rloo uses the prompt's other samples instead."""
        return not self.ppo.rloo

    @property
    def group(self) -> int:
        """Responses sampled per prompt (adjacent in the rollout)."""
        return self.ppo.samples_per_prompt

    def kl_controller(self):
        ppo = self.ppo
        return (rl.AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
                if ppo.kl_target is not None else rl.FixedKLController(ppo.kl_coef))

    def kl_description(self) -> str:
        ppo = self.ppo
        return f"adaptive, target {ppo.kl_target}" if ppo.kl_target is not None else f"fixed β={ppo.kl_coef}"

    def critic_note(self) -> str:
        return f"none: leave-one-out baseline over {self.group} samples per prompt (ppo.advantage=rloo)"

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[Rollout, dict]:
        """Sample, score, shape rewards and compute advantages for this iteration's prompts."""
        ppo = self.ppo
        seq, attn, mask, P, logits, logprobs, ref_logprobs, values, scores, stats = self.sample_and_score(step)

        # per-token rewards and advantages: GAE over the critic, or the prompt's other samples as baseline
        if ppo.rloo:  # the return is the leave-one-out score plus the KL-to-go
            shaped = rl.shaped_rewards(rl.leave_one_out(scores, self.group), logprobs, ref_logprobs, mask,
                                       kl_coef=self.kl_ctl.value, kl_kind=ppo.kl_kind)
            adv = rl.gae(shaped.rewards, torch.zeros_like(values), mask, gamma=1.0, lam=1.0)
        else:
            shaped = rl.shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=self.kl_ctl.value,
                                       kl_kind=ppo.kl_kind)
            adv = rl.gae(shaped.rewards, values, mask, gamma=ppo.gamma, lam=ppo.lam)
        advantages = rl.masked_whiten(adv.advantages, mask) if ppo.whiten_advantages else adv.advantages
        stats = {"reward": stats.pop("reward"), "kl": shaped.mean_kl.item(), "kl_coef": self.kl_ctl.value, **stats}
        old_logits = logits if ppo.variant == "reference" else None  # (B, N, V): the response's
        return Rollout(seq, attn, mask, logprobs, ref_logprobs, values, shaped.rewards, advantages,
                       adv.returns, scores, P, old_logits), stats

    def minibatch_loss(self, data: Rollout, idx: Tensor, logits: Tensor, values: Tensor) -> tuple[Tensor, dict]:
        if self.ppo.variant == "reference":
            return self.reference_minibatch_loss(data, idx, logits, values)
        return self.standard_minibatch_loss(data, idx, logits, values)

    def standard_minibatch_loss(self, data: Rollout, idx: Tensor, logits: Tensor,
                                values: Tensor) -> tuple[Tensor, dict]:
        """Clipped policy loss − entropy bonus (+ clipped value loss with a critic); logits (b, N, V), values (b, N)."""
        ppo, mask = self.ppo, data.mask[idx]
        logprobs = rl.token_logprobs(logits, data.sequences[idx, data.prompt_length:])
        pol = rl.ppo_policy_loss(logprobs, data.logprobs[idx], data.advantages[idx], mask, clip_eps=ppo.clip_eps)
        loss = pol.loss
        if ppo.entropy_coef:  # (off, its softmax over the vocabulary and that softmax's backward cost ~5% of an update)
            loss = loss - ppo.entropy_coef * rl.masked_mean(rl.entropy_from_logits(logits), mask)
        parts = {"policy_loss": pol.loss.item(), "clip_frac": pol.clip_frac.item(), "approx_kl": pol.approx_kl.item()}
        if self.critic:
            val = rl.ppo_value_loss(values, data.values[idx], data.returns[idx], mask, clip_eps=ppo.value_clip)
            loss = loss + ppo.vf_coef * val.loss
            parts.update(value_loss=val.loss.item(), explained_variance=val.explained_variance.item())
        return loss, parts

    def reference_minibatch_loss(self, data: Rollout, idx: Tensor, logits: Tensor,
                                 values: Tensor) -> tuple[Tensor, dict]:
        """lucidrains' objective (ppo.variant=reference) for comparison; see rl.reference_variant_loss."""
        ppo, mask = self.ppo, data.mask[idx]
        out = rl.reference_variant_loss(logits, data.old_logits[idx], data.sequences[idx, data.prompt_length:],
                                        data.scores[idx], rl.masked_mean(values, mask, dim=1),
                                        rl.masked_mean(data.values[idx], mask, dim=1), mask, clip_eps=ppo.clip_eps,
                                        value_clip=ppo.value_clip, kl_coef=ppo.kl_coef, entropy_coef=ppo.entropy_coef)
        return out.loss, {"policy_loss": out.policy_loss.item(), "value_loss": out.value_loss.item(),
                          "clip_frac": out.clip_frac.item(), "entropy": out.entropy.item()}
