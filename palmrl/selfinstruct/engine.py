"""Text in, text out over a palmrl checkpoint: prompt rendering, batched KV-cache decoding with
per-row stop strings and token limits, and incremental (streamable) text.

Shared by the `local` self-instruct backend and `palmrl serve`. The decoding loop is
`palmrl.generate.generate`'s (left-padded prompts fill the KV cache, then one column per step,
sampled by `palmrl.generate.sample_next`), stepped one token at a time so a caller can stream
each row's new text, stop a row at its own `max_tokens` or stop string, and end the batch as soon
as every row is done. tests/test_serve.py checks that it samples the same tokens as `generate`.

Chat checkpoints (sft, reward, ppo) get the chat template; a pretrain checkpoint continues raw
text (`[bos] + encode(text)`), and a chat request to it becomes the plain transcript of the turns.
A row ends at eos or at any template token (bos, pad, a role marker: the model opening a new
turn), with finish_reason "stop"; at its token limit with "length" (OpenAI's two reasons).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch

from palmrl import checkpoint
from palmrl.data.chat import as_messages, render_prompt, template_ids
from palmrl.errors import UserError
from palmrl.generate import left_pad, sample_next


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn; rows that share it can be decoded in one batch."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass, 1 disables
    top_k: int = 0  # 0 disables

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


class Row(NamedTuple):
    """One sequence to continue."""

    prompt: list[int]  # (P_i,) prompt token ids, bos first
    max_tokens: int  # new tokens at most
    stop: tuple[str, ...] = ()  # the text ends before the first of these


class Delta(NamedTuple):
    """What one decoding step added to one row."""

    row: int  # index into the batch's rows
    text: str  # new text, safe to show (never part of a stop string, never half a character)
    finish_reason: str | None  # None while running; then "stop" or "length"
    completion_tokens: int  # tokens generated so far (the stop token excluded)


class Completion(NamedTuple):
    """A finished row."""

    text: str
    finish_reason: str  # "stop" (eos, template token or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that could still grow into a stop string (or a character)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


class _RowState:
    def __init__(self, row: Row):
        self.row = row
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.done = False


class Engine:
    """A checkpoint ready to generate: its tokenizer, model (eval), and how it wants prompts."""

    def __init__(self, ckpt: str | Path, *, key: str = "ckpt", precision: str = "fp32", chat: str | bool = "auto"):
        self.checkpoint = checkpoint.load(ckpt, key=key)
        self.tokenizer = self.checkpoint.tokenizer()
        self.model = checkpoint.model_from_checkpoint(self.checkpoint).eval()
        if precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        elif precision != "fp32":
            raise UserError(f"precision must be fp32 or bf16, got {precision!r}")
        self.chat = self.checkpoint.stage != "pretrain" if str(chat) == "auto" else bool(chat)
        self.max_seq_len = int(self.model.config.max_seq_len)
        self.stop_ids = template_ids(self.tokenizer) | {self.tokenizer.eos_id}
        # runs/<run>/<stage>/final -> "<run>/<stage>"; a step folder keeps its step
        parts = self.checkpoint.path.resolve().parts
        self.name = "/".join(parts[-3:-1] if parts[-1] == "final" else parts[-3:])

    def lineage(self) -> dict:
        return self.checkpoint.lineage()

    # prompts

    def encode_text(self, text: str) -> list[int]:
        """A raw-text prompt: bos, then the text (OpenAI completions; pretrain-style continuation)."""
        return [self.tokenizer.bos_id, *self.tokenizer.encode(text)]

    def encode_chat(self, messages: str | Sequence[Mapping[str, str]]) -> list[int]:
        """A chat prompt ending where the assistant's reply starts (raw transcript for pretrain)."""
        messages = as_messages(messages)
        if self.chat:
            return render_prompt(self.tokenizer, messages)
        return self.encode_text("\n".join(m["content"] for m in messages) + "\n")

    # decoding

    @torch.no_grad()
    def stream(self, rows: Sequence[Row], sampling: Sampling, *,
               generator: torch.Generator | None = None) -> Iterator[list[Delta]]:
        """Decode all rows together; after each step, yield the rows that changed."""
        if not rows:
            return
        for i, row in enumerate(rows):
            if row.max_tokens <= 0:
                raise UserError(f"max_tokens must be positive, got {row.max_tokens}")
            if len(row.prompt) + row.max_tokens > self.max_seq_len:
                raise UserError(f"prompt {i} ({len(row.prompt)} tokens) + max_tokens ({row.max_tokens}) exceeds "
                                f"the model's context of {self.max_seq_len} tokens")
        device = next(self.model.parameters()).device
        states = [_RowState(row) for row in rows]
        tokens, prompt_mask = left_pad([row.prompt for row in rows], self.tokenizer.pad_id, device)
        B, P = tokens.shape
        steps_max = max(row.max_tokens for row in rows)
        finished = torch.zeros(B, dtype=torch.bool, device=device)

        # prompts fill the cache; each later step feeds one column, masked for finished rows
        cache = self.model.new_cache(B, P + steps_max)
        logits = self.model(tokens, attention_mask=prompt_mask, cache=cache)[:, -1]  # (B, V)
        for _ in range(steps_max):
            next_token = sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)  # (B,)
            next_token = next_token.masked_fill(finished, self.tokenizer.pad_id)
            alive = ~finished  # (B,) rows that took this token

            deltas = [self._advance(i, state, int(next_token[i])) for i, state in enumerate(states)
                      if not state.done]
            deltas = [d for d in deltas if d.text or d.finish_reason]
            finished = torch.tensor([s.done for s in states], device=device)
            if deltas:
                yield deltas
            if bool(finished.all()):
                return
            logits = self.model(next_token[:, None], attention_mask=alive[:, None], cache=cache)[:, -1]

    def _advance(self, index: int, state: _RowState, token: int) -> Delta:
        """Take one token for one row; decide whether it ended, and what new text is safe to show."""
        row = state.row
        if token in self.stop_ids:
            state.done = True
            text = self.tokenizer.decode(state.ids)
            return Delta(index, text[state.emitted:], "stop", len(state.ids))
        state.ids.append(token)
        text = self.tokenizer.decode(state.ids)
        hits = [p for p in (text.find(stop, max(0, state.emitted - len(stop))) for stop in row.stop if stop) if p >= 0]
        if hits:
            state.done = True
            return Delta(index, text[state.emitted:min(hits)], "stop", len(state.ids))
        if len(state.ids) >= row.max_tokens:
            state.done = True
            return Delta(index, text[state.emitted:], "length", len(state.ids))
        safe = len(text) - _held_back(text, row.stop)
        delta = text[state.emitted:safe] if safe > state.emitted else ""
        state.emitted = max(state.emitted, safe)
        return Delta(index, delta, None, len(state.ids))

    def complete(self, rows: Sequence[Row], sampling: Sampling, *,
                 generator: torch.Generator | None = None) -> list[Completion]:
        """Decode all rows to the end and return each one's whole text."""
        texts = [""] * len(rows)
        ends = [("length", 0)] * len(rows)
        for deltas in self.stream(rows, sampling, generator=generator):
            for d in deltas:
                texts[d.row] += d.text
                if d.finish_reason is not None:
                    ends[d.row] = (d.finish_reason, d.completion_tokens)
        return [Completion(text, reason, len(row.prompt), n) for text, (reason, n), row in zip(texts, ends, rows)]

    def fit(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Keep bos and the last tokens of a prompt so that it plus max_tokens fits the context."""
        budget = self.max_seq_len - max_tokens
        if budget < 2:
            raise UserError(f"max_tokens ({max_tokens}) leaves no room for a prompt in the model's "
                            f"context of {self.max_seq_len} tokens")
        if len(prompt) <= budget:
            return prompt
        return [prompt[0], *prompt[len(prompt) - budget + 1:]]
