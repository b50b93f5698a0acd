"""Per-token log-probabilities and entropies from language-model logits.

Both functions walk the batch one row at a time, so the only full-vocabulary fp32 temporary is a
single (T, V) row: with bf16 logits and a 256k vocabulary, upcasting the whole (B, T, V) tensor
at once would cost more memory than the logits themselves (the trick TRL's
`selective_log_softmax` uses). The math is fp32 whatever the logits' dtype, and the outputs are
fp32 and differentiable.

Alignment is the caller's job: `logits[:, t]` must be the distribution that produced
`tokens[:, t]` (for a causal LM, logits from position t - 1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(tokens[b, t]) under softmax(logits[b, t]): (B, T, V), (B, T) -> (B, T) fp32.

    Computed as picked logit minus logsumexp, which equals log_softmax + gather without
    materialising the (T, V) log-softmax. Every entry of `tokens` must be a valid id, padding
    included (use the pad id, not -100).
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree on (B, T)")

    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        # one row in fp32 at a time bounds the upcast copy to (T, V)
        row_logits = row_logits.float()  # (T, V)
        picked = row_logits.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) at every position: (B, T, V) -> (B, T) fp32, in nats."""
    rows = []
    for row_logits in logits:
        # H = -sum p log p with p = softmax, in fp32, one row at a time; the clamp makes a -inf
        # logit (a filtered token) contribute 0 * finite = 0 instead of 0 * -inf = nan
        logp = torch.log_softmax(row_logits.float(), dim=-1).clamp(min=torch.finfo(torch.float32).min)  # (T, V)
        rows.append(-(logp.exp() * logp).sum(dim=-1))  # (T,)
    return torch.stack(rows)  # (B, T)
