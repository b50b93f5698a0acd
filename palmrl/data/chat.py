"""The one chat template, used identically by SFT, reward modelling, PPO and sampling.

    <s> <|system|> text <|user|> text <|assistant|> text </s> <|user|> text <|assistant|> text </s>

Role markers are dedicated special tokens (as in ChatML / Llama-3 headers) so user text can never
forge a turn: the tokenizer's `encode` never maps the *text* "<|assistant|>" to the special id.
Every assistant message ends with `</s>`, and the SFT loss covers the assistant content and that
`</s>` — the model learns both what to answer and when to stop (InstructGPT-style response-only
loss). A generation prompt is the conversation so far plus `<|assistant|>`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from palmrl.errors import UserError

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


class Rendered(NamedTuple):
    """A rendered conversation: token ids and, per token, whether the SFT loss trains on it."""

    tokens: list[int]  # (T,)
    loss_mask: list[bool]  # (T,) True exactly on assistant content tokens and their closing eos


def role_id(tokenizer, role: str) -> int:
    return tokenizer.token_id(ROLE_TOKENS[role])


def template_ids(tokenizer) -> frozenset[int]:
    """Ids that only the template may place: bos, pad and the role markers (eos ends a response).
    (A Hugging Face tokenizer: every special token of its own.)"""
    if getattr(tokenizer, "kind", None) == "hf":
        return tokenizer.stop_ids
    return frozenset([tokenizer.bos_id, tokenizer.pad_id, *(role_id(tokenizer, r) for r in ROLES)])


def _check_message(message, index: int) -> tuple[str, str]:
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise UserError(f"message {index}: expected a mapping with 'role' and 'content', got {message!r:.80}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise UserError(f"message {index}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise UserError(f"message {index}: 'content' must be a string, got {type(content).__name__}")
    return role, content


def render_chat(tokenizer, messages: Sequence[Mapping[str, str]]) -> Rendered:
    """Render a (multi-turn) conversation; the loss mask marks every assistant reply and its eos.
    A Hugging Face tokenizer renders with its own chat template (see palmrl.model.hf)."""
    if getattr(tokenizer, "kind", None) == "hf":
        checked = [dict(zip(("role", "content"), _check_message(m, i))) for i, m in enumerate(messages)]
        return Rendered(*tokenizer.render_chat(checked))
    tokens, loss_mask = [tokenizer.bos_id], [False]
    for index, message in enumerate(messages):
        role, content = _check_message(message, index)
        is_reply = role == "assistant"

        # role marker: never trained on, the template places it
        tokens.append(role_id(tokenizer, role))
        loss_mask.append(False)

        # content, then eos closing each assistant turn so the model learns to stop
        content_ids = tokenizer.encode(content) + ([tokenizer.eos_id] if is_reply else [])
        tokens.extend(content_ids)
        loss_mask.extend([is_reply] * len(content_ids))
    return Rendered(tokens, loss_mask)


def render_prompt(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The conversation so far plus `<|assistant|>`: what generation and PPO rollouts start from."""
    if getattr(tokenizer, "kind", None) == "hf":
        return tokenizer.render_prompt([dict(zip(("role", "content"), _check_message(m, i)))
                                        for i, m in enumerate(messages)])
    return render_chat(tokenizer, messages).tokens + [role_id(tokenizer, "assistant")]


def as_messages(prompt: str | Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """A prompt given as plain text becomes one user turn; a message list is copied as is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(message) for message in prompt]


def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """Generation prompt for a single user turn."""
    return render_prompt(tokenizer, as_messages(prompt))


def clean_response(tokenizer, ids: Sequence[int]) -> tuple[str, bool]:
    """Decode generated ids up to the first eos; also say whether the format was right.

    The text stops at eos or at the first leaked template token (bos, pad, a role marker: the
    model starting a new turn), and is stripped of surrounding whitespace. The flag is True only
    when eos came before any template token.
    """
    ids = [int(i) for i in ids]
    stops = template_ids(tokenizer) | {tokenizer.eos_id}
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    format_ok = end < len(ids) and ids[end] == tokenizer.eos_id
    return tokenizer.decode(ids[:end], skip_special=True).strip(), format_ok
