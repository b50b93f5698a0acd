"""Data pipeline: embedded corpus, local/streaming sources and their errors, token shards, batches."""

import itertools
import json
import os
import threading
import time

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from palmrl.data import sources
from palmrl.data.embedded import chitchat_conversations, embedded_texts
from palmrl.data.sources import load_records, load_texts, source_fingerprint
from palmrl.data.tokens import TokenBatches, build_token_shards
from palmrl.errors import UserError
from palmrl.tokenizer import byte_tokenizer

pytestmark = pytest.mark.unit

DOCS = ["first document", "second one\nwith two lines", "third: ünïcödé 😀", "fourth", "fifth and last"]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return path


# --- embedded corpus ---------------------------------------------------------------------------


def test_embedded_texts_are_deterministic_conversations():
    first = list(embedded_texts())
    assert len(first) == 7168 and all(first)
    assert list(itertools.islice(embedded_texts(), 100)) == first[:100]
    lines = first[1].split("\n")
    assert all(line.startswith(("A: ", "B: ")) for line in lines)
    assert [line[0] for line in lines] == ["A", "B"] * (len(lines) // 2) + ["A"] * (len(lines) % 2)


def test_chitchat_conversations_carry_ratings_and_prompts():
    conversations = chitchat_conversations()
    rated = [c for c in conversations if c.ratings is not None]
    assert len(rated) == 5988
    assert set(rated[0].ratings) == {"interesting", "upbeat", "witty"}
    assert all(1 <= v <= 10 for c in rated for v in c.ratings.values())
    assert len({c.prompt for c in conversations if c.prompt}) >= 30


def test_embedded_source_through_load_texts():
    texts = list(load_texts({"source": "embedded", "max_documents": 3}))
    assert texts == list(itertools.islice(embedded_texts(), 3))
    with pytest.raises(UserError, match="data.name='pile'"):
        list(load_texts({"source": "embedded", "name": "pile"}))


# --- local files ---------------------------------------------------------------------------------


def test_local_formats_give_the_same_documents(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in DOCS]))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "c.parquet")
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS))  # paragraphs are documents
    for name in ("c.jsonl", "c.json", "c.parquet", "c.txt"):
        assert list(load_texts({"source": "local", "path": str(tmp_path / name)})) == DOCS, name


def test_glob_list_and_folder_paths(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", DOCS[2:])
    write_jsonl(tmp_path / "a.jsonl", DOCS[:2])
    (tmp_path / "notes.md").write_text("ignored by the folder form")
    assert list(load_texts({"source": "local", "path": str(tmp_path / "*.jsonl")})) == DOCS  # sorted
    listed = [str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")]
    assert list(load_texts({"source": "local", "path": listed})) == DOCS[2:] + DOCS[:2]
    assert list(load_texts({"source": "local", "path": str(tmp_path)})) == DOCS
    records = list(load_records({"source": "local", "path": str(tmp_path / "a.jsonl")}))
    assert records == [{"text": DOCS[0], "n": 0}, {"text": DOCS[1], "n": 1}]


def test_streaming_path_on_local_jsonl(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    seen = []
    real_load = datasets.load_dataset

    def spy(*args, **kwargs):
        table = real_load(*args, **kwargs)
        seen.append((kwargs["streaming"], type(table)))
        return table

    monkeypatch.setattr(datasets, "load_dataset", spy)
    cfg = {"source": "local", "path": str(tmp_path / "c.jsonl"), "streaming": True, "max_documents": 4}
    assert list(load_texts(cfg)) == DOCS[:4]
    assert seen == [(True, datasets.IterableDataset)]


def test_hf_source_reads_a_dataset_folder_offline(tmp_path):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "train.jsonl", DOCS)
    for streaming in (False, True):
        cfg = {"source": "hf", "name": str(tmp_path / "corpus"), "split": "train", "streaming": streaming}
        assert list(load_texts(cfg)) == DOCS
    with pytest.raises(UserError, match="data.name is not set"):
        list(load_texts({"source": "hf"}))


@pytest.mark.parametrize("streaming", [False, True])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, streaming):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n{"text": "ok"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:3: malformed JSON"):
        list(load_texts({"source": "local", "path": str(path), "streaming": streaming}))


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"text": "a"},\n{"text": "b",,}\n]\n')
    with pytest.raises(UserError, match=r"bad\.json:3"):
        list(load_texts({"source": "local", "path": str(path)}))


def test_source_errors_name_the_key(tmp_path):
    with pytest.raises(UserError, match="data.path='.*nothing-here"):
        list(load_texts({"source": "local", "path": str(tmp_path / "nothing-here*.jsonl")}))
    with pytest.raises(UserError, match="data.path is not set"):
        list(load_texts({"source": "local"}))
    with pytest.raises(UserError, match="data.source='s3'"):
        list(load_texts({"source": "s3"}))
    (tmp_path / "c.csv").write_text("text\nx\n")
    with pytest.raises(UserError, match="unsupported extension"):
        list(load_texts({"source": "local", "path": str(tmp_path / "c.csv")}))
    write_jsonl(tmp_path / "c.jsonl", DOCS, field="body")
    with pytest.raises(UserError, match=r"data.text_field='text' is not a field of .*c\.jsonl"):
        list(load_texts({"source": "local", "path": str(tmp_path / "c.jsonl")}))
    assert list(load_texts({"source": "local", "path": str(tmp_path / "c.jsonl"), "text_field": "body"})) == DOCS


@pytest.mark.parametrize("streaming", [False, True])
def test_empty_corpus_is_a_user_error(tmp_path, streaming):
    write_jsonl(tmp_path / "blank-docs.jsonl", ["", " \n "])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "empty.jsonl").write_text("")
    for name in ("blank-docs.jsonl", "empty.txt", "blank.txt", "blank.jsonl", "empty.jsonl"):
        with pytest.raises(UserError, match="is empty"):
            list(load_texts({"source": "local", "path": str(tmp_path / name), "streaming": streaming}))
    write_jsonl(tmp_path / "some.jsonl", DOCS[:1])
    assert list(load_texts({"source": "local", "path": str(tmp_path / "*"), "streaming": streaming})) == DOCS[:1]


def test_fingerprint_follows_the_content(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS)
    cfg = {"source": "local", "path": str(path)}
    first = source_fingerprint(cfg)
    assert source_fingerprint(dict(cfg)) == first
    assert source_fingerprint({**cfg, "max_documents": 2}) != first
    write_jsonl(path, DOCS + ["one more"])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert source_fingerprint(cfg) != first
    assert source_fingerprint({"source": "embedded"}) == source_fingerprint({"source": "embedded", "name": "chitchat"})
    assert source_fingerprint({"source": "hf", "name": "a/b"}) != source_fingerprint({"source": "hf", "name": "a/c"})


# --- token shards --------------------------------------------------------------------------------


def split_documents(tokens, tokenizer):
    """Decode a packed stream back into its documents."""
    ids = np.asarray(tokens).tolist()
    docs, current = [], []
    for token in ids:
        if token == tokenizer.eos_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert current == []  # every document ends with eos
    return docs


def test_shards_are_cached_and_splits_disjoint(tmp_path):
    tokenizer = byte_tokenizer()
    corpus = [f"document number {i} " + "x" * (i % 7) for i in range(400)]
    calls = []

    def factory():
        calls.append(1)
        return iter(corpus)

    splits = build_token_shards(factory, tokenizer, fingerprint="f1", cache_dir=tmp_path, val_fraction=0.1)
    assert calls == [1] and splits.train.dtype == np.uint16
    train_docs, val_docs = split_documents(splits.train, tokenizer), split_documents(splits.val, tokenizer)
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(corpus)
    assert 10 <= len(val_docs) <= 80  # ~10% of 400
    assert splits.meta["train_documents"] == len(train_docs)
    mtime = (splits.path / "train.bin").stat().st_mtime_ns

    again = build_token_shards(factory, tokenizer, fingerprint="f1", cache_dir=tmp_path, val_fraction=0.1)
    assert calls == [1] and again.path == splits.path
    assert (again.path / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(again.train, splits.train) and np.array_equal(again.val, splits.val)

    other = build_token_shards(factory, tokenizer, fingerprint="f2", cache_dir=tmp_path, val_fraction=0.1)
    assert calls == [1, 1] and other.path != splits.path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_small_corpus_still_gets_a_val_document(tmp_path):
    tokenizer = byte_tokenizer()
    splits = build_token_shards(lambda: DOCS, tokenizer, fingerprint="small", cache_dir=tmp_path, val_fraction=0.01)
    assert splits.meta["val_documents"] == 1
    assert sorted(split_documents(splits.train, tokenizer) + split_documents(splits.val, tokenizer)) == sorted(DOCS)
    none = build_token_shards(lambda: DOCS, tokenizer, fingerprint="small", cache_dir=tmp_path, val_fraction=0.0)
    assert len(none.val) == 0 and split_documents(none.train, tokenizer) == DOCS


def test_non_writer_waits_for_the_writer(tmp_path):
    tokenizer = byte_tokenizer()
    with pytest.raises(UserError, match="waited 0 s for rank 0"):
        build_token_shards(lambda: DOCS, tokenizer, fingerprint="w", cache_dir=tmp_path, is_writer=False, wait_timeout_s=0.2)

    def writer():
        time.sleep(0.3)
        build_token_shards(lambda: DOCS, tokenizer, fingerprint="w", cache_dir=tmp_path)

    thread = threading.Thread(target=writer)
    thread.start()
    splits = build_token_shards(lambda: 1 / 0, tokenizer, fingerprint="w", cache_dir=tmp_path, is_writer=False, wait_timeout_s=30)
    thread.join()
    assert splits.meta["train_documents"] + splits.meta["val_documents"] == len(DOCS)


def test_damaged_cache_and_empty_corpus_are_user_errors(tmp_path):
    tokenizer = byte_tokenizer()
    splits = build_token_shards(lambda: DOCS, tokenizer, fingerprint="d", cache_dir=tmp_path)
    del splits
    with open(next(tmp_path.glob("*/train.bin")), "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match="damaged"):
        build_token_shards(lambda: DOCS, tokenizer, fingerprint="d", cache_dir=tmp_path)
    with pytest.raises(UserError, match="no training tokens"):
        build_token_shards(lambda: [], tokenizer, fingerprint="e", cache_dir=tmp_path)


# --- batches -------------------------------------------------------------------------------------

SEQ, B = 7, 4  # windows of 8 tokens


def window_ids(batch):
    """tokens are arange(N), so a window is named by its first token // (SEQ + 1)."""
    assert torch.equal(batch - batch[:, :1], torch.arange(SEQ + 1).expand_as(batch))  # contiguous windows
    return (batch[:, 0] // (SEQ + 1)).tolist()


def test_batches_are_a_pure_function_of_seed_step_rank():
    tokens = np.arange(8 * 64 + 5, dtype=np.uint32)  # 64 windows and a 5-token tail
    a = TokenBatches(tokens, seq_len=SEQ, batch_size=B, seed=1, rank=0, world_size=2)
    batch = a.batch(3)
    assert batch.shape == (B, SEQ + 1) and batch.dtype == torch.int64
    assert torch.equal(a.batch(3), batch)
    resumed = TokenBatches(tokens, seq_len=SEQ, batch_size=B, seed=1, rank=0, world_size=2)
    assert torch.equal(resumed.batch(3), batch)  # a fresh instance (a resumed run) sees the same data
    other_rank = TokenBatches(tokens, seq_len=SEQ, batch_size=B, seed=1, rank=1, world_size=2)
    assert not set(window_ids(other_rank.batch(3))) & set(window_ids(batch))
    other_seed = TokenBatches(tokens, seq_len=SEQ, batch_size=B, seed=2, rank=0, world_size=2)
    assert not torch.equal(other_seed.batch(3), batch)
    assert a.tokens_per_step == B * SEQ * 2 and a.steps_per_epoch == 8


def test_each_epoch_covers_every_window_once():
    tokens = np.arange(8 * 64, dtype=np.uint16)
    ranks = [TokenBatches(tokens, seq_len=SEQ, batch_size=B, seed=0, rank=r, world_size=2) for r in range(2)]
    for epoch in range(3):
        seen = [w for step in range(8 * epoch, 8 * epoch + 8) for r in ranks for w in window_ids(r.batch(step))]
        assert sorted(seen) == list(range(64)), epoch
    assert window_ids(ranks[0].batch(0)) != window_ids(ranks[0].batch(8))  # a fresh order each epoch


def test_batches_cross_epoch_boundaries():
    tokens = np.arange(8 * 10, dtype=np.uint16)  # 10 windows, 4 per step: step 2 spans two epochs
    batches = TokenBatches(tokens, seq_len=SEQ, batch_size=B, seed=0)
    seen = [w for step in range(5) for w in window_ids(batches.batch(step))]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_eval_batches_are_fixed_and_split_across_ranks():
    tokens = np.arange(8 * 50, dtype=np.uint16)
    ranks = [TokenBatches(tokens, seq_len=SEQ, batch_size=B, seed=s, rank=r, world_size=2) for r, s in ((0, 0), (1, 9))]
    first = [window_ids(b) for b in ranks[0].eval_batches(3)]
    assert first == [window_ids(b) for b in ranks[0].eval_batches(3)]
    second = [window_ids(b) for b in ranks[1].eval_batches(3)]
    flat = [w for batch in first + second for w in batch]
    assert len(first) == len(second) == 3 and len(set(flat)) == len(flat) == 24
    assert len(list(ranks[0].eval_batches(100))) == 6  # capped at 50 // (4 * 2) for every rank


def test_too_little_data_names_the_numbers():
    with pytest.raises(UserError, match=r"val split holds 30 tokens = 3 windows of seq_len\+1=8"):
        TokenBatches(np.arange(30, dtype=np.uint16), seq_len=SEQ, batch_size=B, seed=0, name="val split")


def test_shards_feed_batches_end_to_end(tmp_path):
    tokenizer = byte_tokenizer()
    splits = build_token_shards(
        lambda: load_texts({"source": "embedded", "max_documents": 200}),
        tokenizer,
        fingerprint=sources.source_fingerprint({"source": "embedded", "max_documents": 200}),
        cache_dir=tmp_path,
        val_fraction=0.05,
    )
    batches = TokenBatches(splits.train, seq_len=64, batch_size=8, seed=0)
    batch = batches.batch(0)
    assert batch.shape == (8, 65) and int(batch.max()) < tokenizer.vocab_size
    assert len(list(TokenBatches(splits.val, seq_len=64, batch_size=8, seed=0).eval_batches(2))) == 2
