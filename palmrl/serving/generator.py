"""Text in, text out over a palmrl checkpoint: prompt rendering, batched KV-cache decoding with
per-row stop strings and token limits, and incremental (streamable) text.

Shared by `palmrl serve` and the `local` self-instruct backend. The decoding is
`palmrl.generate.Decoder`'s (left-padded prompts fill the KV cache, then one column per step),
stepped here so a caller can stream each row's new text, stop a row at its own `max_tokens` or
stop string, and end the batch as soon as every row is done. tests/test_serve.py checks that it
samples the same tokens as `generate`.

New text comes from the new tokens alone (`TextStream`), never from decoding the whole row again,
so a step costs the same at token 1000 as at token 1. Text is handed out only when it is whole:
a character whose bytes span several tokens waits for its last byte, and text that could still be
the start of a stop string waits until it is not.

Chat checkpoints (sft, reward, ppo) get the chat template; a pretrain checkpoint continues raw
text (`[bos] + encode(text)`), and a chat request to it becomes the plain transcript of the turns.
A row ends at eos or at any template token (bos, pad, a role marker: the model opening a new
turn), with finish_reason "stop"; at its token limit with "length" (OpenAI's two reasons).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from palmrl import checkpoint
from palmrl.data.chat import as_messages, render_prompt, template_ids
from palmrl.errors import UserError
from palmrl.generate import Decoder, prepare_decoding
from palmrl.runtime import inference_placement


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
    """Characters at the end of `text` that could still grow into a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold


class TextStream:
    """One row's text, a token at a time, without decoding the row again (incremental detokenisation).

    palmrl's tokenizers decode additively: the text of `a + b` is the text of `a` then the text of
    `b` when `a` ends on a character boundary. So each token's text is the decoding of the tokens
    since the last whole character: usually just that token; a few byte pieces while a multi-byte
    character is incomplete (its text would end in U+FFFD, the replacement character).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._read = 0  # ids[:_read] are already text

    def push(self, token: int, *, final: bool = False) -> str:
        """Take one token; return the text it completes ("" while a character is still partial).
        `final`: no token follows, so hand out even half a character (as U+FFFD, like `decode`)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self._read:])
        if text.endswith("\ufffd") and not final:
            return ""
        self._read = len(self.ids)
        return text

    def rest(self) -> str:
        """The text not handed out yet (the row ended on a stop token)."""
        text = self.tokenizer.decode(self.ids[self._read:])
        self._read = len(self.ids)
        return text


class _RowState:
    def __init__(self, row: Row, tokenizer):
        self.row = row
        self.text = TextStream(tokenizer)
        self.pending = ""  # decoded but not handed out: it could still be the start of a stop string
        self.done = False


class Engine:
    """A checkpoint ready to generate: its tokenizer, model (eval), and how it wants prompts."""

    def __init__(self, ckpt: str | Path, *, key: str = "ckpt", device: str = "auto", precision: str = "auto",
                 chat: str | bool = "auto", trust_remote_code: bool = False, decode_weights: str = "fp32"):
        # errors name the device/precision keys beside the checkpoint's: "generator.device", "device"
        self.device, dtype = inference_placement(device, precision, key=key.removesuffix("ckpt"))
        self.checkpoint = checkpoint.load(ckpt, key=key, trust_remote_code=trust_remote_code)
        self.tokenizer = self.checkpoint.tokenizer()
        self.model = checkpoint.model_from_checkpoint(self.checkpoint).eval().to(device=self.device, dtype=dtype)
        self.decode_weights = prepare_decoding(self.model, decode_weights,
                                               key=f"{key.removesuffix('ckpt')}decode_weights")
        self.chat = self.checkpoint.stage != "pretrain" if str(chat) == "auto" else bool(chat)
        self.max_seq_len = int(self.model.config.max_seq_len)
        self.stop_ids = template_ids(self.tokenizer) | {self.tokenizer.eos_id}
        self.name = self.checkpoint.short_name()  # "<run>/<stage>"

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
        states = [_RowState(row, self.tokenizer) for row in rows]
        decoder = Decoder(self.model, [row.prompt for row in rows], max_new_tokens=max(row.max_tokens for row in rows),
                          temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                          pad_id=self.tokenizer.pad_id, generator=generator, decode_weights=self.decode_weights)
        while not decoder.done:
            tokens = decoder.step().tolist()
            deltas = [self._advance(i, state, tokens[i]) for i, state in enumerate(states) if not state.done]
            deltas = [d for d in deltas if d.text or d.finish_reason]
            decoder.stop(torch.tensor([state.done for state in states]))
            if deltas:
                yield deltas

    def _advance(self, index: int, state: _RowState, token: int) -> Delta:
        """Take one token for one row; decide whether it ended, and what new text is safe to show."""
        row = state.row
        if token in self.stop_ids:
            state.done = True
            return Delta(index, state.pending + state.text.rest(), "stop", len(state.text.ids))
        at_limit = len(state.text.ids) + 1 >= row.max_tokens
        text = state.pending + state.text.push(token, final=at_limit)
        hits = [p for p in (text.find(stop) for stop in row.stop if stop) if p >= 0]
        if hits:
            state.done = True
            return Delta(index, text[:min(hits)], "stop", len(state.text.ids))
        if at_limit:
            state.done = True
            return Delta(index, text, "length", len(state.text.ids))
        safe = len(text) - _held_back(text, row.stop)
        state.pending = text[safe:]
        return Delta(index, text[:safe], None, len(state.text.ids))

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
