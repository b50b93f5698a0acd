"""RL math for PPO-based RLHF: pure functions of tensors, no models and no I/O.

Conventions: response tensors are (B, N) with a bool `mask` (B, N), True on real response tokens
(up to and including EOS) and False on the padding after them; every reduction is over True
positions only; math is fp32 whatever the input dtype.

  logprobs.py    token_logprobs, entropy_from_logits
  masked.py      masked_mean, masked_var, masked_whiten, explained_variance
  kl.py          kl_penalty (k1/k2/k3/abs), AdaptiveKLController, FixedKLController
  advantages.py  sequence_scores (no-eos penalty, clip), shaped_rewards (InstructGPT per-token KL
                 reward + score), gae, leave_one_out
  losses.py      ppo_policy_loss, ppo_value_loss, reference_variant_loss (lucidrains objective),
                 grpo_policy_loss (GRPO / Dr. GRPO), dpo_loss (DPO sigmoid, IPO, SimPO)
  advantages.py  also group_advantages (GRPO's group-relative scores)

A PPO step, as InstructGPT / Huang et al. 2024 (https://arxiv.org/abs/2403.17031) do it:
  rollout:  shaping = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=ctl.value)
            adv = gae(shaping.rewards, values, mask, gamma=..., lam=...)
            advantages = masked_whiten(adv.advantages, mask)
            ctl.update(shaping.mean_kl.item(), n_steps=batch_size)
  epochs:   ppo_policy_loss(new_logprobs, logprobs, advantages, mask, clip_eps=...)
            ppo_value_loss(new_values, values, adv.returns, mask, clip_eps=...)
            entropy bonus: masked_mean(entropy_from_logits(logits), mask)
"""

from palmrl.rl.advantages import (
    Advantages,
    RewardShaping,
    SequenceScores,
    gae,
    group_advantages,
    last_true_index,
    leave_one_out,
    sequence_scores,
    shaped_rewards,
)
from palmrl.rl.kl import KL_KINDS, AdaptiveKLController, FixedKLController, kl_penalty
from palmrl.rl.logprobs import entropy_from_logits, token_logprobs
from palmrl.rl.losses import (
    DPO_LOSSES,
    DPOLoss,
    GRPOLoss,
    PolicyLoss,
    ReferenceVariantLoss,
    ValueLoss,
    dpo_loss,
    grpo_policy_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reference_variant_loss,
)
from palmrl.rl.masked import explained_variance, masked_mean, masked_var, masked_whiten

__all__ = [
    "DPO_LOSSES",
    "KL_KINDS",
    "AdaptiveKLController",
    "Advantages",
    "DPOLoss",
    "GRPOLoss",
    "FixedKLController",
    "PolicyLoss",
    "ReferenceVariantLoss",
    "RewardShaping",
    "SequenceScores",
    "ValueLoss",
    "entropy_from_logits",
    "explained_variance",
    "dpo_loss",
    "gae",
    "group_advantages",
    "grpo_policy_loss",
    "leave_one_out",
    "kl_penalty",
    "last_true_index",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reference_variant_loss",
    "sequence_scores",
    "shaped_rewards",
    "token_logprobs",
]
