"""`palmrl serve`'s HTTP app: the OpenAI API (completions, chat completions, SSE streaming, models)
over one or more `Engine`s, with request validation, limits, batching of concurrent requests, an
optional token, and the web page for chatting and labelling (palmrl/serving/ui.py).

    POST /v1/completions        prompt (string or list), max_tokens, temperature, top_p, top_k, n, stop, seed, stream
    POST /v1/chat/completions   messages, max_tokens | max_completion_tokens, the same sampling keys, stream
    GET  /v1/models             the served models (`model` picks one; none: the first, `ckpt`)
    GET  /health                {"status": "ok", "in_flight": ..., "queued": ...}

Requests and errors follow OpenAI's shapes (`{"error": {"message", "type", "param", "code"}}`): a
body that is not JSON, an unknown field, a value out of range or an unsupported option (logprobs,
echo, penalties, best_of) is a 400 naming the field; a prompt that with max_tokens exceeds the
model's context is a 400 too; a model name not served is a 404; without the token (when
`auth_token` is set) every route but /login is a 401.

Concurrency: one worker thread per served model owns it and batches compatible requests
(palmrl/serving/scheduler.py). At most `limits.max_concurrent` requests may be queued or running,
and one more gets 429 with `Retry-After: 1`. The request bodies are in palmrl/serving/schemas.py.

Best-of-n with a reward model is not offered yet: `n` returns all n samples. The seam is
`_choices`, which receives every row of a request before the response is built.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.requests import Request  # module level: FastAPI resolves the routes' annotations here

from palmrl.errors import UserError
from palmrl.serving.generator import Completion, Delta, Row, Sampling
from palmrl.serving.scheduler import END, Batching, Job, Scheduler
from palmrl.serving.schemas import Body, ChatBody, CompletionBody, HTTPFailure


@dataclass(frozen=True)
class Limits:
    """The `limits:` block of serve.yaml."""

    max_tokens: int = 512  # largest max_tokens a request may ask for: bounds one request's decode time
    default_max_tokens: int = 128  # when a request gives none (capped by the context left after the prompt)
    max_n: int = 8  # samples per prompt
    max_prompts: int = 16  # prompts in one /v1/completions request
    max_concurrent: int = 64  # requests queued or running; one more gets 429 (memory and latency stay bounded)
    max_body_bytes: int = 1_000_000  # a larger request body gets 413 before it is read, parsed or tokenised

    def __post_init__(self) -> None:
        for key in ("max_tokens", "default_max_tokens", "max_n", "max_prompts", "max_concurrent", "max_body_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"limits.{key} must be a positive integer, got {value!r}")


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

    def _check_model(self, body: Body) -> None:
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
            return min(self.limits.default_max_tokens, self.limits.max_tokens, room)
        if asked > room:
            raise HTTPFailure(400, f"the prompt is {prompt_len} tokens and max_tokens is {asked}: together they "
                                   f"exceed the model's context of {self.engine.max_seq_len} tokens",
                              param="max_tokens")
        return asked

    def _rows(self, prompts: list[list[int]], body: Body, max_tokens: int | None) -> list[Row]:
        if body.n > self.limits.max_n:
            raise HTTPFailure(400, f"n {body.n} exceeds this server's limit of {self.limits.max_n} "
                                   f"(serve limits.max_n)", param="n")
        rows = []
        for ids in prompts:
            rows += [Row(ids, self._max_tokens(max_tokens, len(ids)), tuple(body.stop or ()))] * body.n
        return rows

    def submit(self, rows: list[Row], body: Body) -> Job:
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
                if item is END:
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
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(job, meta, chat=False, include_usage=include_usage)
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
                    usage = self._usage(job.rows, sum(tokens))
                    yield f"data: {json.dumps({**meta, 'choices': [], 'usage': usage})}\n\n"
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


class Guard:
    """ASGI middleware in front of the app: a Host header the server does not answer to is refused
    (400: a DNS-rebinding page reaching a loopback server carries its own host name); with an
    `auth_token`, every route but /login needs it (`Authorization: Bearer <token>`, or the cookie
    the login form sets) or gets 401 (a page request gets the login form); a body larger than
    `max_body_bytes` is refused (413) from its Content-Length or while it streams in, before any of
    it is parsed or tokenised."""

    def __init__(self, app, *, allowed_hosts: frozenset[str] | None, max_body_bytes: int,
                 auth_token: str | None = None):
        self.app, self.allowed_hosts, self.max_body_bytes = app, allowed_hosts, max_body_bytes
        self.auth_token = auth_token
        self.cookie = cookie_value(auth_token) if auth_token else None

    def _authorised(self, headers: dict[str, str]) -> bool:
        bearer = headers.get("authorization", "")
        if bearer[:7].lower() == "bearer " and hmac.compare_digest(bearer[7:].strip().encode(),
                                                                   self.auth_token.encode()):
            return True
        from http.cookies import CookieError, SimpleCookie

        try:
            jar = SimpleCookie(headers.get("cookie", ""))
        except CookieError:
            return False
        return COOKIE in jar and hmac.compare_digest(jar[COOKIE].value.encode(), self.cookie.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = _hostname(headers.get("host", ""))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return await _reply(send, HTTPFailure(400, f"Host '{host}' is not served here (serve allowed_hosts)",
                                                  param="Host"))
        if self.auth_token and scope["path"] != "/login" and not self._authorised(headers):
            if scope["method"] == "GET" and "text/html" in headers.get("accept", ""):
                return await _reply_html(send, 401, login_page(""))
            return await _reply(send, HTTPFailure(401, "this server needs its token: send 'Authorization: "
                                                       "Bearer <auth_token>' (or log in at /login)",
                                                  kind="authentication_error", code="invalid_api_key",
                                                  headers={"WWW-Authenticate": "Bearer"}))
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _reply(send, self._too_large())
        if length.isdigit():
            return await self.app(scope, receive, send)
        # no Content-Length (chunked): read up to the limit here, then hand the body on
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                return await _reply(send, self._too_large())
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    def _too_large(self) -> HTTPFailure:
        return HTTPFailure(413, f"request body exceeds this server's limit of {self.max_body_bytes} bytes "
                                f"(serve limits.max_body_bytes)")


def _hostname(host: str) -> str:
    """`[::1]:8000` -> `::1`, `localhost:8000` -> `localhost`."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _reply(send, failure: HTTPFailure) -> None:
    body = json.dumps(failure.body()).encode()
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in failure.headers.items()]
    await send({"type": "http.response.start", "status": failure.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


async def _reply_html(send, status: int, page: str) -> None:
    from palmrl.serving.ui import SECURITY_HEADERS

    body = page.encode()
    headers = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_app(servers: Server | Sequence[Server], *, allowed_hosts: frozenset[str] | None = None,
              auth_token: str | None = None, feedback=None, queue=None):
    """The FastAPI app over one or more Servers (the first answers requests that name no model) and
    the web page (palmrl/serving/ui.py); each Server's worker thread runs for the app's lifetime.
    `allowed_hosts`: the Host header names it answers to (None: any); `auth_token`: required on
    every route but /login when set; `feedback` / `queue`: the page's labelling (None: off)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

    from palmrl.serving.ui import SECURITY_HEADERS, Labelling, add_routes

    servers = [servers] if isinstance(servers, Server) else list(servers)
    by_name = {}
    for server in servers:
        if server.model_name in by_name:
            raise UserError(f"model_name: two served checkpoints are both named {server.model_name!r}")
        by_name[server.model_name] = server

    def pick(body: Body) -> Server:
        if body.model is None:
            return servers[0]
        if body.model not in by_name:
            raise HTTPFailure(404, f"model '{body.model}' is not served here; this server serves "
                                   f"{', '.join(repr(n) for n in by_name)} (GET /v1/models)", param="model",
                              code="model_not_found")
        return by_name[body.model]

    @asynccontextmanager
    async def lifespan(app):
        for server in servers:
            server.scheduler.start()
        try:
            yield
        finally:
            for server in servers:
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
        failure = HTTPFailure(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")
        return JSONResponse(failure.body(), status_code=500)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await pick(body).completions(body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        return await pick(body).chat(body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [m for server in servers for m in server.models()["data"]]}

    @app.get("/health")
    async def health():
        states = [server.health() for server in servers]
        return states[0] if len(states) == 1 else {"status": "ok", "models": states}

    @app.get("/login", include_in_schema=False)
    async def login_form():
        return HTMLResponse(login_page(""), headers=SECURITY_HEADERS)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        from urllib.parse import parse_qs

        given = parse_qs((await request.body()).decode("utf-8", "replace")).get("token", [""])[0]
        if auth_token is None or not hmac.compare_digest(given.encode(), auth_token.encode()):
            return HTMLResponse(login_page("wrong token" if auth_token else "this server has no token"),
                                status_code=401, headers=SECURITY_HEADERS)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, cookie_value(auth_token), httponly=True, samesite="strict", path="/")
        return response

    add_routes(app, Labelling(by_name, feedback, queue))
    return Guard(app, allowed_hosts=allowed_hosts, max_body_bytes=servers[0].limits.max_body_bytes,
                 auth_token=auth_token)


COOKIE = "palmrl_token"


def cookie_value(token: str) -> str:
    """What the login cookie holds: a digest of the token, so the cookie jar never stores the token."""
    return hashlib.sha256(f"palmrl-serve-cookie:{token}".encode()).hexdigest()


def login_page(message: str) -> str:
    note = f"<p role=alert>{html.escape(message)}</p>" if message else ""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>palmrl serve: log in</title></head>"
            "<body><h1>palmrl serve</h1><p>This server needs its token (serve <code>auth_token</code>).</p>"
            f"{note}<form method=post action=/login><label>token <input name=token type=password "
            "autocomplete=current-password autofocus></label> <button type=submit>log in</button></form></body></html>")
