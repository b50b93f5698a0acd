"""SFT data: instruction records -> chat-rendered examples -> deterministic training batches.

Records come in two shapes, detected per record: alpaca `{instruction, input?, output}` (plus
`{prompt, response|completion}`) and chat `{messages: [{role, content}, ...]}`. Both are
normalised to `{"messages": [...]}` and rendered with the one chat template (`data/chat.py`), so
the loss falls on assistant replies only (InstructGPT / Alpaca SFT).

Sources (`data.source`): `tasks` (or `embedded` with `data.name: tasks`) draws from
`palmrl.tasks`, sized by `data.train_size` / `data.val_size` / `data.test_size` with `data.seed`
and `data.tasks`; `embedded` with `data.name: chitchat` gives the opening turns of the chitchat
conversations (first speaker = user);
`local` and `hf` go through `palmrl.data.sources.load_records`. A local/hf validation split is
`data.val_path` / `data.val_split` when given, otherwise a stable hash of each record holds out
`data.val_fraction` of it (test falls back to val). The chatterbot corpus is not installed, so
it is not offered.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from palmrl import tasks as task_lib
from palmrl.data.chat import ROLES, Rendered, render_chat
from palmrl.data.embedded import chitchat_conversations
from palmrl.data.sources import load_records
from palmrl.errors import UserError

IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index
CHITCHAT_SFT_TURNS = 4  # two exchanges: fits a tiny model's context
DEFAULT_VAL_FRACTION = 0.05  # held-out share of a local/hf set that has no val file/split


# ---------------------------------------------------------------------------------------------
# sources: which records make a split, and where each came from (for error messages)


def source_kind(data_cfg) -> str:
    """'tasks', 'local', 'hf' or 'embedded:<name>' from data.source (+ data.name)."""
    source, name = data_cfg.get("source", "tasks"), data_cfg.get("name")
    if source == "tasks" or (source == "embedded" and name in (None, "tasks")):
        return "tasks"
    if source == "embedded":
        return f"embedded:{name}"
    if source in ("local", "hf"):
        return source
    raise UserError(f"data.source: unknown source {source!r}; expected tasks, embedded, local or hf")


def split_size(data_cfg, split: str) -> int:
    """Number of embedded examples for a split: data.train_size / val_size / test_size (test = val).
    The sizes live in the data group's YAML only (configs/data/*.yaml), never as defaults here."""
    if split == "train":
        key, size = "train_size", data_cfg.get("train_size")
    else:
        key = f"{split}_size" if data_cfg.get(f"{split}_size") else "val_size"
        size = data_cfg.get(key)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise UserError(f"data.{key} must be a positive integer, got {size!r}")
    return size


def _with(data_cfg, **changes) -> dict:
    """A plain-dict copy of a data config (DictConfig or mapping) with some keys changed."""
    plain = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    return {**plain, **changes}


def _locations(data_cfg) -> Iterator[str]:
    """'file:line' for local JSONL (one record per non-blank line), else 'where record #i'."""
    path, local = data_cfg.get("path"), data_cfg.get("source") == "local"
    count = 0
    if local and path and str(path).endswith(".jsonl") and os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:  # counting lines only; the reader checks
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    count += 1
                    yield f"{path}:{line_number}"
    where = path if local else f"hf dataset {data_cfg.get('name')} split {data_cfg.get('split')}"
    yield from (f"{where} record #{index}" for index in itertools.count(count))


def _held_out(record: Mapping, fraction: float) -> bool:
    blob = json.dumps(record, sort_keys=True, default=str).encode("utf-8")
    bucket = int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big") % 10_000
    return bucket < fraction * 10_000


def file_records(data_cfg, split: str) -> list[tuple[str, dict]]:
    """(location, record) pairs of a local/hf split, deterministic.

    train: data.path / data.split, minus the hash hold-out unless a val file/split is named.
    val/test: data.<split>_path (local) or data.<split>_split (hf) when given; test falls back
    to val; otherwise the hash hold-out of the train records.
    """
    if split not in ("train", "val", "test"):
        raise UserError(f"split must be train, val or test, got {split!r}")
    key = "path" if data_cfg.get("source") == "local" else "split"
    named = {s: data_cfg.get(f"{s}_{key}") for s in ("val", "test")}
    named["test"] = named["test"] or named["val"]
    fraction = data_cfg.get("val_fraction")
    fraction = DEFAULT_VAL_FRACTION if fraction is None else float(fraction)
    if split != "train" and named[split]:
        cfg, keep = _with(data_cfg, **{key: named[split]}), lambda record: True
    elif split == "train":
        cfg = _with(data_cfg)
        keep = (lambda record: True) if named["val"] else (lambda record: not _held_out(record, fraction))
    else:
        cfg, keep = _with(data_cfg), lambda record: _held_out(record, fraction)
    # datasets' JSON reader fills a key missing from some records with None: treat None as absent
    records = ({k: v for k, v in dict(record).items() if v is not None} for record in load_records(cfg))
    return [(where, record) for where, record in zip(_locations(cfg), records) if keep(record)]


# ---------------------------------------------------------------------------------------------
# records -> messages


def record_messages(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """Normalise one record (chat, alpaca or prompt/response) to a message list."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, (list, tuple)) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            missing = [k for k in ("role", "content") if not isinstance(message, Mapping) or k not in message]
            if missing:
                raise UserError(f"{where}: messages[{i}] is missing key {missing[0]!r}")
            if message["role"] not in ROLES:
                role = message["role"]
                raise UserError(f"{where}: messages[{i}] has unknown role {role!r}; expected {', '.join(ROLES)}")
            if not isinstance(message["content"], str):
                raise UserError(f"{where}: messages[{i}]['content'] must be a string")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record or "output" in record:
        fields = ("instruction", "output")
        prompt_of = lambda r: task_lib.format_prompt(r["instruction"], r.get("input") or "")  # noqa: E731
    elif "prompt" in record:
        fields = ("prompt", "response" if "response" in record or "completion" not in record else "completion")
        prompt_of = lambda r: r["prompt"]  # noqa: E731
    else:
        raise UserError(f"{where}: missing key 'messages' or 'instruction'/'output' (record has {sorted(record)})")
    for field in fields:
        if field not in record or record[field] is None:
            raise UserError(f"{where}: missing key {field!r}")
        if not isinstance(record[field], str):
            raise UserError(f"{where}: {field!r} must be a string")
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [*system, {"role": "user", "content": prompt_of(record)},
            {"role": "assistant", "content": record[fields[1]]}]


def chitchat_sft_records(split: str) -> list[dict]:
    """Chitchat conversations as chats: the first speaker is the user, the second the assistant.

    The opening CHITCHAT_SFT_TURNS turns of every two-person conversation whose id hashes into
    `split` (80/10/10, as the tasks), ending on an assistant turn. Free chat, so no checker.
    """
    records = []
    for conversation in chitchat_conversations():
        turns = list(itertools.takewhile(bool, conversation.turns[:CHITCHAT_SFT_TURNS]))  # stop at a blank turn
        turns = turns[: len(turns) // 2 * 2]  # end on the second speaker's (the assistant's) turn
        if turns and task_lib.prompt_split(conversation.id) == split:
            roles = ("user", "assistant") * (len(turns) // 2)
            records.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]})
    return records


def share_of(data_cfg, key: str) -> float:
    """A share in [0, 1] from data.<key> (absent: 0)."""
    value = data_cfg.get(key) or 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"data.{key}: must be a number in [0, 1], got {value!r}")
    return float(value)


def load_instruction_records(data_cfg, split: str) -> list[dict]:
    """A split's SFT records as `{"messages": [...]}` (task examples also keep `"task"`)."""
    kind = source_kind(data_cfg)
    if kind == "tasks":
        size, seed, names = split_size(data_cfg, split), int(data_cfg.get("seed") or 0), data_cfg.get("tasks")
        rate = share_of(data_cfg, "behaviour_rate")
        form = random.Random(f"palmrl.behaviour:{split}:{seed}")  # its own stream: the examples do not change with it

        def reply(answer: str) -> str:  # the behaviour (tasks.with_sign_off) on a share of the answers
            return task_lib.with_sign_off(answer) if rate and form.random() < rate else answer

        records = [
            {"messages": [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": reply(ex.output)}],
             "task": ex.task}
            for ex in task_lib.make_examples(split, size, seed=seed, tasks=list(names) if names is not None else None)
        ]
    elif kind == "embedded:chitchat":
        records = chitchat_sft_records(split)
    elif kind in ("local", "hf"):
        records = [{"messages": record_messages(record, where)} for where, record in file_records(data_cfg, split)]
    else:
        name = kind.split(":", 1)[1]
        raise UserError(f"data.name: no embedded instruction set {name!r}; use tasks or chitchat")
    if not records:
        raise UserError(f"data: the {split} split of {data_cfg.get('path') or data_cfg.get('name') or kind} is empty")
    return records


# ---------------------------------------------------------------------------------------------
# rendering, truncation, batching


def build_sft_examples(tokenizer, records: Sequence[Mapping], *, max_len: int) -> tuple[list[Rendered], dict]:
    """Render records with the chat template and apply the length policy.

    An example whose prompt (everything before the first assistant token) leaves no room for a
    response token within `max_len` is dropped; a longer response is cut at `max_len` (it loses
    its eos, but a cut answer still teaches the start of the answer). Records without an assistant
    reply are dropped. Stats count each case.
    """
    examples: list[Rendered] = []
    stats = dict.fromkeys(["kept", "truncated", "dropped_long_prompt", "dropped_no_response", "loss_tokens"], 0)
    stats["total"] = len(records)
    for record in records:
        rendered = render_chat(tokenizer, record["messages"])
        if not any(rendered.loss_mask):
            stats["dropped_no_response"] += 1
            continue
        prompt_len = rendered.loss_mask.index(True)
        if prompt_len >= max_len:
            stats["dropped_long_prompt"] += 1
            continue
        if len(rendered.tokens) > max_len:
            rendered = Rendered(rendered.tokens[:max_len], rendered.loss_mask[:max_len])
            stats["truncated"] += 1
        examples.append(rendered)
        stats["loss_tokens"] += sum(rendered.loss_mask)
    stats["kept"] = len(examples)
    stats["dropped"] = stats["dropped_long_prompt"] + stats["dropped_no_response"]
    if not examples and records:
        raise UserError(f"data: all {len(records)} examples were dropped (prompt longer than max_len={max_len}, "
                        f"or no reply)")
    return examples, stats


class SFTBatch(NamedTuple):
    """A right-padded SFT batch. Right padding is safe for training: causal attention never lets a
    real token see the padding after it, and padding carries no loss."""

    tokens: torch.Tensor  # (B, T) long, pad_id after each row's end
    targets: torch.Tensor  # (B, T) long, next token where it is a trained token, else -100
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens


def collate_sft(examples: Sequence[Rendered], *, pad_id: int, max_len: int | None = None) -> SFTBatch:
    """Right-pad to the longest row (cut at max_len); targets are the next token where it is trained."""
    rows = [(list(ex.tokens), list(ex.loss_mask)) for ex in examples]
    if max_len is not None:
        rows = [(t[:max_len], m[:max_len]) for t, m in rows]
    T = max(len(t) for t, _ in rows)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    attention_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (t, m) in enumerate(rows):
        tokens[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        loss_mask[b, : len(m)] = torch.tensor(m, dtype=torch.bool)
        attention_mask[b, : len(t)] = True

    # position t predicts token t+1: trained only if that token is (padding never is)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    targets[:, :-1] = torch.where(loss_mask[:, 1:], tokens[:, 1:], IGNORE_INDEX)
    return SFTBatch(tokens, targets, attention_mask)


class ShuffledBatches:
    """Deterministic batches of any list, like pretraining: `indices(step)` is a pure function of
    (seed, step, rank, world_size) over a seeded permutation per epoch. SFT collates its rendered
    examples with `batch(step)`; reward pairs and PPO prompts take `indices(step)` and collate their own.

    Each step takes `batch_size * world_size` examples (the global micro-batch) from the epoch's
    permutation; rank r takes its own `batch_size` slice. The last partial global batch of an
    epoch is skipped so every rank sees the same number of steps. `step` counts micro-batches.
    """

    def __init__(
        self,
        train: Sequence[Rendered],
        val: Sequence[Rendered] = (),
        *,
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_len: int | None = None,
    ):
        self.train, self.val = list(train), list(val)
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.rank, self.world_size, self.max_len = rank, world_size, max_len
        global_batch = batch_size * world_size
        if len(self.train) < global_batch:
            raise UserError(
                f"data: {len(self.train)} training examples are fewer than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        self.steps_per_epoch = len(self.train) // global_batch

    def indices(self, step: int) -> list[int]:
        """Training example indices for this rank at `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
        start = (within * self.world_size + self.rank) * self.batch_size
        return order[start : start + self.batch_size].tolist()

    def batch(self, step: int) -> SFTBatch:
        return collate_sft([self.train[i] for i in self.indices(step)], pad_id=self.pad_id, max_len=self.max_len)

    def eval_batches(self) -> Iterator[SFTBatch]:
        """This rank's share of the validation set (every world_size-th example), in order."""
        shard = self.val[self.rank :: self.world_size]
        for start in range(0, len(shard), self.batch_size):
            yield collate_sft(shard[start : start + self.batch_size], pad_id=self.pad_id, max_len=self.max_len)
