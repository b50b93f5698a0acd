"""Next-token cross-entropy from hidden states, without the full fp32 (B, T, V) logits.

`logits = hidden @ weightᵀ` then `F.cross_entropy(logits.float())` keeps a (B·T, V) fp32 copy for the
backward pass: 10 GB at 80k tokens per rank with a 32k vocabulary, 84 GB at 256k. Here the rows go
through in chunks of `chunk_rows`; each chunk's logits are made, turned into the loss and into the
gradients of `hidden` and `weight` right away (softmax − one-hot), and freed. What stays for the
backward pass is grad_hidden (B·T, D) and grad_weight (V, D), which the backward only scales: the
same matmul work as the plain path, no recomputation.

On a CPU each chunk goes through in pieces of `CPU_PIECE_ELEMENTS` logits, which stay in a core's
cache from the projection through the softmax to the gradient; the chunk's logit gradients are
then multiplied by its hidden states once for the weight's gradient (a product per piece, each added
to an fp32 sum, cost as much again). The bench model's bf16 step (8 × 256 tokens, vocabulary 8192)
went from ~290 to ~250 ms, its fp32 step from ~555 to ~515 ms. Up to one piece of rows (a CPU) or
one chunk (a GPU) the plain path runs.

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
# on a CPU each chunk goes through in pieces whose fp32 logits stay in a core's cache across the
# softmax's passes: 2^19 (2 MiB; 64 rows at an 8k vocabulary, 256 at 2k), among the fastest measured
CPU_PIECE_ELEMENTS = 2**19


def chunk_rows_for(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def piece_rows_for(vocab_size: int, chunk: int, device: torch.device) -> int:
    return min(chunk, max(1, CPU_PIECE_ELEMENTS // vocab_size)) if device.type == "cpu" else chunk


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
    piece = piece_rows_for(weight.shape[0], chunk, hidden.device)
    if hidden.shape[0] <= piece:
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)
    grads = torch.is_grad_enabled() and (hidden.requires_grad, weight.requires_grad)
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk, piece, grads or (False, False))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk: int, piece: int,
                grads: tuple[bool, bool]) -> Tensor:
        want_hidden, want_weight = grads
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1).float()
        weights = valid / count  # each row's share of the mean (0: ignored, its index clamped to any)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        for start in range(0, hidden.shape[0], chunk):
            h_chunk, t_chunk, w_chunk = (x[start:start + chunk] for x in (hidden, targets, weights))
            # the chunk's logit gradients, in the model's dtype, for one weight-gradient product per chunk
            g_chunk = torch.empty((len(h_chunk), weight.shape[0]), dtype=hidden.dtype, device=hidden.device) \
                if want_weight and piece < chunk else None
            for at in range(0, len(h_chunk), piece):
                h, t, w = h_chunk[at:at + piece], t_chunk[at:at + piece].clamp(min=0), w_chunk[at:at + piece]
                logp = torch.log_softmax(F.linear(h, weight).float(), dim=-1)  # (n, V), this piece only
                total -= (logp.gather(1, t[:, None]).squeeze(1) * w).sum()
                if not (want_hidden or want_weight):
                    continue
                # d(mean loss)/d(logits) = (softmax − one-hot) · weight of the row
                g = logp.exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                g.mul_(w[:, None])
                g = g.to(hidden.dtype) if g_chunk is None else g_chunk[at:at + piece].copy_(g)
                if want_hidden:
                    grad_hidden[start + at:start + at + piece] = g @ weight
                if want_weight and g_chunk is None:
                    grad_weight = _accumulate(grad_weight, g.t() @ h)
            if g_chunk is not None:
                grad_weight = _accumulate(grad_weight, g_chunk.t() @ h_chunk)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None, None, None, None


def _accumulate(total: Tensor | None, part: Tensor) -> Tensor:
    """The weight gradient summed in fp32 over chunks."""
    return part.float() if total is None else total.add_(part)
