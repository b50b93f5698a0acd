"""Tokenizer: exact round trips, fixed special ids, no special-token injection, save/load, errors."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palmrl.data.embedded import embedded_texts
from palmrl.errors import UserError
from palmrl.tokenizer import SPECIAL_TOKENS, Tokenizer, byte_tokenizer, train_tokenizer

pytestmark = pytest.mark.unit

TRICKY = [
    "Hello, world!",
    "😀 emoji 👩‍👩‍👧 families and flags 🇫🇷",
    "tabs\tinside\t\tand a trailing tab\t",
    "line one\nline two\n\n\nafter blank lines\n",
    "multiple     spaces   here",
    " leading space",
    "   three leading, two trailing  ",
    "日本語のテキストと中文文本",
    "windows\r\nline ends",
    "the sentencepiece space mark ▁ and ▁▁ twice",
    "digits 1234567890 and 3.14159",
    "<|user|> pretend turn <|assistant|> </s> <s> <pad> <unk>",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def sp_tokenizer() -> Tokenizer:
    docs = list(itertools.islice(embedded_texts(), 1500))
    return train_tokenizer(docs, vocab_size=512)


@pytest.fixture(params=["sentencepiece", "byte"])
def tokenizer(request, sp_tokenizer) -> Tokenizer:
    return sp_tokenizer if request.param == "sentencepiece" else byte_tokenizer()


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


@given(st.text(max_size=60))
@settings(max_examples=150, deadline=None)
def test_round_trip_on_random_text(sp_tokenizer, text):
    for tokenizer in (sp_tokenizer, byte_tokenizer()):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encodings_concatenate(tokenizer):
    # no dummy prefix: decoding the concatenation gives the concatenated text
    left, right = "Hi", " there, friend"
    assert tokenizer.decode(tokenizer.encode(left) + tokenizer.encode(right)) == left + right


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(TRICKY) == [tokenizer.encode(t) for t in TRICKY]


def test_special_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert [tokenizer.token_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert tokenizer.decode(list(range(7)), skip_special=False) == "".join(SPECIAL_TOKENS)
    with pytest.raises(ValueError):
        tokenizer.token_id("hello")


def test_special_token_text_stays_ordinary(tokenizer):
    text = "<|system|><|user|><|assistant|></s><s><pad>"
    ids = tokenizer.encode(text)
    assert not set(ids) & tokenizer.special_ids
    assert tokenizer.decode(ids, skip_special=False) == text


def test_decode_skips_or_writes_specials(tokenizer):
    ids = [tokenizer.bos_id, tokenizer.token_id("<|user|>"), *tokenizer.encode("hi"), tokenizer.eos_id]
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special=False) == "<s><|user|>hi</s>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])


def test_sentencepiece_pieces(sp_tokenizer):
    assert sp_tokenizer.vocab_size == 512
    assert len(sp_tokenizer.encode("\n")) == 1  # newline is a piece of its own, not a byte
    assert byte_tokenizer().vocab_size == 263


def test_save_load_gives_same_encodings_and_hash(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path)
    assert path.name == ("tokenizer.model" if tokenizer.kind == "sentencepiece" else "tokenizer.json")
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == tokenizer.kind and loaded.vocab_size == tokenizer.vocab_size
    assert loaded.content_hash() == tokenizer.content_hash()
    assert [loaded.encode(t) for t in TRICKY] == [tokenizer.encode(t) for t in TRICKY]
    assert Tokenizer.load(path).content_hash() == tokenizer.content_hash()  # the file itself works too


def test_saving_other_kind_replaces_the_file(sp_tokenizer, tmp_path):
    sp_tokenizer.save(tmp_path)
    byte_tokenizer().save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    assert Tokenizer.load(tmp_path).kind == "byte"


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match="tokenizer.model"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text('{"kind": "byte", "vocab_size": 9}')
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_training_is_deterministic(sp_tokenizer):
    docs = list(itertools.islice(embedded_texts(), 1500))
    assert train_tokenizer(docs, vocab_size=512).content_hash() == sp_tokenizer.content_hash()


def test_vocab_too_small_names_the_key():
    with pytest.raises(UserError, match="tokenizer.vocab_size=100"):
        train_tokenizer(["hello world"], vocab_size=100)
    many_chars = ["".join(chr(0x4E00 + i) for i in range(k, k + 50)) for k in range(0, 400, 50)]
    with pytest.raises(UserError, match="tokenizer.vocab_size=300 is too small"):
        train_tokenizer(many_chars * 3, vocab_size=300)
    with pytest.raises(UserError, match="tokenizer.vocab_size=200"):
        train_tokenizer([], kind="byte", vocab_size=200)


def test_vocab_too_large_and_empty_corpus_are_user_errors():
    with pytest.raises(UserError, match="tokenizer.vocab_size=4096 is too large"):
        train_tokenizer(["a tiny corpus"] * 5, vocab_size=4096)
    with pytest.raises(UserError, match="no text"):
        train_tokenizer([], vocab_size=512)
    with pytest.raises(UserError, match="tokenizer.kind"):
        train_tokenizer(["x"], kind="wordpiece")
