"""PPO losses: clipped policy surrogate, clipped value loss, and the lucidrains reference variant.

The policy and value losses are PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347,
eq. 7) as used for RLHF by InstructGPT (https://arxiv.org/abs/2203.02155) and detailed in Huang et
al. 2024, "The N+ implementation details of RLHF with PPO" (https://arxiv.org/abs/2403.17031):
token-level losses averaged over every real response token of the minibatch, value clipping
around the rollout-time values, 0.5 * squared error. They match torchtune `rlhf/loss/ppo.py` and
TRL's `PPOTrainer` term for term.

`reference_variant_loss` is the simpler objective of lucidrains PaLM-rlhf-pytorch `ppo.py`
(`RLHFTrainer.learn`), kept for the `ppo.variant=reference` comparison; its docstring lists how it
differs from the PPO above.

Each function returns a NamedTuple: the scalar loss(es) with gradients, the rest detached fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from palmrl.rl.logprobs import entropy_from_logits, token_logprobs
from palmrl.rl.masked import explained_variance, masked_mean

REFERENCE_NORM_EPS = 1e-5  # lucidrains `masked_normalize`: the variance is clamped to at least this


class PolicyLoss(NamedTuple):
    loss: Tensor  # () clipped surrogate, mean over real tokens; has gradients
    clip_frac: Tensor  # () fraction of real tokens where the clipped term was the binding one
    approx_kl: Tensor  # () k3 estimate of KL(old || new): mean of (ratio - 1) - log ratio
    ratio_mean: Tensor  # () mean of pi_new / pi_old over real tokens


class ValueLoss(NamedTuple):
    loss: Tensor  # () 0.5 * max(unclipped, clipped) squared error, mean over real tokens; has gradients
    clip_frac: Tensor  # () fraction of real tokens where the clipped error was the larger
    explained_variance: Tensor  # () 1 - Var[returns - values] / Var[returns]


class ReferenceVariantLoss(NamedTuple):
    loss: Tensor  # () policy_loss + value_loss; has gradients
    policy_loss: Tensor  # () clipped surrogate minus entropy bonus (actor update); has gradients
    value_loss: Tensor  # () clipped squared error on the sequence reward (critic update); has gradients
    entropy: Tensor  # () mean over rows of each row's mean token entropy, nats
    kl: Tensor  # () mean over rows of each row's mean token KL(old || new), full vocabulary
    clip_frac: Tensor  # () fraction of real tokens where the clipped surrogate was the binding one


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_eps: float
) -> PolicyLoss:
    """Clipped surrogate: mean over real tokens of max(-A * ratio, -A * clip(ratio, 1 +- eps)).

    logprobs (B, N) from the policy being trained (with gradients); old_logprobs, advantages
    (B, N) from the rollout (treated as constants).
    """
    old_logprobs, advantages = old_logprobs.detach().float(), advantages.detach().float()

    # probability ratio pi_new / pi_old per token
    log_ratio = logprobs.float() - old_logprobs  # (B, N)
    ratio = log_ratio.exp()  # (B, N)

    # pessimistic (larger) of the unclipped and clipped losses
    unclipped = -advantages * ratio  # (B, N)
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)  # (B, N)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    with torch.no_grad():
        return PolicyLoss(
            loss=loss,
            clip_frac=masked_mean((clipped > unclipped).float(), mask),
            approx_kl=masked_mean((ratio - 1.0) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
        )


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_eps: float
) -> ValueLoss:
    """0.5 * mean over real tokens of max((V - R)^2, (clip(V, V_old +- eps) - R)^2).

    values (B, N) from the critic being trained (with gradients); old_values and returns (B, N)
    from the rollout (treated as constants).
    """
    old_values, returns = old_values.detach().float(), returns.detach().float()
    values = values.float()

    # keep the new value within eps of the rollout value, and take the larger error
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)  # (B, N)
    unclipped_error = (values - returns).pow(2)  # (B, N)
    clipped_error = (clipped_values - returns).pow(2)  # (B, N)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)

    with torch.no_grad():
        return ValueLoss(
            loss=loss,
            clip_frac=masked_mean((clipped_error > unclipped_error).float(), mask),
            explained_variance=explained_variance(values, returns, mask),
        )


def reference_variant_loss(
    logits: Tensor,
    old_logits: Tensor,
    actions: Tensor,
    scores: Tensor,
    values: Tensor,
    old_values: Tensor,
    mask: Tensor,
    *,
    clip_eps: float,  # lucidrains eps_clip = 0.2
    value_clip: float,  # lucidrains value_clip = 0.4
    kl_coef: float,  # lucidrains kl_div_loss_weight = 0.1
    entropy_coef: float,  # lucidrains beta_s = 0.01
) -> ReferenceVariantLoss:
    """The objective of lucidrains PaLM-rlhf-pytorch `RLHFTrainer.learn`, as a pure function.

    Inputs: logits (B, N, V) of the policy being trained at the response positions (with
    gradients); old_logits (B, N, V) of the same positions at rollout time; actions (B, N) the
    sampled response tokens; scores (B,) reward-model scores; values (B,) the critic's pooled
    value per sequence (with gradients) and old_values (B,) at rollout time (lucidrains'
    default `critic_pooled_values=True`: with a linear value head this equals the masked mean of
    per-token values); mask (B, N).

    Per minibatch:
      kl_b   = mean over row b's tokens of KL(pi_old || pi_new) over the full vocabulary
      R_b    = score_b - kl_coef * kl_b
      A_b    = normalize(R_b - old_value_b) over the minibatch (biased var, clamped to >= 1e-5)
      policy = mean over tokens of -min(ratio * A_b, clip(ratio, 1 +- eps) * A_b)
               - entropy_coef * entropy
      value  = mean over rows of max((V_b - R_b)^2, (clip(V_b, old_b +- value_clip) - R_b)^2)

    How it differs from palmrl's InstructGPT PPO (`shaped_rewards` + `gae` + `ppo_*_loss`):
      - the KL is against the previous (rollout) policy, not the frozen SFT reference, so nothing
        anchors the policy to the SFT model; it is recomputed from the current policy each
        minibatch (0 on the first minibatch of the first epoch) and its gradient flows into the
        policy loss through the advantages, as upstream;
      - one reward per sequence: no per-token KL reward, no GAE, no discounting; the advantage is
        reward minus a single pooled value, normalised across the minibatch (a minibatch of one
        sequence therefore has advantage 0);
      - the critic regresses the KL-shaped sequence reward, with no 0.5 factor;
      - KL and entropy are full-vocabulary exact values, not sampled-token estimates.
    Two deliberate departures from the upstream code, both bugs there:
      - upstream `masked_entropy` returns sum(p log p), i.e. minus the entropy, so its
        `- beta_s * entropies` penalises entropy; here the entropy is positive and is a bonus;
      - upstream averages the policy loss over padded positions after EOS too; here only real
        tokens count.
    """
    mask = mask.to(torch.bool)

    # current and rollout log-probs of the sampled tokens, and the ratio between them
    logprobs = token_logprobs(logits, actions)  # (B, N)
    old_logprobs = token_logprobs(old_logits.detach(), actions)  # (B, N)
    ratio = (logprobs - old_logprobs).exp()  # (B, N)

    # entropy and full-vocabulary KL(old || new): token mean per row, then mean over rows
    entropy = masked_mean(entropy_from_logits(logits), mask, dim=1).mean()  # ()
    kl_per_row = masked_mean(_full_vocab_kl(old_logits.detach(), logits), mask, dim=1)  # (B,)

    # sequence reward, and its advantage over the rollout value normalised across the minibatch
    rewards = scores.float() - kl_coef * kl_per_row  # (B,)
    advantages = rewards - old_values.detach().float()  # (B,)
    centered = advantages - advantages.mean()
    advantages = centered * centered.pow(2).mean().clamp(min=REFERENCE_NORM_EPS).rsqrt()  # (B,)
    advantages = advantages.unsqueeze(1)  # (B, 1)

    # clipped surrogate with an entropy bonus (the actor's loss)
    surrogate = ratio * advantages  # (B, N)
    clipped_surrogate = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages  # (B, N)
    policy_loss = masked_mean(-torch.minimum(surrogate, clipped_surrogate), mask) - entropy_coef * entropy

    # clipped value regression on the detached sequence reward (the critic's loss)
    targets = rewards.detach()  # (B,)
    values, old_values = values.float(), old_values.detach().float()
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)  # (B,)
    value_loss = torch.maximum((clipped_values - targets).pow(2), (values - targets).pow(2)).mean()

    with torch.no_grad():
        clip_frac = masked_mean((clipped_surrogate < surrogate).float(), mask)
    return ReferenceVariantLoss(
        loss=policy_loss + value_loss,
        policy_loss=policy_loss,
        value_loss=value_loss,
        entropy=entropy.detach(),
        kl=kl_per_row.detach().mean(),
        clip_frac=clip_frac,
    )


def _full_vocab_kl(old_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(old) || softmax(new)) at every position: (B, N, V) x2 -> (B, N) fp32."""
    rows = []
    for old_row, new_row in zip(old_logits, logits):
        # one row in fp32 at a time, as in logprobs.py; clamping turns 0 * -inf into 0
        old_logp = torch.log_softmax(old_row.float(), dim=-1).clamp(min=torch.finfo(torch.float32).min)  # (N, V)
        new_logp = torch.log_softmax(new_row.float(), dim=-1).clamp(min=torch.finfo(torch.float32).min)  # (N, V)
        rows.append((old_logp.exp() * (old_logp - new_logp)).sum(dim=-1))  # (N,)
    return torch.stack(rows)  # (B, N)


class GRPOLoss(NamedTuple):
    loss: Tensor  # () clipped surrogate + beta * KL to the reference; has gradients
    policy_loss: Tensor  # () the clipped surrogate alone
    kl: Tensor  # () mean per-token k3 KL(pi || ref) over real tokens (0 without a reference)
    clip_frac: Tensor  # () fraction of real tokens where the clipped term was the binding one


def grpo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float,
    clip_high: float, ref_logprobs: Tensor | None = None, beta: float = 0.0, length_norm: bool = True,
    max_tokens: int | None = None, informative: Tensor | None = None,
) -> GRPOLoss:
    """GRPO's objective (Shao et al. 2024) as a loss to minimise.

    logprobs (B, N) with gradients; old_logprobs, ref_logprobs (B, N) and advantages (B,) are
    constants. Per token: max(-A·ratio, -A·clip(ratio, 1 - clip_low, 1 + clip_high)) (separate
    bounds: DAPO's clip-higher) + beta·k3(pi, ref). `length_norm=True` averages each sequence's tokens,
    then the sequences (GRPO); False sums each sequence's tokens and divides by the constant
    `max_tokens` (Dr. GRPO: a long wrong answer is not penalised less per token than a short one).
    `informative` (B,) bool (DAPO's dynamic sampling): the policy term is averaged over these rows
    only, so the rows of groups that all scored alike (advantage 0, nothing to learn) do not dilute
    it; the KL term still covers every row. A minibatch without one informative row has no policy term.
    """
    mask = mask.to(torch.bool)
    old_logprobs, advantages = old_logprobs.detach().float(), advantages.detach().float()[:, None]
    log_ratio = logprobs.float() - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)  # (B, N)
    if ref_logprobs is not None and beta > 0:
        ref_log_ratio = ref_logprobs.detach().float() - logprobs.float()
        kl = torch.expm1(ref_log_ratio) - ref_log_ratio  # k3: exp(ref - lp) - 1 - (ref - lp) >= 0
    else:
        kl = torch.zeros_like(per_token)
    total = per_token + beta * kl

    def reduce(x: Tensor, rows: Tensor | None = None) -> Tensor:
        x = torch.where(mask, x, 0.0)
        if length_norm:
            per_row = x.sum(1) / mask.sum(1).clamp(min=1)
        else:
            if not max_tokens:
                raise ValueError("grpo_policy_loss: length_norm=False needs max_tokens")
            per_row = x.sum(1) / max_tokens
        if rows is None:
            return per_row.mean()
        return torch.where(rows, per_row, 0.0).sum() / rows.sum().clamp(min=1)

    rows = None if informative is None or bool(informative.all()) else informative.to(torch.bool)
    if rows is None:  # every row informative: the plain mean (bit for bit what GRPO always computed)
        loss = reduce(total)
    else:
        loss = reduce(per_token, rows) + beta * reduce(kl)
    with torch.no_grad():
        return GRPOLoss(loss=loss, policy_loss=reduce(per_token, rows), kl=masked_mean(kl, mask),
                        clip_frac=masked_mean((clipped > unclipped).float(), mask))


DPO_LOSSES = ("sigmoid", "ipo", "simpo")


class DPOLoss(NamedTuple):
    loss: Tensor  # () mean over pairs; has gradients
    chosen_rewards: Tensor  # (B,) implicit reward of the chosen reply (no gradients)
    rejected_rewards: Tensor  # (B,) of the rejected reply
    accuracy: Tensor  # () share of pairs whose chosen reward is the higher
    margin: Tensor  # () mean chosen - rejected implicit reward


def dpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None,
    *, kind: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None, simpo_gamma: float = 0.5,
) -> DPOLoss:
    """Preference losses on summed response log-probs (B,) of the policy (with gradients) and the reference.

    sigmoid (DPO, Rafailov et al. 2023): -log σ(β·h), h = (log π/π_ref)(chosen) - (log π/π_ref)(rejected);
      with label smoothing ε (conservative DPO): -(1-ε)·log σ(β·h) - ε·log σ(-β·h).
    ipo (Azar et al. 2023): (h - 1/(2β))², a target margin instead of an ever-growing one.
    simpo (Meng et al. 2024): reference-free, length-normalised: -log σ(β·(ℓc/|c| - ℓr/|r|) - γ),
      γ = simpo_gamma (the target margin); needs the response lengths.
    The implicit reward of a reply is β·log π/π_ref (simpo: β·ℓ/|y|).
    """
    if kind not in DPO_LOSSES:
        raise ValueError(f"dpo loss kind must be one of {', '.join(DPO_LOSSES)}, got {kind!r}")
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    if kind == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("simpo needs chosen_lengths and rejected_lengths")
        chosen = beta * chosen_logps / chosen_lengths.float().clamp(min=1)
        rejected = beta * rejected_logps / rejected_lengths.float().clamp(min=1)
        logits = chosen - rejected - simpo_gamma
        loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"{kind} needs the reference log-probs")
        chosen = beta * (chosen_logps - ref_chosen_logps.float())
        rejected = beta * (rejected_logps - ref_rejected_logps.float())
        h = (chosen - rejected) / beta
        if kind == "sigmoid":
            loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        else:
            loss = (h - 1 / (2 * beta)).pow(2)
    chosen, rejected = chosen.detach(), rejected.detach()
    return DPOLoss(loss=loss.mean(), chosen_rewards=chosen, rejected_rewards=rejected,
                   accuracy=(chosen > rejected).float().mean(), margin=(chosen - rejected).mean())
