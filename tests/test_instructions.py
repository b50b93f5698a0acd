"""SFT data: record formats and errors, length policy, collate targets, batches."""

import json

import pytest
import torch

from palmrl import tasks
from palmrl.data.chat import Rendered, render_chat
from palmrl.data.instructions import (
    IGNORE_INDEX,
    ShuffledBatches,
    build_sft_examples,
    collate_sft,
    load_instruction_records,
)
from palmrl.errors import UserError
from palmrl.tokenizer import byte_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path, lines):
    path.write_text("".join((json.dumps(line) if not isinstance(line, str) else line) + "\n" for line in lines))
    return str(path)


RECORDS = [
    {"instruction": "Reverse the letters of the word.", "input": "cat", "output": "tac"},
    {"instruction": "Say hello.", "output": "hello"},
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]},
    {"prompt": "Name a color.", "completion": "red"},
]


def test_alpaca_and_chat_records_from_local_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [RECORDS[0], "", *RECORDS[1:]])  # a blank line is skipped
    records = load_instruction_records({"source": "local", "path": path, "val_fraction": 0.0}, "train")
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": "Reverse the letters of the word.\ncat"}, {"role": "assistant", "content": "tac"}],
        [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello"}],
        RECORDS[2]["messages"],
        [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "red"}],
    ]
    # alpaca prompts use the same format as the tasks, so the checker reads them
    assert tasks.check(records[0]["messages"][0]["content"], "tac") == 1.0


def test_val_split_from_file_or_hash_holdout(tmp_path):
    lines = [{"instruction": f"Echo {i}.", "output": str(i)} for i in range(40)]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    cfg = {"source": "local", "path": path, "val_fraction": 0.3}
    train = load_instruction_records(cfg, "train")
    val = load_instruction_records(cfg, "val")
    as_text = lambda rs: {r["messages"][1]["content"] for r in rs}  # noqa: E731
    assert not as_text(train) & as_text(val)
    assert as_text(train) | as_text(val) == {str(i) for i in range(40)}
    assert 3 <= len(val) <= 25
    assert load_instruction_records(cfg, "val") == val  # deterministic
    val_path = write_jsonl(tmp_path / "val.jsonl", lines[:3])
    cfg = {**cfg, "val_path": val_path}
    assert len(load_instruction_records(cfg, "train")) == 40  # a named val file holds nothing out
    assert as_text(load_instruction_records(cfg, "val")) == {"0", "1", "2"}
    assert as_text(load_instruction_records(cfg, "test")) == {"0", "1", "2"}  # test falls back to val


def test_missing_field_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], "", RECORDS[1], {"instruction": "No answer."}])
    with pytest.raises(UserError, match=r"bad\.jsonl:4: missing key 'output'"):
        load_instruction_records({"source": "local", "path": path, "val_fraction": 0.0}, "train")
    path = write_jsonl(tmp_path / "bad_chat.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(UserError, match=r"bad_chat\.jsonl:1: messages\[0\] is missing key 'content'"):
        load_instruction_records({"source": "local", "path": path, "val_fraction": 0.0}, "train")
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?", "answer": "!"}])
    with pytest.raises(UserError, match=r"odd\.jsonl:1: missing key 'messages' or 'instruction'"):
        load_instruction_records({"source": "local", "path": path, "val_fraction": 0.0}, "train")


def test_empty_split_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", RECORDS)
    with pytest.raises(UserError, match="empty"):
        load_instruction_records({"source": "local", "path": path, "val_fraction": 0.0}, "val")
    with pytest.raises(UserError, match="data.name"):
        load_instruction_records({"source": "embedded", "name": "chatterbot"}, "train")


def test_task_records():
    cfg = {"source": "tasks", "train_size": 30, "val_size": 8, "seed": 1, "tasks": ["add", "reverse"]}
    train = load_instruction_records(cfg, "train")
    assert len(train) == 30 and len(load_instruction_records(cfg, "val")) == 8
    assert load_instruction_records(cfg, "train") == train
    for record in train:
        user, reply = record["messages"]
        assert record["task"] in ("add", "reverse")
        assert tasks.check(user["content"], reply["content"]) == 1.0


def test_length_policy(tok):
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    long_prompt = {"messages": [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "ok"}]}
    no_reply = {"messages": [{"role": "user", "content": "hi"}]}
    examples, stats = build_sft_examples(tok, [short, long_prompt, no_reply], max_len=10)
    assert stats == {"total": 3, "kept": 1, "truncated": 1, "dropped_long_prompt": 1, "dropped_no_response": 1, "dropped": 2, "loss_tokens": 5}
    assert len(examples[0].tokens) == 10 and examples[0].loss_mask[-5:] == [True] * 5
    with pytest.raises(UserError, match="max_len"):
        build_sft_examples(tok, [long_prompt], max_len=10)


def test_collate_targets_are_shifted_and_masked(tok):
    examples = [
        render_chat(tok, [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]),
        render_chat(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "xy"}]),
    ]
    batch = collate_sft(examples, pad_id=tok.pad_id)
    assert batch.tokens.shape == batch.targets.shape == (2, 8)
    c, d, eos, assistant = *tok.encode("cd"), tok.eos_id, tok.token_id("<|assistant|>")
    # row 0: <s> <|user|> a b <|assistant|> c d </s>; position t predicts t+1
    assert batch.tokens[0].tolist() == examples[0].tokens
    assert batch.targets[0].tolist() == [-100, -100, -100, -100, c, d, eos, -100]
    assert batch.tokens[0, 4] == assistant  # the role token predicts the first reply token
    # row 1 is one token shorter: right padding, no loss there
    assert batch.tokens[1, -1] == tok.pad_id and batch.targets[1, -3:].tolist() == [eos, -100, -100]
    assert batch.attention_mask.tolist() == [[True] * 8, [True] * 7 + [False]]
    assert batch.targets.dtype == torch.long
    # in general: target t is token t+1 exactly where token t+1 is trained
    for row, ex in enumerate(examples):
        for t in range(len(ex.tokens) - 1):
            expected = ex.tokens[t + 1] if ex.loss_mask[t + 1] else IGNORE_INDEX
            assert batch.targets[row, t] == expected
    assert collate_sft(examples, pad_id=tok.pad_id, max_len=5).tokens.shape == (2, 5)


def test_sft_batches_are_deterministic_and_sharded(tok):
    examples = [Rendered([tok.bos_id, i + 10, i + 11], [False, True, True]) for i in range(20)]
    val = examples[:5]
    make = lambda rank, seed=0: ShuffledBatches(examples, val, batch_size=3, pad_id=tok.pad_id, seed=seed, rank=rank, world_size=2)  # noqa: E731
    a, b = make(0), make(0)
    assert a.steps_per_epoch == 3
    for step in range(7):
        assert torch.equal(a.batch(step).tokens, b.batch(step).tokens)
        assert not set(a.indices(step)) & set(make(1).indices(step))  # ranks take different examples
    epoch = [i for step in range(3) for rank in (0, 1) for i in make(rank).indices(step)]
    assert len(set(epoch)) == 18  # one epoch visits 18 distinct examples (2 dropped as a partial batch)
    assert make(0).indices(3) != make(0).indices(0)  # the next epoch is reshuffled
    assert [make(0, seed=1).indices(s) for s in range(3)] != [a.indices(s) for s in range(3)]
    seen = [row[1].item() for rank in (0, 1) for batch in make(rank).eval_batches() for row in batch.tokens]
    assert sorted(seen) == [ex.tokens[1] for ex in val]  # every val example once across ranks
    with pytest.raises(UserError, match="global batch"):
        ShuffledBatches(examples[:5], batch_size=3, pad_id=0, world_size=2)
