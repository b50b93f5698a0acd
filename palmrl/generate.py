"""Batched sampling from a PaLM model with a key/value cache.

Prompts of different lengths are left-padded into one block so every row's next token sits in the
same column; the first forward fills the KV cache with the prompts, then each step feeds only the
B new tokens. Sampling follows the usual recipe: temperature, then top-k, then nucleus (top-p,
https://arxiv.org/abs/1904.09751); temperature 0 is greedy. Each row stops at its own EOS and is
padded after it; the loop ends when every row has stopped or `max_new_tokens` is reached.

`use_cache=False` recomputes the full forward at each step: same tokens, much slower (the baseline
of scripts/bench_train.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from palmrl.errors import UserError


class Generation(NamedTuple):
    """Prompts and sampled responses of one batch (P = prompt block width, N = steps taken)."""

    sequences: Tensor  # (B, P+N) long: left-padded prompts, then responses; pad_id after EOS
    attention_mask: Tensor  # (B, P+N) bool: real prompt tokens and response tokens up to and incl. EOS
    prompt_length: int  # P, width of the left-padded prompt block
    response_mask: Tensor  # (B, N) bool: the response part of attention_mask


def left_pad(prompts: list[list[int]], pad_id: int,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Token lists -> tokens (B, P) long, mask (B, P) bool, padded on the left to the longest."""
    if not prompts:
        raise UserError("no prompts to generate from")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        tokens[i, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = True
    return tokens.to(device), mask.to(device)


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> next tokens (B,) long. temperature 0 = greedy; top_k 0 and top_p 1 = off."""
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature

    # top-k: keep the k largest logits
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))

    # top-p: keep the smallest set of most likely tokens whose probability reaches top_p
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V), 0 for the most likely token
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)

    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, pad_id: int = 0, generator: torch.Generator | None = None,
             use_cache: bool = True, stop_early: bool = True) -> Generation:
    """Sample up to `max_new_tokens` after each prompt; see the module docstring.

    `stop_early=False` always takes max_new_tokens steps: ranks of a ZeRO-3 model must make the
    same number of forward calls, whatever their own rows do.
    """
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be positive, got {max_new_tokens}")
    device = next(model.parameters()).device
    tokens, prompt_mask = left_pad(prompts, pad_id, device)
    B, P = tokens.shape
    max_seq_len = model.config.max_seq_len
    if P + max_new_tokens > max_seq_len:
        raise UserError(f"longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                        f"max_seq_len ({max_seq_len}): lower max_new_tokens to {max(0, max_seq_len - P)} or shorten the prompt")

    was_training = model.training
    model.eval()
    try:
        response = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        response_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)

        # prompts: fill the cache (or just run them) and take each row's next-token logits
        cache = model.new_cache(B, P + max_new_tokens) if use_cache else None
        # (model(...), not trunk + logits: under ZeRO-3 the tied output weight is gathered in forward)
        logits = model(tokens, attention_mask=prompt_mask, cache=cache)[:, -1]  # (B, V)

        steps = 0
        while True:
            # sample; rows that already stopped get padding, masked out
            next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            next_token = next_token.masked_fill(finished, pad_id)
            response[:, steps] = next_token
            response_mask[:, steps] = ~finished
            if eos_id is not None:
                finished |= next_token == eos_id
            steps += 1
            if steps == max_new_tokens or (stop_early and bool(finished.all())):
                break

            # next-token logits: feed only the new column through the cache, or everything again
            if use_cache:
                logits = model(next_token[:, None], attention_mask=response_mask[:, steps - 1:steps],
                               cache=cache)[:, -1]
            else:
                so_far = torch.cat((tokens, response[:, :steps]), dim=1)
                mask_so_far = torch.cat((prompt_mask, response_mask[:, :steps]), dim=1)
                logits = model(so_far, attention_mask=mask_so_far)[:, -1]
    finally:
        model.train(was_training)

    response, response_mask = response[:, :steps], response_mask[:, :steps]
    return Generation(sequences=torch.cat((tokens, response), dim=1),
                      attention_mask=torch.cat((prompt_mask, response_mask), dim=1),
                      prompt_length=P, response_mask=response_mask)
