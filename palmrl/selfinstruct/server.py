"""`palmrl serve`'s HTTP app: the OpenAI API (completions, chat completions, SSE streaming, models)
over an `Engine`, with request validation, limits, and batching of concurrent requests.

    POST /v1/completions        prompt (string or list), max_tokens, temperature, top_p, top_k, n, stop, seed, stream
    POST /v1/chat/completions   messages, max_tokens | max_completion_tokens, the same sampling keys, stream
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", "in_flight": ..., "queued": ...}

Requests and errors follow OpenAI's shapes (`{"error": {"message", "type", "param", "code"}}`): a
body that is not JSON, an unknown field, a value out of range or an unsupported option (logprobs,
echo, penalties, best_of) is a 400 naming the field; a prompt that with max_tokens exceeds the
model's context is a 400 too; a model name other than the served one is a 404.

Concurrency: one worker thread owns the model. Requests queue for it; at most
`limits.max_concurrent` may be queued or running, and one more gets 429 with `Retry-After: 1`.
The worker batches: after taking a request it waits up to `batching.window_ms` for others with
the same sampling settings (temperature, top_p, top_k, no seed) and decodes all their rows (n per
prompt) in one KV-cache batch of at most `batching.max_batch_size` rows; each row still stops at
its own max_tokens and stop strings. A request with a `seed` is decoded alone, from its own
generator, so it is reproducible. scripts/bench_serve.py measures what batching buys.

Best-of-n with a reward model is not offered yet: `n` returns all n samples. The seam is
`_choices`, which receives every row of a request before the response is built.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from palmrl.errors import UserError
from palmrl.selfinstruct.engine import Completion, Delta, Row, Sampling


@dataclass(frozen=True)
class Limits:
    """The `limits:` block of serve.yaml."""

    max_tokens: int = 512  # largest max_tokens a request may ask for: bounds one request's decode time
    default_max_tokens: int = 128  # when a request gives none (capped by the context left after the prompt)
    max_n: int = 8  # samples per prompt
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_concurrent: int = 64  # requests queued or running; one more gets 429 (memory and latency stay bounded)


@dataclass(frozen=True)
class Batching:
    """The `batching:` block of serve.yaml."""

    max_batch_size: int = 16  # rows decoded together; beyond ~16 a CPU step gets slower than it saves
    window_ms: float = 5.0  # wait this long after the first request for others to join; 0 = batch only what is queued


# ---------------------------------------------------------------------------------------------
# request bodies (pydantic): unknown fields and unsupported options are 400s


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # vLLM's extension; 0 = off
    n: int = Field(default=1, ge=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value != 0:
            raise ValueError("penalties are not supported; leave it at 0")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return None

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionBody(_Body):
    prompt: Union[str, list[str]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    stream_options: StreamOptions | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value):
        if value not in (None, 1):
            raise ValueError("best_of is not supported (best-of-n with a reward model is not served yet)")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream_options: StreamOptions | None = None


class HTTPFailure(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------
# the worker: one thread owns the model and decodes batches of compatible jobs


_END = object()  # posted to a job's queue after its last deltas


class Job:
    """One request's rows; the worker posts lists of Delta (row = index within this job), then _END."""

    def __init__(self, rows: list[Row], sampling: Sampling, seed: int | None, loop: asyncio.AbstractEventLoop):
        self.rows, self.sampling, self.seed, self.loop = rows, sampling, seed, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def batchable_with(self, other: Job) -> bool:
        return self.seed is None and other.seed is None and self.sampling == other.sampling

    def post(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Scheduler:
    """Queue of jobs in, batched decoding in a worker thread, deltas out to each job's asyncio queue."""

    def __init__(self, engine, batching: Batching, *, seed: int = 0, on_done=None):
        self.engine, self.batching = engine, batching
        self.generator = torch.Generator().manual_seed(int(seed))
        self._queue: queue.Queue[Job] = queue.Queue()
        self._waiting: deque[Job] = deque()  # taken from the queue but not batchable with the last batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="palmrl-serve-worker", daemon=True)
        self._on_done = on_done  # called (in the job's event loop) when the worker is done with a job
        self.batches = 0
        self.rows_decoded = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def queued(self) -> int:
        return self._queue.qsize() + len(self._waiting)

    def _take(self, timeout: float) -> Job | None:
        if self._waiting:
            return self._waiting.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _batch(self, first: Job) -> list[Job]:
        """`first` plus compatible jobs: the ones set aside earlier, then arrivals within the window."""
        batch, rows = [first], len(first.rows)
        if first.seed is not None:
            return batch
        room = lambda job: rows + len(job.rows) <= self.batching.max_batch_size  # noqa: E731
        kept_aside = deque()
        while self._waiting:
            job = self._waiting.popleft()
            if first.batchable_with(job) and room(job):
                batch.append(job)
                rows += len(job.rows)
            else:
                kept_aside.append(job)
        self._waiting = kept_aside
        deadline = time.monotonic() + self.batching.window_ms / 1000
        while rows < self.batching.max_batch_size:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) \
                    if deadline > time.monotonic() else self._queue.get_nowait()
            except queue.Empty:
                break
            if first.batchable_with(job) and room(job):
                batch.append(job)
                rows += len(job.rows)
            else:
                self._waiting.append(job)
        return batch

    def _work(self) -> None:
        while not self._stop.is_set():
            first = self._take(timeout=0.1)
            if first is None:
                continue
            batch = self._batch(first)
            live = [job for job in batch if not job.cancelled]  # clients that left before their turn cost nothing
            try:
                if live:
                    self._decode(live)
            except Exception as err:  # noqa: BLE001 - those requests get a 500, the server lives on
                for job in live:
                    job.post(err)
            finally:
                for job in batch:
                    job.post(_END)
                    if self._on_done is not None:
                        job.loop.call_soon_threadsafe(self._on_done, job)

    def _decode(self, batch: list[Job]) -> None:
        rows, owner = [], []
        for job in batch:
            for i, row in enumerate(job.rows):
                rows.append(row)
                owner.append((job, i))
        generator = self.generator if batch[0].seed is None else torch.Generator().manual_seed(batch[0].seed)
        self.batches += 1
        self.rows_decoded += len(rows)
        for deltas in self.engine.stream(rows, batch[0].sampling, generator=generator):
            per_job: dict[int, list[Delta]] = {}
            for d in deltas:
                job, i = owner[d.row]
                per_job.setdefault(id(job), []).append(d._replace(row=i))
            for job in batch:
                if id(job) in per_job and not job.cancelled:
                    job.post(per_job[id(job)])
            if all(job.cancelled for job in batch):
                return


# ---------------------------------------------------------------------------------------------
# the app


class Server:
    """Validation, limits and response shapes over a Scheduler."""

    def __init__(self, engine, *, model_name: str, limits: Limits = Limits(), batching: Batching = Batching(),
                 seed: int = 0):
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.in_flight = 0  # touched only on the event loop's thread
        self.scheduler = Scheduler(engine, batching, seed=seed, on_done=self._release)
        self.created = int(time.time())

    def _release(self, job: Job) -> None:
        self.in_flight -= 1

    # request -> rows

    def _check_model(self, body: _Body) -> None:
        if body.model is not None and body.model != self.model_name:
            raise HTTPFailure(404, f"model '{body.model}' is not served here; this server serves "
                                   f"'{self.model_name}' (GET /v1/models)", param="model", code="model_not_found")

    def _max_tokens(self, asked: int | None, prompt_len: int) -> int:
        room = self.engine.max_seq_len - prompt_len
        if asked is not None and asked > self.limits.max_tokens:
            raise HTTPFailure(400, f"max_tokens {asked} exceeds this server's limit of {self.limits.max_tokens} "
                                   f"(serve limits.max_tokens)", param="max_tokens")
        if room < 1:
            raise HTTPFailure(400, f"the prompt is {prompt_len} tokens; the model's context is "
                                   f"{self.engine.max_seq_len}, which leaves no room to generate", param="prompt")
        if asked is None:
            return min(self.limits.default_max_tokens, room)
        if asked > room:
            raise HTTPFailure(400, f"the prompt is {prompt_len} tokens and max_tokens is {asked}: together they "
                                   f"exceed the model's context of {self.engine.max_seq_len} tokens",
                              param="max_tokens")
        return asked

    def _rows(self, prompts: list[list[int]], body: _Body, max_tokens: int | None) -> list[Row]:
        if body.n > self.limits.max_n:
            raise HTTPFailure(400, f"n {body.n} exceeds this server's limit of {self.limits.max_n} "
                                   f"(serve limits.max_n)", param="n")
        rows = []
        for ids in prompts:
            rows += [Row(ids, self._max_tokens(max_tokens, len(ids)), tuple(body.stop or ()))] * body.n
        return rows

    def submit(self, rows: list[Row], body: _Body) -> Job:
        if self.in_flight >= self.limits.max_concurrent:
            raise HTTPFailure(429, f"server busy: {self.in_flight} requests in flight (limit "
                                   f"limits.max_concurrent={self.limits.max_concurrent}); retry shortly",
                              kind="rate_limit_error", headers={"Retry-After": "1"})
        job = Job(rows, Sampling(body.temperature, body.top_p, body.top_k), body.seed, asyncio.get_running_loop())
        self.in_flight += 1
        self.scheduler.submit(job)
        return job

    # job -> results

    @staticmethod
    async def events(job: Job) -> AsyncIterator[list[Delta]]:
        try:
            while True:
                item = await job.queue.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise HTTPFailure(500, f"generation failed: {item}", kind="server_error")
                yield item
        finally:
            job.cancelled = True  # a client that went away stops costing rows (no-op once finished)

    async def _choices(self, job: Job) -> list[Completion]:
        """Every row of a request, finished (the seam where best-of-n reranking would go)."""
        texts, ends = [""] * len(job.rows), [("length", 0)] * len(job.rows)
        async for deltas in self.events(job):
            for d in deltas:
                texts[d.row] += d.text
                if d.finish_reason is not None:
                    ends[d.row] = (d.finish_reason, d.completion_tokens)
        return [Completion(t, r, len(row.prompt), n) for t, (r, n), row in zip(texts, ends, job.rows)]

    @staticmethod
    def _usage(rows: list[Row], completion_tokens: int) -> dict:
        prompt_tokens = sum(len(r.prompt) for r in rows)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # endpoints

    async def completions(self, body: CompletionBody):
        self._check_model(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) > self.limits.max_prompts:
            raise HTTPFailure(400, f"{len(prompts)} prompts exceed this server's limit of {self.limits.max_prompts} "
                                   f"per request (serve limits.max_prompts)", param="prompt")
        job = self.submit(self._rows([self.engine.encode_text(p) for p in prompts], body, body.max_tokens), body)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        if body.stream:
            return self._sse(job, meta, chat=False, include_usage=bool(body.stream_options and body.stream_options.include_usage))
        done = await self._choices(job)
        return {**meta, "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                                    for i, c in enumerate(done)],
                "usage": self._usage(job.rows, sum(c.completion_tokens for c in done))}

    async def chat(self, body: ChatBody):
        self._check_model(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise HTTPFailure(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        prompt = self.engine.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        job = self.submit(self._rows([prompt], body, body.max_completion_tokens or body.max_tokens), body)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name}
        if body.stream:
            return self._sse(job, {**meta, "object": "chat.completion.chunk"}, chat=True,
                             include_usage=bool(body.stream_options and body.stream_options.include_usage))
        done = await self._choices(job)
        return {**meta, "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                                     "logprobs": None, "finish_reason": c.finish_reason} for i, c in enumerate(done)],
                "usage": self._usage(job.rows, sum(c.completion_tokens for c in done))}

    def _sse(self, job: Job, meta: dict, *, chat: bool, include_usage: bool):
        from starlette.responses import StreamingResponse

        def chunk(index: int, text: str | None, finish: str | None, *, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**meta, 'choices': [choice]})}\n\n"

        async def stream():
            tokens = [0] * len(job.rows)
            try:
                if chat:
                    for i in range(len(job.rows)):
                        yield chunk(i, None, None, role=True)
                async for deltas in self.events(job):
                    for d in deltas:
                        tokens[d.row] = d.completion_tokens
                        if d.text:
                            yield chunk(d.row, d.text, None)
                        if d.finish_reason is not None:
                            yield chunk(d.row, None, d.finish_reason)
                if include_usage:
                    yield f"data: {json.dumps({**meta, 'choices': [], 'usage': self._usage(job.rows, sum(tokens))})}\n\n"
            except HTTPFailure as err:  # headers are gone: report in-band, as OpenAI does
                yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "palmrl"}]}

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "in_flight": self.in_flight,
                "queued": self.scheduler.queued(), "batches": self.scheduler.batches,
                "rows_decoded": self.scheduler.rows_decoded}


def _param(error: dict) -> str | None:
    """The request field an error is about (`messages.0.role`), None for the body as a whole."""
    if error.get("type") == "json_invalid":
        return None
    return ".".join(str(p) for p in error.get("loc", ()) if p != "body") or None


def _validation_message(err) -> str:
    """The first problem of a pydantic/FastAPI validation error, as `field: what is wrong`."""
    errors = err.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})"
    loc = _param(first)
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return "the body must be a JSON object (Content-Type: application/json)"
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    return f"{loc}: {msg}" if loc else msg


def build_app(server: Server):
    """The FastAPI app over a Server; the worker thread runs for the app's lifetime."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.stop()

    app = FastAPI(title="palmrl serve", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        param = _param(err.errors()[0]) if err.errors() else None
        return JSONResponse(HTTPFailure(400, _validation_message(err), param=param).body(), status_code=400)

    @app.exception_handler(HTTPFailure)
    async def _failure(request: Request, err: HTTPFailure):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, err: UserError):
        return JSONResponse(HTTPFailure(400, str(err)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):
        return JSONResponse(HTTPFailure(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").body(),
                            status_code=500)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await server.completions(body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        return await server.chat(body)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/health")
    async def health():
        return server.health()

    return app
