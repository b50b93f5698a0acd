"""Per-token rewards with a KL penalty, and generalised advantage estimation (GAE).

InstructGPT (https://arxiv.org/abs/2203.02155, eq. 2) maximises
    r_theta(x, y) - beta * log(pi(y|x) / pi_SFT(y|x)),
spread over tokens as in lm-human-preferences / TRL / torchtune: every response token gets the
reward -beta * KL_t, and the reward model's score is added at the row's last real token (the EOS,
or the last token of a truncated response). GAE is Schulman et al. 2015,
https://arxiv.org/abs/1506.02438; the episode ends after the last real token, so the value beyond
it is 0. See Huang et al. 2024, https://arxiv.org/abs/2403.17031, for the details followed here.

Everything returned is detached fp32: rewards, advantages and returns are fixed targets for the
PPO epochs that follow a rollout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from palmrl.rl.kl import kl_penalty


class RewardShaping(NamedTuple):
    """Per-token rewards for one rollout batch (all detached fp32)."""

    rewards: Tensor  # (B, N) -kl_coef * kl, plus the score at each row's last real token; 0 on padding
    kl: Tensor  # (B, N) per-token KL estimate, unscaled; 0 on padding
    mean_kl: Tensor  # () mean over rows of the per-sequence SUM of `kl` (what the KL target refers to)
    non_score_reward: Tensor  # (B,) per-sequence sum of -kl_coef * kl
    scores: Tensor  # (B,) the scores actually added, after `score_clip`


class SequenceScores(NamedTuple):
    """One score per response (fp32), in the order PPO applies the steps."""

    penalised: Tensor  # (B,) the scores plus the missing-eos penalty: what PPO reports as `reward`
    clipped: Tensor  # (B,) `penalised` clamped to [-clip, clip]: what the last real token receives


class Advantages(NamedTuple):
    """GAE output (all detached fp32; 0 on padding)."""

    advantages: Tensor  # (B, N) GAE(gamma, lam) advantages, not whitened
    returns: Tensor  # (B, N) advantages + values: the critic's regression target


def last_true_index(mask: Tensor) -> Tensor:
    """Index of each row's last True position: (B, N) bool -> (B,) long. Every row needs one."""
    mask = mask.to(torch.bool)
    empty = ~mask.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"response rows {rows} have no real token (mask all False); every response needs >= 1")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=1)  # (B,)


@torch.no_grad()
def shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    kl_kind: str = "k1",  # InstructGPT's per-token log-ratio
    score_clip: float | None = None,  # None keeps raw scores; a value clips them to [-clip, clip]
) -> RewardShaping:
    """Per-token reward = -kl_coef * KL_t, with the (clipped) score at each row's last real token.

    scores (B,) reward-model scores; logprobs / ref_logprobs (B, N) of the sampled response
    tokens under the policy (at rollout time) and the frozen reference; mask (B, N).
    """
    mask = mask.to(torch.bool)
    if scores.shape != (mask.shape[0],):
        raise ValueError(f"scores shape {tuple(scores.shape)} should be ({mask.shape[0]},)")

    # per-token KL penalty, zero on padding
    kl = torch.where(mask, kl_penalty(logprobs, ref_logprobs, kl_kind), 0.0)  # (B, N)
    non_score = -kl_coef * kl  # (B, N)

    # the score lands on the last real token only
    scores = scores.float()
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards = non_score.clone()
    rewards[rows, last_true_index(mask)] += scores  # (B, N)

    return RewardShaping(
        rewards=rewards,
        kl=kl,
        mean_kl=kl.sum(dim=1).mean(),
        non_score_reward=non_score.sum(dim=1),
        scores=scores,
    )


@torch.no_grad()
def sequence_scores(
    scores: Tensor,
    ended: Tensor,
    *,
    missing_eos_penalty: float | None = None,  # None adds nothing; a value is added to rows that did not end
    clip: float | None = None,  # None keeps the scores; a value clamps them to [-clip, clip]
) -> SequenceScores:
    """Scores (B,) (a reward model's, already normalised, or a reward function's) plus
    `missing_eos_penalty` where `ended` (B,) bool is False (a response cut at the token budget),
    then clipped. The penalty tensor lives on `ended`'s device; the result on `scores`'s.
    """
    scores = scores.float()
    if ended.shape != scores.shape:
        raise ValueError(f"ended shape {tuple(ended.shape)} should be {tuple(scores.shape)}")

    # the penalty lands on responses without eos; 0.0 leaves the others as they were
    if missing_eos_penalty is not None:
        scores = scores + torch.where(ended.to(torch.bool), 0.0, float(missing_eos_penalty)).to(scores.device)
    clipped = scores.clamp(-clip, clip) if clip is not None else scores
    return SequenceScores(penalised=scores, clipped=clipped)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> Advantages:
    """Generalised advantage estimates over response tokens.

    rewards, values (B, N); values[:, t] is the critic's estimate before emitting token t. With
    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where
    V_{t+1} = 0 and A_{t+1} = 0 past the last real token (the episode ends there). Padding is
    ignored whatever it holds and gets advantage 0 and return 0.
    """
    mask = mask.to(torch.bool)
    rewards = torch.where(mask, rewards.float(), 0.0)
    values = torch.where(mask, values.float(), 0.0)

    # sweep backwards; a masked step contributes nothing and cuts the recursion
    batch, length = rewards.shape
    next_value = torch.zeros(batch, device=rewards.device)
    next_advantage = torch.zeros(batch, device=rewards.device)
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(mask[:, t], delta + gamma * lam * next_advantage, 0.0)
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage

    returns = torch.where(mask, advantages + values, 0.0)
    return Advantages(advantages=advantages, returns=returns)


def leave_one_out(scores: Tensor, group: int) -> Tensor:
    """RLOO baseline (Kool et al. 2019; Ahmadian et al. 2024): each score minus the mean of the
    other `group - 1` samples of the same prompt.

    scores (B,) with each prompt's samples adjacent (B a multiple of `group`). The baseline never
    sees the sample it judges, so the estimate stays unbiased; the prompt's own level (a reward
    model scoring one prompt's answers all high) cancels, which a learned critic only approximates.
    """
    if group < 2 or scores.shape[0] % group:
        raise ValueError(f"leave_one_out needs groups of at least 2 that divide the batch, "
                         f"got {group} for {scores.shape[0]}")
    g = scores.float().view(-1, group)
    return (g - (g.sum(1, keepdim=True) - g) / (group - 1)).reshape(-1)


GROUP_STD_EPS = 1e-4  # a group whose samples all scored alike has std 0: its advantages are 0, not NaN


def group_advantages(scores: Tensor, group: int, *, scale: str = "std") -> Tensor:
    """GRPO's advantage (Shao et al. 2024, DeepSeekMath): each score minus its prompt group's mean,
    divided by the group's std (`scale="std"`), or not divided (`scale="none"`: Dr. GRPO, Liu et al.
    2025, which finds the std division weights too-easy and too-hard prompts up).

    scores (B,) with each prompt's `group` samples adjacent; returns (B,) fp32.
    """
    if group < 2 or scores.shape[0] % group:
        raise ValueError(f"group_advantages needs groups of at least 2 that divide the batch, "
                         f"got {group} for {scores.shape[0]}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    g = scores.float().view(-1, group)
    centred = g - g.mean(1, keepdim=True)
    if scale == "std":
        centred = centred / (g.std(1, keepdim=True) + GROUP_STD_EPS)
    return centred.reshape(-1)
