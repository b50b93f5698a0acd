"""`palmrl serve`: the OpenAI-compatible app over a tiny random checkpoint, on 127.0.0.1 only.

Covers completions and chat (plain and SSE streaming, n, stop strings, seeds), the engine's
agreement with `palmrl.generate.generate`, 400s for malformed requests, 429 past the
concurrency limit, batching of concurrent requests, and a bounded burst the server survives.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import torch

from palmrl import checkpoint
from palmrl.generate import generate
from palmrl.model.palm import ModelConfig, PaLM
from palmrl.serving.app import Limits, Server, build_app
from palmrl.serving.generator import Engine, Row, Sampling, TextStream
from palmrl.serving.scheduler import Batching
from palmrl.tokenizer import byte_tokenizer

from conftest import palmrl_cli

MAX_CONCURRENT = 8


def tiny_checkpoint(folder, *, stage: str = "sft", max_seq_len: int = 1024, seed: int = 0):
    """A random 1-layer PaLM over the byte tokenizer: garbage text, real plumbing."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=max_seq_len)
    model = PaLM(config)
    return checkpoint.save(folder / "final", stage=stage, step=0, weights=dict(model.named_parameters()),
                           model_config=config.to_dict(), tokenizer=tokenizer, config={})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve-ckpt"))


@pytest.fixture(scope="module")
def engine(ckpt):
    return Engine(ckpt)


@contextmanager
def running(app):
    """An app under uvicorn in a thread on a free 127.0.0.1 port; yields its base URL."""
    import uvicorn

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(engine):
    """The app on a free loopback port; yields (base url, Server)."""
    server = Server(engine, model_name="tiny", limits=Limits(max_concurrent=MAX_CONCURRENT, max_tokens=64),
                    batching=Batching(max_batch_size=16, window_ms=5))
    with running(build_app(server)) as url:
        yield url, server


@pytest.fixture()
def client(served):
    with httpx.Client(base_url=served[0], timeout=30) as c:
        yield c


def sse(response) -> list:
    """The JSON events of an SSE body, then the literal "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---------------------------------------------------------------------------------------------
# the engine


@pytest.mark.unit
def test_engine_samples_what_generate_samples(engine):
    """Same seed, same tokens as palmrl.generate (the shared loop, stepped), with eos as the only stop."""
    tokenizer = engine.tokenizer
    prompts = [engine.encode_chat("hello"), engine.encode_text("Once upon a time")]
    stop_ids, engine.stop_ids = engine.stop_ids, {tokenizer.eos_id}
    try:
        ours = engine.complete([Row(p, 24) for p in prompts], Sampling(0.9, top_p=0.95, top_k=40),
                               generator=torch.Generator().manual_seed(3))
    finally:
        engine.stop_ids = stop_ids
    out = generate(engine.model, prompts, max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=40,
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, generator=torch.Generator().manual_seed(3))
    for row, completion in enumerate(ours):
        ids = out.sequences[row, out.prompt_length:][out.response_mask[row]].tolist()
        assert completion.text == tokenizer.decode([i for i in ids if i != tokenizer.eos_id])
        assert completion.completion_tokens == len([i for i in ids if i != tokenizer.eos_id])


@pytest.mark.unit
def test_engine_stop_strings_and_streamed_pieces(engine):
    """A stop string ends the text right before it; streamed pieces never show any of it."""
    prompt = engine.encode_text("The answer is")
    run = lambda stop: [d for step in engine.stream([Row(prompt, 60, stop)], Sampling(1.0),  # noqa: E731
                                                    generator=torch.Generator().manual_seed(5)) for d in step]
    full = "".join(d.text for d in run(()))
    start = next(i for i in range(3, len(full) - 1) if full[i].isascii() and full[i].isalnum() and full.find(full[i]) == i)
    stop = full[start] + "\u2603"  # never completed: only held back while it might be
    pieces = run((stop, full[start:start + 2]))
    assert "".join(d.text for d in pieces) == full[:start]
    assert pieces[-1].finish_reason == "stop" and all(d.finish_reason is None for d in pieces[:-1])


@pytest.mark.unit
def test_held_back_text():
    from palmrl.serving.generator import _held_back

    assert _held_back("hello wo", ("world",)) == 2
    assert _held_back("hello", ("world",)) == 0
    # half a character is held back by the row's TextStream, before stop strings are looked for
    stream = TextStream(byte_tokenizer())
    assert [stream.push(7 + b) for b in "c\u2603".encode()] == ["c", "", "", "\u2603"]


@pytest.fixture(scope="module")
def sp_tokenizer():
    import itertools

    from palmrl.data.embedded import embedded_texts
    from palmrl.tokenizer import train_tokenizer

    return train_tokenizer(list(itertools.islice(embedded_texts(), 1500)), vocab_size=512)


@pytest.mark.unit
def test_text_stream_adds_up_to_decode(sp_tokenizer):
    """Token by token, the pieces join to `decode` of the whole row, and only the last may hold
    U+FFFD (half a character): random ids, byte-fallback pieces and special tokens included."""
    rng = random.Random(0)
    for tokenizer in (sp_tokenizer, byte_tokenizer()):
        for _ in range(300):
            ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 24))]
            stream = TextStream(tokenizer)
            pieces = [stream.push(token, final=n == len(ids)) for n, token in enumerate(ids, 1)]
            assert "".join(pieces) == tokenizer.decode(ids)
            assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])
        text = "naïve ☃ 日本 🎉 ok"
        stream = TextStream(tokenizer)
        assert "".join(stream.push(token) for token in tokenizer.encode(text)) == text


class ScriptedModel(torch.nn.Module):
    """Greedy decoding of it gives row i the tokens `script[i]`, one a step, whatever came before."""

    def __init__(self, script: list[list[int]], vocab_size: int, max_seq_len: int):
        super().__init__()
        self.script, self.vocab_size, self.steps = script, vocab_size, 0
        self.config = ModelConfig(vocab_size=vocab_size, dim=8, depth=1, heads=1, dim_head=8, max_seq_len=max_seq_len)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the decoder finds the device

    def new_cache(self, batch_size: int, max_len: int):
        self.steps = 0

    def forward(self, tokens, attention_mask=None, cache=None, last_only=False):
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.vocab_size)
        for row, ids in enumerate(self.script):
            logits[row, -1, ids[min(self.steps, len(ids) - 1)]] = 1.0
        self.steps += 1
        return logits


@pytest.mark.unit
def test_streamed_deltas_add_up_over_split_characters_and_stop_strings(ckpt):
    """Each multi-byte character spans several byte tokens; the stop strings span several tokens and
    start inside such a character. The streamed pieces join to the final text, never show half a
    character, and never show a stop string or the part of it written before it completed."""
    engine = Engine(ckpt)
    tokenizer = engine.tokenizer
    texts = ["caf\u00e9 \u2603\u2603 end", "x\u00e9\u00e9\u2603y and more", "ab\u2603c"]
    script = [[7 + b for b in text.encode()] + [tokenizer.eos_id] for text in texts]
    engine.model = ScriptedModel(script, tokenizer.vocab_size, engine.max_seq_len)
    rows = [Row(engine.encode_text("p"), 40, ("\u2603\u2603",)),  # stop: 6 tokens, two characters
            Row(engine.encode_text("q"), 40, ("\u00e9\u2603", "\u00e9\u00e9x")),  # the second one never completes
            Row(engine.encode_text("r"), 40, ())]  # ends at eos
    pieces = [[], [], []]
    ends = [None, None, None]
    for step in engine.stream(rows, Sampling(temperature=0)):
        for d in step:
            pieces[d.row].append(d.text)
            ends[d.row] = d.finish_reason or ends[d.row]
    assert ["".join(p) for p in pieces] == ["caf\u00e9 ", "x\u00e9", "ab\u2603c"]
    assert ends == ["stop", "stop", "stop"]
    assert not any("\ufffd" in piece for row in pieces for piece in row)
    assert len(pieces[2]) > 1  # streamed, not handed out at the end
    done = engine.complete(rows, Sampling(temperature=0))
    assert [c.text for c in done] == ["caf\u00e9 ", "x\u00e9", "ab\u2603c"]
    assert [c.completion_tokens for c in done] == [len("caf\u00e9 \u2603\u2603".encode()),
                                                  len("x\u00e9\u00e9\u2603".encode()), len("ab\u2603c".encode())]


# ---------------------------------------------------------------------------------------------
# the HTTP API


@pytest.mark.unit
def test_models_and_health(client):
    assert client.get("/health").json()["status"] == "ok"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]


@pytest.mark.unit
def test_completions_with_prompt_list_and_n(client):
    r = client.post("/v1/completions", json={"prompt": ["a", "bb"], "n": 2, "max_tokens": 5, "model": "tiny"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == 2 * (2 + 3)  # bos + bytes, n copies of each prompt
    assert body["usage"]["completion_tokens"] <= 4 * 5


@pytest.mark.unit
def test_seeded_chat_is_reproducible_and_streams_the_same_text(client):
    req = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
           "max_tokens": 12, "seed": 7, "temperature": 0.8}
    first = client.post("/v1/chat/completions", json=req).json()
    second = client.post("/v1/chat/completions", json=req).json()
    assert first["object"] == "chat.completion"
    text = first["choices"][0]["message"]["content"]
    assert text == second["choices"][0]["message"]["content"]

    with client.stream("POST", "/v1/chat/completions",
                       json={**req, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == first["choices"][0]["finish_reason"]
    assert events[-2]["usage"]["completion_tokens"] == first["usage"]["completion_tokens"]


@pytest.mark.unit
def test_streamed_completion_ends_with_done(client):
    with client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 6, "stream": True}) as r:
        events = sse(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e["object"] == "text_completion" for e in events[:-1])


BAD = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, "max_tokens"),  # over limits.max_tokens
    ("/v1/completions", {"prompt": "x" * 1020, "max_tokens": 10}, "max_tokens"),  # over the context
    ("/v1/completions", {"prompt": "x", "n": 9}, "n"),
    ("/v1/completions", {"prompt": [], "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "bogus": 1}, "bogus"),
    ("/v1/completions", {"prompt": "x", "best_of": 4}, "best_of"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                              "max_completion_tokens": 2}, "max_tokens"),
]


@pytest.mark.unit
@pytest.mark.parametrize("path,body,param", BAD)
def test_malformed_requests_get_400_naming_the_field(client, path, body, param):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


@pytest.mark.unit
def test_unknown_model_is_404(client):
    r = client.post("/v1/completions", json={"prompt": "x", "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.unit
def test_burst_is_batched_bounded_and_survived(served):
    """40 simultaneous clients, 8 allowed in flight: every answer is 200 or 429 (with Retry-After),
    concurrent requests share batches, and the server is idle and healthy afterwards."""
    url, server = served
    batches0, rows0 = server.scheduler.batches, server.scheduler.rows_decoded

    def one(i: int):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": f"p{i}", "max_tokens": 24, "temperature": 1.0},
                       timeout=60)
        return r.status_code, r.headers.get("retry-after"), r.json()

    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(one, range(40)))
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 429} and codes.count(200) >= MAX_CONCURRENT
    assert all(retry == "1" and body["error"]["type"] == "rate_limit_error"
               for code, retry, body in results if code == 429)
    batches, rows = server.scheduler.batches - batches0, server.scheduler.rows_decoded - rows0
    assert rows == codes.count(200) and batches < rows  # some requests were decoded together

    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = httpx.get(f"{url}/health").json()
    assert health["in_flight"] == 0 and health["queued"] == 0
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "after", "max_tokens": 3}).status_code == 200


@pytest.mark.integration
def test_cli_refuses_a_busy_port(tmp_path, ckpt):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = palmrl_cli("serve", f"ckpt={ckpt}", f"port={port}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and f"port: cannot listen on 127.0.0.1:{port}" in proc.stderr


# ---------------------------------------------------------------------------------------------
# hardening: out-of-range values, request size, Host header, startup limits


@pytest.mark.unit
@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "hi", "seed": 2**64}, "seed"),           # beyond torch's 64-bit generator: was a 500
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "hi", "max_tokens": True}, "max_tokens"),  # JSON true is not a count: was taken as 1
    ({"prompt": "hi", "n": 1.5}, "n"),
])
def test_out_of_range_values_are_400_naming_the_field(client, body, param):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def guarded_client(engine, **kwargs):
    from fastapi.testclient import TestClient

    limits = Limits(max_body_bytes=kwargs.pop("max_body_bytes", 1_000_000))
    return TestClient(build_app(Server(engine, model_name="tiny", limits=limits), **kwargs))


@pytest.mark.unit
def test_a_body_over_the_limit_is_413_before_it_is_read(engine):
    with guarded_client(engine, max_body_bytes=2_000) as c:
        big = c.post("/v1/completions", json={"prompt": "x" * 5_000, "max_tokens": 1})
        assert big.status_code == 413 and "limits.max_body_bytes" in big.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200

        def chunks():  # no Content-Length: counted while it streams in
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}'
        streamed = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413


@pytest.mark.unit
def test_a_loopback_server_answers_only_to_its_own_host_names(engine):
    with guarded_client(engine, allowed_hosts=frozenset({"127.0.0.1", "localhost", "::1"})) as c:
        assert c.get("/v1/models", headers={"host": "localhost:8000"}).status_code == 200
        assert c.get("/v1/models", headers={"host": "[::1]:8000"}).status_code == 200
        rebound = c.get("/v1/models", headers={"host": "evil.example:8000"})
        assert rebound.status_code == 400 and rebound.json()["error"]["param"] == "Host"


@pytest.mark.unit
@pytest.mark.parametrize(("limits", "message"), [
    ({"max_n": -1}, "limits.max_n must be a positive integer"),
    ({"max_tokens": 0}, "limits.max_tokens"),
    ({"max_body_bytes": True}, "limits.max_body_bytes"),
])
def test_startup_limits_are_checked(limits, message):
    from palmrl.errors import UserError

    with pytest.raises(UserError, match=message):
        Limits(**limits)
