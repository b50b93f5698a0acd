"""Next-token cross-entropy from hidden states, without the full fp32 (B, T, V) logits.

`logits = hidden @ weightᵀ` then `F.cross_entropy(logits.float())` keeps a (B·T, V) fp32 copy for the
backward pass: 10 GB at 80k tokens per rank with a 32k vocabulary, 84 GB at 256k. Here the rows go
through in chunks of `chunk_rows`; each chunk's logits are made, turned into the loss and into the
gradients of `hidden` and `weight` right away (softmax − one-hot), and freed. What stays for the
backward pass is grad_hidden (B·T, D) and grad_weight (V, D), which the backward only scales: the
same matmul work as the plain path, no recomputation.

Up to one chunk of rows the plain path runs, so small batches (the CPU demo) are computed exactly
as before.

Rows whose target is `ignore_index` (an SFT prompt, padding) are dropped before the output
projection: their logits would be made and thrown away, and with a vocabulary larger than the
model's width that projection is most of a small model's work (palm_tiny's SFT, ~5 counted tokens
in a 40-token row: the step's forward and backward went from ~70 to ~39 ms). Finding them costs a
host sync on a GPU; `ignore_index=None` says every row counts (pretraining) and skips it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ELEMENTS = 2**28  # fp32 logits per chunk: 1 GiB (8k rows at a 32k vocabulary, 1k at 256k)


def chunk_rows_for(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int | None = -100,
                  chunk_rows: int | None = None) -> Tensor:
    """Mean cross-entropy of `targets` under logits `hidden @ weightᵀ`, computed in fp32.

    hidden (..., D), weight (V, D), targets (...) long -> scalar; rows whose target is
    `ignore_index` count for nothing (as in F.cross_entropy) and are never projected; with
    `ignore_index=None` every row counts."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if ignore_index is not None:
        counted = (targets != ignore_index).nonzero().squeeze(1)
        if len(counted) < len(targets):
            hidden, targets = hidden.index_select(0, counted), targets.index_select(0, counted)
    ignore_index = -100 if ignore_index is None else ignore_index
    chunk = chunk_rows or chunk_rows_for(weight.shape[0])
    if hidden.shape[0] <= chunk:
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)
    grads = torch.is_grad_enabled() and (hidden.requires_grad, weight.requires_grad)
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk, grads or (False, False))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk: int,
                grads: tuple[bool, bool]) -> Tensor:
        want_hidden, want_weight = grads
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1).float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], chunk):
            h, t, v = hidden[start:start + chunk], targets[start:start + chunk], valid[start:start + chunk]
            logits = F.linear(h, weight).float()  # (n, V), this chunk only
            lse = logits.logsumexp(dim=-1)
            t = t.clamp(min=0)  # ignored rows: any index, weighted 0 below
            picked = logits.gather(1, t[:, None]).squeeze(1)
            total += ((lse - picked) * v).sum()
            if want_hidden or want_weight:
                # d(mean loss)/d(logits) = (softmax − one-hot) / count on counted rows
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                g = (g * (v / count)[:, None]).to(hidden.dtype)
                if want_hidden:
                    grad_hidden[start:start + chunk] = g @ weight
                if want_weight:
                    grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None, None, None
