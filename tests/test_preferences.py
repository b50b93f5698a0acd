"""Reward/PPO data: pair and rating loaders with their errors, embedded task data, collates."""

import json
from collections import Counter

import pytest

from palmrl import tasks
from palmrl.data.chat import render_chat
from palmrl.data.preferences import (
    PreferencePair,
    RatedResponse,
    collate_pairs,
    collate_ratings,
    embedded_task_pairs,
    load_preference_pairs,
    load_prompts,
    load_ratings,
)
from palmrl.errors import UserError
from palmrl.tokenizer import byte_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def local(tmp_path, name, records, **extra):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"source": "local", "path": str(path), "val_fraction": 0.0, **extra}


def test_identical_pairs_are_dropped_and_counted(tmp_path):
    cfg = local(tmp_path, "pairs.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Hi", "chosen": "hello", "rejected": " hello "},
        {"prompt": "Sky?", "chosen": "blue", "rejected": "green"},
    ])
    pairs, stats = load_preference_pairs(cfg, "train")
    assert stats == {"total": 3, "kept": 2, "dropped_identical": 1}
    assert pairs == [PreferencePair("2+2?", "4", "5"), PreferencePair("Sky?", "blue", "green")]


def test_chat_style_pairs(tmp_path):
    context = [{"role": "user", "content": "Name a fruit."}]
    cfg = local(tmp_path, "chat_pairs.jsonl", [
        {"chosen": context + [{"role": "assistant", "content": "apple"}], "rejected": context + [{"role": "assistant", "content": "rock"}]},
    ])
    pairs, _ = load_preference_pairs(cfg, "train")
    assert pairs == [PreferencePair(context, "apple", "rock")]
    bad = local(tmp_path, "diverging.jsonl", [
        {"chosen": context + [{"role": "assistant", "content": "apple"}], "rejected": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "x"}]},
    ])
    with pytest.raises(UserError, match=r"diverging\.jsonl:1: 'chosen' and 'rejected' conversations differ"):
        load_preference_pairs(bad, "train")


def test_missing_pair_field_names_file_and_line(tmp_path):
    cfg = local(tmp_path, "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(UserError, match=r"pairs\.jsonl:2: missing key 'rejected'"):
        load_preference_pairs(cfg, "train")
    cfg = local(tmp_path, "noprompt.jsonl", [{"chosen": "b", "rejected": "c"}])
    with pytest.raises(UserError, match=r"noprompt\.jsonl:1: missing key 'prompt'"):
        load_preference_pairs(cfg, "train")


def test_ratings_in_and_out_of_range(tmp_path):
    cfg = local(tmp_path, "ok.jsonl", [{"prompt": "a", "response": "b", "rating": 1}, {"prompt": "a", "response": "c", "rating": 4.0}])
    assert load_ratings(cfg, "train", num_bins=4) == [RatedResponse("a", "b", 1), RatedResponse("a", "c", 4)]
    for bad_rating in (0, 5, 2.5, True):
        cfg = local(tmp_path, "bad.jsonl", [{"prompt": "a", "response": "b", "rating": 2}, {"prompt": "a", "response": "b", "rating": bad_rating}])
        with pytest.raises(UserError, match=r"bad\.jsonl:2: rating .* not an integer in 1\.\.4"):
            load_ratings(cfg, "train", num_bins=4)
    cfg = local(tmp_path, "text.jsonl", [{"prompt": "a", "response": "b", "rating": "good"}])
    with pytest.raises(UserError, match=r"text\.jsonl:1: rating 'good' is not an integer"):
        load_ratings(cfg, "train", num_bins=4)
    cfg = local(tmp_path, "norating.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(UserError, match=r"norating\.jsonl:1: missing key 'rating'"):
        load_ratings(cfg, "train", num_bins=4)


def test_embedded_task_pairs_are_verified_hard_negatives():
    pairs = embedded_task_pairs("train", 300, seed=0)
    assert pairs == embedded_task_pairs("train", 300, seed=0)
    for pair in pairs:
        assert pair.chosen != pair.rejected
        assert tasks.check(pair.prompt, pair.chosen) == 1.0
        assert tasks.check(pair.prompt, pair.rejected) == 0.0
    loaded, stats = load_preference_pairs({"source": "tasks", "train_size": 300, "val_size": 50, "seed": 0}, "train")
    assert loaded == pairs and stats["dropped_identical"] == 0
    val, _ = load_preference_pairs({"source": "tasks", "train_size": 300, "val_size": 50, "seed": 0}, "val")
    assert len(val) == 50 and not {p.prompt for p in val} & {p.prompt for p in pairs}


def test_embedded_task_ratings_follow_the_checker():
    rated = load_ratings({"source": "tasks", "train_size": 600, "seed": 0}, "train", num_bins=5)
    assert len(rated) == 600
    assert Counter(r.rating for r in rated).keys() == {1, 2, 3, 4, 5}  # every bin is used
    for r in rated:
        assert (r.rating == 5) == (tasks.check(r.prompt, r.response) == 1.0)
    two = load_ratings({"source": "tasks", "train_size": 100, "seed": 0}, "train", num_bins=2)
    assert {r.rating for r in two} == {1, 2}
    with pytest.raises(UserError, match="num_bins"):
        load_ratings({"source": "tasks"}, "train", num_bins=1)


def test_chitchat_ratings_and_pairs():
    rated = load_ratings({"source": "embedded", "name": "chitchat"}, "val", num_bins=5)
    assert len(rated) > 100 and {r.rating for r in rated} <= {1, 2, 3, 4, 5}
    pairs, stats = load_preference_pairs({"source": "embedded", "name": "chitchat"}, "val")
    assert stats["kept"] > 50 and all(p.chosen != p.rejected for p in pairs)


def test_prompts(tmp_path):
    prompts = load_prompts({"source": "tasks", "val_size": 40, "seed": 2}, "val")
    assert len(prompts) == 40 and all(tasks.task_of(p) and tasks.prompt_split(p) == "val" for p in prompts)
    assert load_prompts({"source": "tasks", "seed": 2}, "test", n=7) == load_prompts({"source": "tasks", "seed": 2}, "test", n=7)
    assert len(load_prompts({"source": "tasks"}, "test", n=7)) == 7
    cfg = local(tmp_path, "prompts.jsonl", [
        {"prompt": "Tell me a joke."},
        {"instruction": "Reverse the letters of the word.", "input": "cat"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]},
    ])
    assert load_prompts(cfg, "train") == ["Tell me a joke.", "Reverse the letters of the word.\ncat", [{"role": "user", "content": "hi"}]]
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(cfg, "val")  # val_fraction 0: nothing held out
    with pytest.raises(UserError, match=r"bad\.jsonl:1: missing key 'prompt'"):
        load_prompts(local(tmp_path, "bad.jsonl", [{"text": "x"}]), "train")


def test_collate_pairs(tok):
    pairs = [PreferencePair("2+2?", "4", "five"), PreferencePair([{"role": "user", "content": "hi"}], "hello", "no")]
    batch = collate_pairs(tok, pairs, max_len=64)
    T = batch.chosen_tokens.shape[1]
    assert batch.rejected_tokens.shape == (2, T) and batch.chosen_last.shape == (2,)
    for b, pair in enumerate(pairs):
        for reply, tokens, mask, last in (
            (pair.chosen, batch.chosen_tokens, batch.chosen_attention_mask, batch.chosen_last),
            (pair.rejected, batch.rejected_tokens, batch.rejected_attention_mask, batch.rejected_last),
        ):
            messages = [{"role": "user", "content": pair.prompt}] if isinstance(pair.prompt, str) else pair.prompt
            rendered = render_chat(tok, messages + [{"role": "assistant", "content": reply}]).tokens
            assert tokens[b, : len(rendered)].tolist() == rendered
            assert mask[b].sum() == len(rendered) and mask[b, : len(rendered)].all()
            assert last[b] == len(rendered) - 1 and tokens[b, last[b]] == tok.eos_id
            assert (tokens[b, len(rendered) :] == tok.pad_id).all()
    # too long: bos survives, and so does the end of the reply where the reward is read
    long = collate_pairs(tok, [PreferencePair("x" * 50, "yes", "no")], max_len=16)
    assert long.chosen_tokens.shape[1] == 16 and long.chosen_tokens[0, 0] == tok.bos_id
    assert long.chosen_tokens[0, -4:].tolist() == tok.encode("yes") + [tok.eos_id] and long.chosen_last[0] == 15


def test_collate_ratings(tok):
    batch = collate_ratings(tok, [RatedResponse("a", "b", 1), RatedResponse("a", "longer", 3)], max_len=32)
    assert batch.labels.tolist() == [0, 2]
    assert [batch.tokens[b, batch.last[b]].item() for b in range(2)] == [tok.eos_id] * 2
