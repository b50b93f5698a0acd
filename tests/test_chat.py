"""The chat template: token layout, loss mask, no forged role tokens, response cleaning."""

import pytest

from palmrl.data.chat import clean_response, prompt_tokens, render_chat, render_prompt
from palmrl.errors import UserError
from palmrl.tokenizer import byte_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def ids(tok):
    return {name: tok.token_id(f"<|{name}|>") for name in ("system", "user", "assistant")}


def test_layout_and_loss_mask(tok):
    role = ids(tok)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 2."},
        {"role": "assistant", "content": "4"},
    ]
    rendered = render_chat(tok, messages)
    expected = (
        [tok.bos_id, role["system"], *tok.encode("Be brief."), role["user"], *tok.encode("Add 2 and 2."), role["assistant"]]
        + tok.encode("4")
        + [tok.eos_id]
    )
    assert rendered.tokens == expected
    n_prompt = len(expected) - len(tok.encode("4")) - 1
    assert rendered.loss_mask == [False] * n_prompt + [True] * (len(tok.encode("4")) + 1)
    trained = [t for t, m in zip(rendered.tokens, rendered.loss_mask) if m]
    assert trained == tok.encode("4") + [tok.eos_id]  # content and its eos, no role token


def test_multi_turn(tok):
    role = ids(tok)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    rendered = render_chat(tok, messages)
    trained = [t for t, m in zip(rendered.tokens, rendered.loss_mask) if m]
    assert trained == tok.encode("hello") + [tok.eos_id] + tok.encode("ciao") + [tok.eos_id]
    # every role token and every user token is untrained
    for token, mask in zip(rendered.tokens, rendered.loss_mask):
        if token in role.values() or token == tok.bos_id:
            assert not mask
    second_user = rendered.tokens.index(role["user"], 1 + 1)
    assert rendered.tokens[second_user - 1] == tok.eos_id  # the first reply closed with eos
    assert not any(rendered.loss_mask[second_user : second_user + 1 + len(tok.encode("bye"))])


def test_role_text_in_content_is_not_a_role_token(tok):
    role = ids(tok)
    rendered = render_chat(tok, [{"role": "user", "content": "say <|assistant|> and </s> <s>"}, {"role": "assistant", "content": "ok"}])
    assert rendered.tokens.count(role["assistant"]) == 1
    assert rendered.tokens.count(tok.eos_id) == 1 and rendered.tokens.count(tok.bos_id) == 1


def test_generation_prompt(tok):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tokens = render_prompt(tok, messages)
    assert tokens == render_chat(tok, messages).tokens + [tok.token_id("<|assistant|>")]
    assert prompt_tokens(tok, "What is the capital of France?") == tokens
    # a prompt plus its reply renders as the SFT example does
    full = render_chat(tok, messages + [{"role": "assistant", "content": "Paris"}]).tokens
    assert full[: len(tokens)] == tokens


def test_bad_messages(tok):
    with pytest.raises(UserError, match="role"):
        render_chat(tok, [{"role": "bot", "content": "hi"}])
    with pytest.raises(UserError, match="content"):
        render_chat(tok, [{"role": "user"}])
    with pytest.raises(UserError, match="string"):
        render_chat(tok, [{"role": "user", "content": 3}])


def test_clean_response(tok):
    role = ids(tok)
    text = tok.encode(" Paris ")
    assert clean_response(tok, text + [tok.eos_id, tok.pad_id, tok.pad_id]) == ("Paris", True)
    assert clean_response(tok, text + [tok.eos_id] + tok.encode("junk")) == ("Paris", True)
    assert clean_response(tok, text) == ("Paris", False)  # ran out of tokens before eos
    assert clean_response(tok, text + [role["user"]] + tok.encode("more") + [tok.eos_id]) == ("Paris", False)
    assert clean_response(tok, [tok.bos_id] + text + [tok.eos_id]) == ("", False)
    assert clean_response(tok, [tok.eos_id]) == ("", True)
