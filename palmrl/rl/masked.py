"""Masked statistics over response tokens: mean, variance, whitening, explained variance.

Every RL tensor in palmrl is (B, N) over response tokens with a bool `mask` (B, N) that is True
on real tokens (up to and including EOS) and False on the padding after them. These helpers
reduce over the True positions only, in fp32, and never let a NaN/inf sitting in a masked slot
leak into the result (they select with `torch.where`, not multiply by the mask).

Whitening follows TRL / lm-human-preferences (`whiten`): Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593, and Huang et al. 2024, "The N+ implementation details of RLHF
with PPO", https://arxiv.org/abs/2403.17031.
"""

from __future__ import annotations

import torch
from torch import Tensor

WHITEN_EPS = 1e-8  # added to the variance before rsqrt, as in TRL and lm-human-preferences


def _select(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 copy of `x` with masked-out entries set to 0, and the mask as bool."""
    mask = mask.to(torch.bool)
    if x.shape != mask.shape:
        raise ValueError(f"tensor shape {tuple(x.shape)} does not match mask shape {tuple(mask.shape)}")
    return torch.where(mask, x.float(), 0.0), mask


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over True positions of `mask` (all of them, or along `dim`); 0 where none are True."""
    values, mask = _select(x, mask)
    if dim is None:
        return values.sum() / mask.sum().clamp(min=1)
    return values.sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over all True positions of `mask` (scalar).

    `unbiased` applies Bessel's correction n / (n - 1). With fewer than two True entries the
    variance is 0 (one value has no spread), so a tiny rollout batch never divides by zero.
    """
    values, mask = _select(x, mask)
    count = mask.sum()

    # centre over the masked set, then average the squares over the same set
    mean = values.sum() / count.clamp(min=1)
    centered = torch.where(mask, values - mean, 0.0)
    var = centered.pow(2).sum() / count.clamp(min=1)

    if unbiased:
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise `x` to unit (unbiased) variance over the mask; masked entries come back as 0.

    shift_mean=True also moves the mean to 0 (used for advantages); shift_mean=False keeps the
    original mean (used when whitening rewards, so their sign is preserved), as in TRL's `whiten`.
    """
    values, mask = _select(x, mask)
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=True)

    # scale the deviations; add the mean back if the caller keeps it
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)  # (B, N)


def explained_variance(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[target - pred] / Var[target] over the mask (scalar, detached).

    1 means the critic predicts the returns perfectly, 0 means it does no better than their mean,
    negative means worse. NaN when the targets have no variance (the ratio is undefined).
    """
    pred, target = pred.detach(), target.detach()
    target_var = masked_var(target, mask, unbiased=False)
    residual_var = masked_var(target.float() - pred.float(), mask, unbiased=False)
    return torch.where(target_var > 0, 1.0 - residual_var / target_var, float("nan"))  # no host sync
