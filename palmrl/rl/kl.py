"""KL estimators between the policy and the frozen reference, and the KL-coefficient controllers.

Per-token estimators of KL(pi || ref) from samples of pi, with log r = ref_logprob - logprob
(Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):
  k1 = -log r = logprob - ref_logprob            unbiased, high variance, can be negative
  k2 = (log r)^2 / 2                             biased, low variance, >= 0
  k3 = (r - 1) - log r                           unbiased, low variance, >= 0
  abs = |logprob - ref_logprob|                  >= 0, used by some RLHF codebases
InstructGPT (https://arxiv.org/abs/2203.02155) puts k1 into the per-token reward.

The adaptive controller is Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593, section 2.2;
lm-human-preferences `AdaptiveKLController`): it nudges the coefficient so the measured KL tracks
a target, by at most 20% per `horizon` steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3", "abs")
ADAPTIVE_ERROR_CLIP = 0.2  # Ziegler et al.: the proportional error is clipped to +-20%


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL estimate (B, N) fp32 of `kind` in KL_KINDS; k1 is the InstructGPT default."""
    log_ratio = logprobs.float() - ref_logprobs.float()  # log pi - log ref, (B, N)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # exp(ref - lp) - 1 - (ref - lp), stable near 0
    if kind == "abs":
        return log_ratio.abs()
    raise ValueError(f"KL estimator kind={kind!r} is not one of {', '.join(KL_KINDS)}")


class AdaptiveKLController:
    """KL coefficient that tracks `target` KL (Ziegler et al. 2019).

    After each rollout batch: error = clip(kl / target - 1, -0.2, 0.2), then
    value *= 1 + error * n_steps / horizon. `current_kl` should be the same quantity as `target`
    (palmrl reports and targets the per-sequence summed KL, `RewardShaping.mean_kl`).
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"kl init_kl_coef must be >= 0 (got {init_kl_coef})")
        if target <= 0:
            raise ValueError(f"kl target must be > 0 (got {target})")
        if horizon <= 0:
            raise ValueError(f"kl horizon must be > 0 (got {horizon})")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient toward the target after `n_steps` samples; returns the new value."""
        error = min(max(float(current_kl) / self.target - 1.0, -ADAPTIVE_ERROR_CLIP), ADAPTIVE_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient for an exact resume; target and horizon stay as configured."""
        _check_kind(state, self.kind)
        self.value = float(state["value"])


class FixedKLController:
    """KL coefficient that never changes; same interface as AdaptiveKLController."""

    kind = "fixed"

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl kl_coef must be >= 0 (got {kl_coef})")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])


def _check_kind(state: dict[str, Any], expected: str) -> None:
    if state.get("kind") != expected:
        found = state.get("kind")
        raise ValueError(f"checkpoint holds a {found!r} KL controller but the config asks for {expected!r}")
