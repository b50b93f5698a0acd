"""Batched sampling from a PaLM model with a key/value cache: palmrl's one decode loop.

Prompts of different lengths are left-padded into one block so every row's next token sits in the
same column; the first forward fills the KV cache with the prompts, then each step feeds only the
B new tokens. Sampling follows the usual recipe: temperature, then top-k, then nucleus (top-p,
https://arxiv.org/abs/1904.09751); temperature 0 is greedy. Each row stops at its own EOS and is
padded after it; the loop ends when every row has stopped or `max_new_tokens` is reached.

`Decoder` is that loop a step at a time, with the caller deciding when each row stops (the server
streams text and stops rows at stop strings); `generate` runs it to the end, and
`generate_responses` runs `generate` over many prompts a batch at a time (evaluation, `palmrl sample`).

The model is called as `model(tokens, attention_mask=, cache=, last_only=True)` and returns logits
(B, 1, V) of the last position (PaLM and the Hugging Face wrapper both do; `new_cache(B, max_len)`
makes the cache). Rows with the same prompt (RL's several responses to a prompt, best-of-n) fill
the cache once per distinct prompt, and each row gets a copy of its prompt's keys and values (a
cache's `select`). `decode_weights` picks what a PaLM's one-token steps multiply by on the CPU
(model/palm.py, DECODE_WEIGHTS): "fp32" copies of the weights (the default, the logits of the full
forward to float rounding) or "fp16" ones (FBGEMM, ~2.5x faster matrix products at 8-16 rows on an
AVX2 CPU, at the cost of fp16-rounded weights).

`use_cache=False` recomputes the full forward at each step: same tokens, much slower (the baseline
of scripts/bench_train.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from palmrl.errors import UserError
from palmrl.model.palm import distinct_prefixes, zero3_partitioned


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


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights (and so its sampling) live."""
    return next(model.parameters()).device


def prepare_decoding(model: nn.Module, decode_weights: str, *, key: str = "decode_weights") -> str:
    """Ready a model that only serves (sample, serve, palmrl.LLM) to decode: fail now, naming `key`,
    when it cannot decode with these weights (an unknown value, fp16 on a build without FBGEMM or on
    a Hugging Face model) rather than at the first request, and keep the weight copies decoding
    makes across calls (PaLM.keep_decode_copies). Returns decode_weights."""
    from palmrl.model.palm import check_decode_weights

    try:
        check_decode_weights(decode_weights)
        if decode_weights != "fp32":  # whether this model decodes with them (a Hugging Face model does not)
            model.new_cache(1, 1, weights=str(decode_weights))
    except UserError as err:
        raise UserError(str(err).replace("decode_weights", key, 1)) from None
    if hasattr(model, "keep_decode_copies"):
        model.keep_decode_copies()
    return str(decode_weights)


def seeded_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A seeded generator on `device`, where the sampling runs: CUDA's random ops refuse a CPU
    generator. On the CPU its stream is that of a default CPU generator, so CPU runs keep their samples."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


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
    if temperature != 1.0:  # (x / 1 is x: the division is skipped, not approximated)
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

    return draw(logits.softmax(dim=-1), generator)


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of probs (B, V), distributed as the row: inverse-CDF sampling with one uniform
    per row. torch.multinomial draws V exponentials per row instead: at palm_tiny's vocabulary that
    was 45% of a batch-64 decode step on the CPU; this is ~10x cheaper. A token of probability 0 is
    never drawn (its CDF step is empty), and the last index catches a CDF that rounds below 1."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)  # (B,)


class Decoder:
    """One batch decoded a step at a time: the loop every sampler in palmrl runs (the module docstring).

        decoder = Decoder(model, prompts, max_new_tokens=16, temperature=0.8)
        while not decoder.done:
            tokens = decoder.step()           # (B,) this step's tokens, pad_id for rows already stopped
            decoder.stop(tokens == eos_id)    # the caller decides when rows end: eos, stop strings, limits
        out = decoder.generation()

    Each step makes one forward call and draws once from `generator` for the whole batch, stopped
    rows included, so a seed gives the same tokens however the rows end. The forward call and the
    draw run under torch.inference_mode (no view or version tracking: a batch-1 step of the bench
    model 2.43 -> 2.03 ms on the CPU, the same tokens), except for a ZeRO-3 model, whose gathered
    weights would then be inference tensors; what a step returns and `generation()` are ordinary
    tensors, fit for a training forward. The token a row stops on
    is still fed (masked as real): it is part of that row's response. The model should be in eval
    mode and `P + max_new_tokens` within its context; `generate` sees to both.
    """

    def __init__(self, model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, pad_id: int = 0,
                 generator: torch.Generator | None = None, use_cache: bool = True, decode_weights: str = "fp32"):
        if max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.model, self.max_new_tokens, self.use_cache = model, max_new_tokens, use_cache
        self.decode_weights = decode_weights
        self.sampling = (temperature, top_k, top_p)
        self.pad_id, self.generator = pad_id, generator
        self.device = model_device(model)
        self.inference = not zero3_partitioned(model)  # see the class docstring
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"the generator is on {generator.device} but the model on {self.device}: "
                             f"make it with seeded_generator(seed, device)")
        self.tokens, self.prompt_mask = left_pad(prompts, pad_id, self.device)  # (B, P)
        B = self.tokens.shape[0]
        self.response = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=self.device)
        self.response_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=self.device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=self.device)  # (B,) rows that take no more tokens
        self.steps = 0  # tokens sampled per row so far
        self._cache = None
        self._last: Tensor | None = None  # (B,) the tokens of the last step, not yet fed to the model

    @property
    def prompt_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def done(self) -> bool:
        return self.steps == self.max_new_tokens or bool(self.finished.all())

    def stop(self, rows: Tensor) -> None:
        """rows (B,) bool: these rows end here; from the next step on they get pad_id, masked out."""
        self.finished |= rows.to(self.finished.device)

    @torch.no_grad()
    def step(self) -> Tensor:
        """Sample the next token of every row -> (B,) long; pad_id where a row has stopped."""
        if self.steps == self.max_new_tokens:
            raise RuntimeError(f"all {self.max_new_tokens} steps of this Decoder are taken")
        with torch.inference_mode(self.inference):
            next_token = sample_next(self._next_logits(), *self.sampling, self.generator)  # (B,)
        next_token = next_token.masked_fill(self.finished, self.pad_id)  # (an ordinary tensor again)
        self.response[:, self.steps] = next_token
        self.response_mask[:, self.steps] = ~self.finished
        self.steps += 1
        self._last = next_token
        return next_token

    def _next_logits(self) -> Tensor:
        """(B, V) next-token logits: the prompts first, then only the new column through the cache,
        or (use_cache=False) everything again."""
        # (model(...), not trunk + logits: under ZeRO-3 the tied output weight is gathered in forward)
        if self.steps == 0:
            if not self.use_cache:
                return self.model(self.tokens, attention_mask=self.prompt_mask, last_only=True)[:, -1]
            return self._prefill()
        if self.use_cache:
            return self.model(self._last[:, None], attention_mask=self.response_mask[:, self.steps - 1:self.steps],
                              cache=self._cache, last_only=True)[:, -1]
        so_far = torch.cat((self.tokens, self.response[:, :self.steps]), dim=1)
        mask_so_far = torch.cat((self.prompt_mask, self.response_mask[:, :self.steps]), dim=1)
        return self.model(so_far, attention_mask=mask_so_far, last_only=True)[:, -1]

    def _prefill(self) -> Tensor:
        """The prompts into a new cache -> their last logits (B, V): once per distinct prompt where the
        cache can hand its rows out (`select`: PaLM's KVCache, the Hugging Face wrapper's HFCache), else
        every row."""
        # (models implementing only new_cache(B, max_len) decode as they are by default)
        weights = {} if self.decode_weights == "fp32" else {"weights": self.decode_weights}
        max_len = self.prompt_length + self.max_new_tokens
        shared = distinct_prefixes(self.tokens, self.prompt_mask, self.prompt_length)
        if shared is not None:
            first, owner = shared
            cache = self.model.new_cache(len(first), max_len, **weights)
            if hasattr(cache, "select"):
                logits = self.model(self.tokens[first], attention_mask=self.prompt_mask[first], cache=cache,
                                    last_only=True)[:, -1]
                self._cache = cache.select(owner)
                return logits[owner]
        self._cache = self.model.new_cache(self.tokens.shape[0], max_len, **weights)
        return self.model(self.tokens, attention_mask=self.prompt_mask, cache=self._cache, last_only=True)[:, -1]

    def generation(self) -> Generation:
        """The prompts and the steps taken so far."""
        response, response_mask = self.response[:, :self.steps], self.response_mask[:, :self.steps]
        return Generation(sequences=torch.cat((self.tokens, response), dim=1),
                          attention_mask=torch.cat((self.prompt_mask, response_mask), dim=1),
                          prompt_length=self.prompt_length, response_mask=response_mask)


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, pad_id: int = 0, generator: torch.Generator | None = None,
             use_cache: bool = True, stop_early: bool = True, decode_weights: str = "fp32") -> Generation:
    """Sample up to `max_new_tokens` after each prompt; see the module docstring.

    `stop_early=False` always takes max_new_tokens steps: ranks of a ZeRO-3 model must make the
    same number of forward calls, whatever their own rows do.
    """
    decoder = Decoder(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, pad_id=pad_id, generator=generator, use_cache=use_cache,
                      decode_weights=decode_weights)
    P, max_seq_len = decoder.prompt_length, model.config.max_seq_len
    if P + max_new_tokens > max_seq_len:
        raise UserError(f"longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                        f"max_seq_len ({max_seq_len}): lower max_new_tokens to {max(0, max_seq_len - P)} "
                        f"or shorten the prompt")

    was_training = model.training
    model.eval()
    try:
        while decoder.steps < max_new_tokens and not (stop_early and bool(decoder.finished.all())):
            next_token = decoder.step()
            if eos_id is not None:
                decoder.stop(next_token == eos_id)
    finally:
        model.train(was_training)
    return decoder.generation()


def generate_responses(model: nn.Module, prompts: list[list[int]], *, batch_size: int,
                       **kwargs) -> list[list[int]]:
    """Each prompt's response ids (its EOS included), `generate(**kwargs)` on `batch_size` prompts at a
    time; pass one `generator` and every batch draws from the same stream."""
    responses: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        out = generate(model, prompts[start:start + batch_size], **kwargs)
        P = out.prompt_length
        responses += [out.sequences[row, P:][out.response_mask[row]].tolist() for row in range(len(out.sequences))]
    return responses
