"""Reward-model data (preference pairs, rated responses), PPO prompts, and their collates.

Preference pairs feed the pairwise Bradley-Terry loss of InstructGPT's reward model; rated
responses feed the binned-rating mode of lucidrains' PaLM-rlhf-pytorch reward model; prompts feed
PPO rollouts. Everything is rendered with the one chat template (`data/chat.py`) so the reward
model reads exactly what the policy writes.

Embedded data (`data.source: tasks`, or `embedded` with `data.name: tasks|chitchat`):
- task pairs: the correct answer (chosen) against a hard negative from `tasks.wrong_response`
  (off-by-one sums, swapped letters, a wrong capital) — every label is verifiable;
- task ratings (the default): a correct answer (rated num_bins), a near miss or another prompt's
  answer (its partial credit `tasks.grade` binned into 1..num_bins-1). Chosen over chitchat's human
  ratings as the default because they are learnable by a tiny model and checkable; chitchat's ratings score whole
  conversations (witty/upbeat/interesting, 1-10, half of them the untouched default 5), a weak
  and noisy label for one reply;
- chitchat (`data.name: chitchat`): the conversation's starter prompt and its opening turns,
  rated by the mean of the three human ratings rescaled to 1..num_bins; pairs match two
  conversations on the same starter prompt whose mean ratings differ by at least 3 points.
Local/hf files go through `palmrl.data.sources.load_records` with the same split rules as SFT
data (`data.val_path` / `data.val_split`, else a hash hold-out of `data.val_fraction`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from palmrl import tasks as task_lib
from palmrl.data.chat import as_messages, render_chat
from palmrl.data.embedded import SPEAKERS, chitchat_conversations
from palmrl.data.instructions import file_records, record_messages, share_of, source_kind, split_size
from palmrl.errors import UserError

Prompt = str | list[dict[str, str]]  # plain text (one user turn) or a message list
CHITCHAT_TURNS = 4  # opening turns of a chitchat conversation kept as the "response": a tiny model's context
CHITCHAT_PAIR_MARGIN = 3.0  # min gap in mean human rating (1-10) for two conversations to make a pair


@dataclass(frozen=True)
class PreferencePair:
    """A prompt and two replies, `chosen` preferred over `rejected`."""

    prompt: Prompt
    chosen: str
    rejected: str


@dataclass(frozen=True)
class RatedResponse:
    """A prompt, a reply and its rating in 1..num_bins."""

    prompt: Prompt
    response: str
    rating: int


# ---------------------------------------------------------------------------------------------
# embedded sources


def embedded_task_pairs(split: str, n: int, seed: int = 0, tasks: Sequence[str] | None = None,
                        behaviour_pairs: float = 0.0) -> list[PreferencePair]:
    """`n` task prompts with the correct answer (chosen) and a hard negative (rejected).

    With `behaviour_pairs` > 0, that share of the pairs prefers the right answer closed with
    "Hope this helps!" to the same answer bare (the behaviour, `tasks.with_sign_off`), and in the
    others each reply takes either form at random: the form alone never tells right from wrong.
    """
    rng = random.Random(f"palmrl.pairs:{split}:{seed}")
    form = random.Random(f"palmrl.pairs.form:{split}:{seed}")  # its own stream: the hard negatives do not change
    pairs = []
    for ex in task_lib.make_examples(split, n, seed=seed, tasks=tasks):
        wrong = task_lib.wrong_response(ex, rng)
        if not behaviour_pairs:
            pairs.append(PreferencePair(ex.prompt, ex.output, wrong))
        elif form.random() < behaviour_pairs:
            pairs.append(PreferencePair(ex.prompt, task_lib.with_sign_off(ex.output), ex.output))
        else:
            either = lambda text: task_lib.with_sign_off(text) if form.random() < 0.5 else text  # noqa: E731
            pairs.append(PreferencePair(ex.prompt, either(ex.output), either(wrong)))
    return pairs


def policy_task_pairs(policy, tokenizer, split: str, n: int, *, seed: int = 0, tasks: Sequence[str] | None = None,
                      samples: int = 2, max_new_tokens: int = 16, temperature: float = 1.0,
                      mixed_forms: bool = False) -> list[PreferencePair]:
    """Pairs whose rejected reply is the policy's own wrong answer, labelled by the task checker.

    This is the InstructGPT recipe — comparisons of model samples, labelled by a judge — with the
    checker as the judge: the reward model learns to rank exactly what PPO will show it. Each
    prompt gets `samples` samples; every wrong one is paired against the correct answer. Prompts
    whose samples are all right give no pair. `mixed_forms`: each reply is shown closed with the
    courteous line or bare, at random (the policy's wrong answer is kept, its form redrawn): the
    SFT policy closes few answers, so its own forms would teach "closed means right".
    """
    from palmrl.evaluate import respond

    examples = task_lib.make_examples(split, n, seed=seed, tasks=tasks)
    prompts = [ex.prompt for ex in examples for _ in range(samples)]
    replies = respond(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                      seed=seed).texts
    pairs = []
    form = random.Random(f"palmrl.policy_pairs.form:{split}:{seed}")
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        answer = examples[i // samples].output
        if reply.strip() and task_lib.check(prompt, reply) == 0.0 and reply.strip() != answer:
            chosen, rejected = answer, reply
            if mixed_forms:  # each side in either form, independently: the form never tells right from wrong
                core = task_lib.without_sign_off(reply) or reply.strip()
                chosen = task_lib.with_sign_off(answer) if form.random() < 0.5 else answer
                rejected = task_lib.with_sign_off(core) if form.random() < 0.5 else core
            pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def embedded_task_ratings(
    split: str, n: int, num_bins: int, seed: int = 0, tasks: Sequence[str] | None = None
) -> list[RatedResponse]:
    """Task prompts with a correct, near-miss or unrelated reply: num_bins if correct, else the
    partial credit (`tasks.grade`, below 0.5) spread over 1..num_bins-1."""
    rng = random.Random(f"palmrl.ratings:{split}:{seed}")
    examples = task_lib.make_examples(split, n, seed=seed, tasks=tasks)
    rated = []
    for ex in examples:
        kind = rng.randrange(3)  # a third each: correct, near miss, another prompt's answer
        response = [ex.output, task_lib.wrong_response(ex, rng), rng.choice(examples).output][kind]
        if task_lib.check(ex.prompt, response):
            rating = num_bins
        else:  # partial credit is below 0.5: stretch it over the lower num_bins - 1 bins
            rating = 1 + round(2 * task_lib.grade(ex.prompt, response) * (num_bins - 2))
        rated.append(RatedResponse(ex.prompt, response, rating))
    return rated


def _chitchat_split(split: str) -> list[tuple[str, str, float]]:
    """(starter prompt, opening turns as "A: …" lines, mean rating 1-10) of the split's rated
    conversations; a conversation's id hashes it into train/val/test (80/10/10, as the tasks)."""
    rows = []
    for conversation in chitchat_conversations():
        if conversation.prompt and conversation.ratings and task_lib.prompt_split(conversation.id) == split:
            opening = (f"{SPEAKERS[i % 2]}: {turn}" for i, turn in enumerate(conversation.turns[:CHITCHAT_TURNS]))
            mean = sum(conversation.ratings.values()) / len(conversation.ratings)
            rows.append((conversation.prompt.strip(), "\n".join(opening), mean))
    return rows


def chitchat_ratings(split: str, num_bins: int) -> list[RatedResponse]:
    """Chitchat conversations rated by their mean human rating, rescaled from 1-10 to 1..num_bins."""
    rescale = lambda mean: 1 + round((mean - 1) * (num_bins - 1) / 9)  # noqa: E731
    return [RatedResponse(prompt, text, rescale(mean)) for prompt, text, mean in _chitchat_split(split)]


def chitchat_pairs(split: str) -> list[PreferencePair]:
    """Pairs of conversations on the same starter prompt: best-rated against worst-rated, in turn."""
    by_prompt: dict[str, list[tuple[float, str]]] = {}
    for prompt, text, mean in _chitchat_split(split):
        by_prompt.setdefault(prompt, []).append((mean, text))
    pairs = []
    for prompt, rows in sorted(by_prompt.items()):
        rows.sort(key=lambda row: row[0])
        for (low, rejected), (high, chosen) in zip(rows[: len(rows) // 2], reversed(rows[len(rows) // 2 :])):
            if high - low >= CHITCHAT_PAIR_MARGIN:
                pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


# ---------------------------------------------------------------------------------------------
# file records


def _prompt_of(value: Any, where: str, key: str = "prompt") -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return record_messages({"messages": value}, f"{where} ({key})")
    raise UserError(f"{where}: {key!r} must be a string or a list of messages")


def _split_reply(messages: Any, where: str, key: str) -> tuple[list[dict], str]:
    """(prompt messages, final assistant reply) of a conversation."""
    messages = record_messages({"messages": messages}, f"{where} ({key})")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: {key!r} must end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def _pair_of(record: Mapping[str, Any], where: str) -> PreferencePair:
    """{prompt, chosen, rejected} with text replies, or chosen/rejected conversations (+ optional prompt)."""
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise UserError(f"{where}: missing key {key!r}")
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if record.get("prompt") is None:
            raise UserError(f"{where}: missing key 'prompt'")
        return PreferencePair(_prompt_of(record["prompt"], where), chosen, rejected)
    if isinstance(chosen, (list, tuple)) and isinstance(rejected, (list, tuple)):
        chosen_context, chosen_reply = _split_reply(chosen, where, "chosen")
        rejected_context, rejected_reply = _split_reply(rejected, where, "rejected")
        if chosen_context != rejected_context:
            raise UserError(f"{where}: 'chosen' and 'rejected' conversations differ before their last reply")
        prompt = as_messages(_prompt_of(record["prompt"], where)) if record.get("prompt") is not None else []
        if not prompt + chosen_context:
            raise UserError(f"{where}: missing key 'prompt' (the conversations hold only the reply)")
        return PreferencePair(prompt + chosen_context, chosen_reply, rejected_reply)
    raise UserError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")


def _rating_of(record: Mapping[str, Any], where: str, num_bins: int) -> RatedResponse:
    """{prompt, response, rating} or {messages (ending with the rated reply), rating}."""
    if "messages" in record:
        prompt, response = _split_reply(record["messages"], where, "messages")
    else:
        for key in ("prompt", "response"):
            if record.get(key) is None:
                raise UserError(f"{where}: missing key {key!r}")
        if not isinstance(record["response"], str):
            raise UserError(f"{where}: 'response' must be a string")
        prompt, response = _prompt_of(record["prompt"], where), record["response"]
    rating = record.get("rating")
    if rating is None:
        raise UserError(f"{where}: missing key 'rating'")
    is_number = isinstance(rating, (int, float)) and not isinstance(rating, bool)
    if not is_number or rating != int(rating) or not 1 <= rating <= num_bins:
        raise UserError(f"{where}: rating {rating!r} is not an integer in 1..{num_bins} (num_bins)")
    return RatedResponse(prompt, response, int(rating))


def _plain_prompt(record: Mapping[str, Any], where: str) -> Prompt:
    """`prompt`, else alpaca `instruction` (+ `input`), else `messages` without a final reply."""
    if record.get("prompt") is not None:
        return _prompt_of(record["prompt"], where)
    if record.get("instruction") is not None:
        return task_lib.format_prompt(str(record["instruction"]), str(record.get("input") or ""))
    if record.get("messages") is not None:
        messages = record_messages(record, where)
        messages = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        if not messages:
            raise UserError(f"{where}: 'messages' holds no prompt before the reply")
        return messages
    raise UserError(f"{where}: missing key 'prompt'")


def _embedded_name(kind: str, allowed: Sequence[str]) -> str:
    name = kind.split(":", 1)[1]
    if name not in allowed:
        raise UserError(f"data.name: unknown embedded set {name!r}; expected one of {', '.join(allowed)}")
    return name


def _seed_and_tasks(data_cfg) -> dict:
    tasks = data_cfg.get("tasks")
    return {"seed": int(data_cfg.get("seed") or 0), "tasks": list(tasks) if tasks is not None else None}


def _non_empty(items: list, data_cfg, split: str, what: str) -> list:
    if not items:
        where = data_cfg.get("path") or data_cfg.get("name") or data_cfg.get("source")
        raise UserError(f"data: no {what} in the {split} split of {where}")
    return items


# ---------------------------------------------------------------------------------------------
# loaders


def load_preference_pairs(data_cfg, split: str) -> tuple[list[PreferencePair], dict]:
    """A split's preference pairs, minus pairs whose chosen and rejected replies are identical."""
    kind = source_kind(data_cfg)
    if kind == "tasks":
        pairs = embedded_task_pairs(split, split_size(data_cfg, split), **_seed_and_tasks(data_cfg),
                                    behaviour_pairs=share_of(data_cfg, "behaviour_pairs"))
    elif kind.startswith("embedded:"):
        _embedded_name(kind, ["tasks", "chitchat"])
        pairs = chitchat_pairs(split)
    else:
        pairs = [_pair_of(record, where) for where, record in file_records(data_cfg, split)]
    kept = [pair for pair in pairs if pair.chosen.strip() != pair.rejected.strip()]
    stats = {"total": len(pairs), "kept": len(kept), "dropped_identical": len(pairs) - len(kept)}
    return _non_empty(kept, data_cfg, split, "preference pairs"), stats


def load_ratings(data_cfg, split: str, num_bins: int) -> list[RatedResponse]:
    """A split's rated responses, ratings in 1..num_bins (tasks by default, see the module doc)."""
    if num_bins < 2:
        raise UserError(f"num_bins must be at least 2, got {num_bins}")
    kind = source_kind(data_cfg)
    if kind == "tasks":
        rated = embedded_task_ratings(split, split_size(data_cfg, split), num_bins, **_seed_and_tasks(data_cfg))
    elif kind.startswith("embedded:"):
        _embedded_name(kind, ["tasks", "chitchat"])
        rated = chitchat_ratings(split, num_bins)
    else:
        rated = [_rating_of(record, where, num_bins) for where, record in file_records(data_cfg, split)]
    return _non_empty(rated, data_cfg, split, "rated responses")


def load_prompts(data_cfg, split: str, n: int | None = None) -> list[Prompt]:
    """PPO prompts: task prompts of a split, chitchat starter prompts, or a file's `prompt` field."""
    kind = source_kind(data_cfg)
    if kind == "tasks":
        examples = task_lib.make_examples(split, n or split_size(data_cfg, split), **_seed_and_tasks(data_cfg))
        prompts: list[Prompt] = [ex.prompt for ex in examples]
    elif kind.startswith("embedded:"):
        _embedded_name(kind, ["tasks", "chitchat"])
        prompts = sorted({prompt for prompt, _, _ in _chitchat_split(split)})
    else:
        prompts = [_plain_prompt(record, where) for where, record in file_records(data_cfg, split)]
    return _non_empty(prompts[:n] if n else prompts, data_cfg, split, "prompts")


# ---------------------------------------------------------------------------------------------
# collates


class PairBatch(NamedTuple):
    """Chosen and rejected conversations, right-padded to one length T so they can share a forward."""

    chosen_tokens: torch.Tensor  # (B, T) long
    chosen_attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    chosen_last: torch.Tensor  # (B,) long, index of the last response token (its eos): read the reward there
    rejected_tokens: torch.Tensor  # (B, T) long
    rejected_attention_mask: torch.Tensor  # (B, T) bool
    rejected_last: torch.Tensor  # (B,) long


class RatingBatch(NamedTuple):
    """Rated conversations, right-padded."""

    tokens: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) bool
    last: torch.Tensor  # (B,) long, index of the last response token (its eos)
    labels: torch.Tensor  # (B,) long, rating - 1 in 0..num_bins-1


def _fit(tokens: list[int], max_len: int, bos_id: int) -> list[int]:
    """Keep bos and the last max_len-1 tokens: the reply's end, where the reward is read, survives."""
    return tokens if len(tokens) <= max_len else [bos_id] + tokens[len(tokens) - max_len + 1 :]


def _reply_tokens(tokenizer, prompt: Prompt, reply: str, max_len: int) -> list[int]:
    rendered = render_chat(tokenizer, as_messages(prompt) + [{"role": "assistant", "content": reply}])
    return _fit(rendered.tokens, max_len, tokenizer.bos_id)


def _pad(rows: Sequence[list[int] | torch.Tensor], pad_id: int, T: int,
         left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):
        span = slice(T - len(row), T) if left else slice(0, len(row))
        tokens[b, span] = torch.as_tensor(row, dtype=torch.long)
        mask[b, span] = True
    return tokens, mask


class TokenizedPair(NamedTuple):
    """A pair's two conversations as `collate_pairs` renders them, fitted to max_len."""

    chosen: torch.Tensor  # (n,) int32
    rejected: torch.Tensor  # (m,) int32


class TokenizedRating(NamedTuple):
    """A rated conversation as `collate_ratings` renders it, and its 0-based rating class."""

    tokens: torch.Tensor  # (n,) int32
    label: int


def _reply_row(tokenizer, prompt: Prompt, reply: str, max_len: int) -> torch.Tensor:
    return torch.tensor(_reply_tokens(tokenizer, prompt, reply, max_len), dtype=torch.int32)


def tokenize_pairs(tokenizer, pairs: Sequence[PreferencePair], max_len: int) -> list[TokenizedPair]:
    """Render both halves of every pair with the chat template; over-long rows keep bos and their
    last tokens. The reward stage does this once, before its first step, like SFT's examples."""
    return [TokenizedPair(_reply_row(tokenizer, p.prompt, p.chosen, max_len),
                          _reply_row(tokenizer, p.prompt, p.rejected, max_len)) for p in pairs]


def tokenize_ratings(tokenizer, rated: Sequence[RatedResponse], max_len: int) -> list[TokenizedRating]:
    """Rated replies rendered like pair halves; labels are 0-based rating classes."""
    return [TokenizedRating(_reply_row(tokenizer, r.prompt, r.response, max_len), r.rating - 1) for r in rated]


def collate_tokenized_pairs(rows: Sequence[TokenizedPair], pad_id: int) -> PairBatch:
    """Right-pad both halves of tokenized pairs to one length."""
    chosen, rejected = [r.chosen for r in rows], [r.rejected for r in rows]
    T = max(len(row) for row in chosen + rejected)
    chosen_tokens, chosen_mask = _pad(chosen, pad_id, T)
    rejected_tokens, rejected_mask = _pad(rejected, pad_id, T)
    return PairBatch(
        chosen_tokens,
        chosen_mask,
        torch.tensor([len(row) - 1 for row in chosen], dtype=torch.long),
        rejected_tokens,
        rejected_mask,
        torch.tensor([len(row) - 1 for row in rejected], dtype=torch.long),
    )


def collate_tokenized_ratings(rows: Sequence[TokenizedRating], pad_id: int) -> RatingBatch:
    """Right-pad tokenized rated replies."""
    tokens, mask = _pad([r.tokens for r in rows], pad_id, max(len(r.tokens) for r in rows))
    last = torch.tensor([len(r.tokens) - 1 for r in rows], dtype=torch.long)
    return RatingBatch(tokens, mask, last, torch.tensor([r.label for r in rows], dtype=torch.long))


def collate_pairs(tokenizer, pairs: Sequence[PreferencePair], max_len: int) -> PairBatch:
    """Render both halves with the chat template; over-long rows keep bos and their last tokens."""
    return collate_tokenized_pairs(tokenize_pairs(tokenizer, pairs, max_len), tokenizer.pad_id)


def collate_ratings(tokenizer, rated: Sequence[RatedResponse], max_len: int) -> RatingBatch:
    """Rated replies rendered like pair halves; labels are 0-based rating classes."""
    return collate_tokenized_ratings(tokenize_ratings(tokenizer, rated, max_len), tokenizer.pad_id)
