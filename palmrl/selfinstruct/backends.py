"""Generators for self-instruct: a local palmrl checkpoint, or any OpenAI-compatible endpoint.

Both answer the same two calls, a batch at a time: `complete(prompts)` continues raw text (the
task-list prompt) and `chat(conversations)` answers as the assistant (each task's response).

- `local` decodes with `palmrl.serving.generator.Engine` in batches, from one seeded
  `torch.Generator`: the same seed, checkpoint and config give the same records.
- `openai` speaks `/v1/completions` and `/v1/chat/completions` to vLLM, llama.cpp's server,
  `palmrl serve`, or OpenAI itself, `concurrency` requests in flight. Connection errors, timeouts,
  429 and 5xx are retried with exponential backoff and jitter (honouring Retry-After); once the
  retries are spent, or on any other error status, it stops with one line naming the endpoint.
  The API key is read from the environment variable named by `api_key_env`, never from a config
  (configs are saved beside every run).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from palmrl.errors import UserError
from palmrl.serving.generator import Completion

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}  # transient by HTTP's and OpenAI's own advice


@dataclass(frozen=True)
class GenParams:
    """Per-call generation settings (OpenAI's names); a config block of selfinstruct.yaml."""

    max_tokens: int = 256  # new tokens per completion
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass, 1 disables
    stop: tuple[str, ...] = ()  # completions end before any of these

    @classmethod
    def from_cfg(cls, cfg: Mapping, *, key: str) -> GenParams:
        known = {"max_tokens", "temperature", "top_p"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise UserError(f"{key}.{unknown[0]}: unknown key; expected one of {', '.join(sorted(known))}")
        params = cls(**{k: cfg[k] for k in known if k in cfg})
        if int(params.max_tokens) <= 0:
            raise UserError(f"{key}.max_tokens must be positive, got {params.max_tokens}")
        return params

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class Backend(Protocol):
    def describe(self) -> dict:
        """Provenance: what generated the records (kind, checkpoint hash or endpoint and model)."""

    def complete(self, prompts: Sequence[str], params: GenParams) -> list[Completion]:
        """Continue each raw-text prompt."""

    def chat(self, conversations: Sequence[Sequence[Mapping[str, str]]], params: GenParams) -> list[Completion]:
        """The assistant's reply to each conversation."""

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# local: a palmrl checkpoint


class LocalBackend:
    """A palmrl checkpoint decoded here, `batch_size` rows at a time, from one seeded generator."""

    def __init__(self, ckpt: str, *, seed: int, batch_size: int = 16, device: str = "auto", precision: str = "auto",
                 chat: str | bool = "auto", top_k: int = 0, trust_remote_code: bool = False,
                 decode_weights: str = "fp32"):
        from palmrl.generate import seeded_generator
        from palmrl.serving.generator import Engine

        self.engine = Engine(ckpt, key="generator.ckpt", device=device, precision=precision, chat=chat,
                             trust_remote_code=trust_remote_code, decode_weights=decode_weights)
        self.batch_size = int(batch_size)
        self.top_k = int(top_k)
        self.generator = seeded_generator(int(seed), self.engine.device)

    def describe(self) -> dict:
        return {"kind": "local", "checkpoint": self.engine.lineage(), "chat_template": self.engine.chat}

    def _run(self, prompts: list[list[int]], params: GenParams) -> list[Completion]:
        from palmrl.serving.generator import Row, Sampling

        sampling = Sampling(temperature=float(params.temperature), top_p=float(params.top_p), top_k=self.top_k)
        # prompts longer than the context keep bos and their end (where the open task is)
        rows = [Row(self.engine.fit(p, params.max_tokens), int(params.max_tokens), tuple(params.stop)) for p in prompts]
        out: list[Completion] = []
        for start in range(0, len(rows), self.batch_size):
            out += self.engine.complete(rows[start:start + self.batch_size], sampling, generator=self.generator)
        return out

    def complete(self, prompts: Sequence[str], params: GenParams) -> list[Completion]:
        return self._run([self.engine.encode_text(p) for p in prompts], params)

    def chat(self, conversations: Sequence[Sequence[Mapping[str, str]]], params: GenParams) -> list[Completion]:
        return self._run([self.engine.encode_chat(c) for c in conversations], params)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# openai: any OpenAI-compatible HTTP endpoint


class OpenAIBackend:
    """`/v1/completions` and `/v1/chat/completions` over HTTP, with retries and bounded concurrency."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 1.0, concurrency: int = 8):
        import httpx

        if not base_url or not str(base_url).startswith(("http://", "https://")):
            raise UserError(f"generator.base_url must be an http(s) URL ending in /v1, got {base_url!r}")
        if int(concurrency) < 1:
            raise UserError(f"generator.concurrency must be >= 1, got {concurrency}")
        self.base_url = str(base_url).rstrip("/")
        self.model = model
        self.max_retries, self.backoff_s = int(max_retries), float(backoff_s)
        self.concurrency = int(concurrency)
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=float(timeout_s),
                                    limits=httpx.Limits(max_connections=self.concurrency))
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="palmrl-http")
        self._jitter = random.Random(0)
        self._jitter_lock = threading.Lock()
        self.requests = 0  # HTTP requests sent, retries included
        self.retries = 0
        if self.model is None:
            try:
                self.model = self._first_model()
            except UserError:
                self.close()
                raise

    def describe(self) -> dict:
        return {"kind": "openai", "base_url": self.base_url, "model": self.model}

    def _first_model(self) -> str:
        """The endpoint's first listed model: what `palmrl serve`, vLLM and llama.cpp serve alone."""
        body = self._request("GET", "/models", None)
        try:
            return str(body["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise UserError(f"generator.model: {self.base_url}/models lists no model; "
                            f"set generator.model=...") from None

    def _sleep_before_retry(self, attempt: int, retry_after: str | None) -> None:
        with self._jitter_lock:
            jitter = self._jitter.uniform(0, self.backoff_s)
        delay = self.backoff_s * 2 ** attempt + jitter
        if retry_after is not None:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        time.sleep(min(delay, 60.0))  # never park a worker longer than a minute per try

    def _request(self, method: str, path: str, body: dict | None) -> Any:
        import httpx

        url = f"{self.base_url}{path}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
            self.requests += 1
            try:
                response = self._client.request(method, path, json=body)
            except httpx.TransportError as err:  # refused, reset, DNS, timeouts
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                if attempt < self.max_retries:
                    self._sleep_before_retry(attempt, None)
                    continue
                raise UserError(f"generator.base_url: cannot reach {url} ({last}) after {attempt + 1} tries; "
                                f"is the server running?") from None
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    raise UserError(f"generator: {url} answered 200 with a body that is not JSON: "
                                    f"{response.text[:200]!r}") from None
            last = f"HTTP {response.status_code}: {_error_message(response)}"
            if response.status_code in RETRY_STATUS and attempt < self.max_retries:
                self._sleep_before_retry(attempt, response.headers.get("retry-after"))
                continue
            tries = f" after {attempt + 1} tries" if attempt else ""
            raise UserError(f"generator: {url} failed{tries}: {last}")
        raise AssertionError("unreachable")

    def _one(self, path: str, payload: dict, read) -> Completion:
        body = self._request("POST", path, payload)
        try:
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            return Completion(read(choice) or "", choice.get("finish_reason") or "stop",
                              int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
        except (KeyError, IndexError, TypeError, AttributeError):
            raise UserError(f"generator: {self.base_url}{path} answered without choices[0]: "
                            f"{str(body)[:200]}") from None

    def _payload(self, params: GenParams) -> dict:
        payload = {"model": self.model, "max_tokens": int(params.max_tokens), "temperature": float(params.temperature),
                   "top_p": float(params.top_p), "n": 1}
        if params.stop:
            payload["stop"] = list(params.stop)
        return payload

    def complete(self, prompts: Sequence[str], params: GenParams) -> list[Completion]:
        base = self._payload(params)
        return list(self._pool.map(
            lambda p: self._one("/completions", {**base, "prompt": p}, lambda c: c["text"]), prompts))

    def chat(self, conversations: Sequence[Sequence[Mapping[str, str]]], params: GenParams) -> list[Completion]:
        base = self._payload(params)
        return list(self._pool.map(
            lambda m: self._one("/chat/completions", {**base, "messages": [dict(x) for x in m]},
                                lambda c: c["message"]["content"]), conversations))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()


def _error_message(response) -> str:
    """The `error.message` of an OpenAI-style error body, else the start of the body."""
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message", body["error"]))[:300]
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])[:300]
    except ValueError:
        pass
    return response.text[:300]


def make_backend(cfg: Mapping, *, seed: int, batch_size: int) -> Backend:
    """The `generator:` config group -> a backend."""
    kind = cfg.get("kind")
    if kind == "local":
        return LocalBackend(str(cfg.get("ckpt")), seed=seed, batch_size=batch_size,
                            device=str(cfg.get("device", "auto")), precision=str(cfg.get("precision", "auto")),
                            chat=cfg.get("chat", "auto"), top_k=int(cfg.get("top_k", 0)),
                            trust_remote_code=bool(cfg.get("trust_remote_code", False)),
                            decode_weights=str(cfg.get("decode_weights", "fp32")))
    if kind == "openai":
        return OpenAIBackend(str(cfg.get("base_url")), model=cfg.get("model"), api_key_env=cfg.get("api_key_env"),
                             timeout_s=float(cfg.get("timeout_s", 60)), max_retries=int(cfg.get("max_retries", 4)),
                             backoff_s=float(cfg.get("backoff_s", 1.0)), concurrency=int(cfg.get("concurrency", 8)))
    raise UserError(f"generator.kind must be local or openai (generator=local|openai), got {kind!r}")
