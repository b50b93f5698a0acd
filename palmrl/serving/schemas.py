"""The request bodies of `palmrl serve`'s OpenAI API (pydantic) and its error shape.

Requests and errors follow OpenAI's shapes (`{"error": {"message", "type", "param", "code"}}`): an
unknown field, a value out of range or an unsupported option (logprobs, echo, penalties, best_of)
fails validation, which the app (palmrl/serving/app.py) answers with a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def refuse(field: str, *, why: str, neutral: tuple | None = None):
    """A validator refusing an OpenAI option palmrl does not serve, unless the request leaves it at a
    neutral value: one of `neutral`, or (None) any falsy value. The neutral value reads as None."""
    def check(cls, value):
        if (value not in neutral) if neutral is not None else bool(value):
            raise ValueError(why)
        return None
    return field_validator(field)(classmethod(check))


class Body(BaseModel):
    """What both endpoints take: the model name, sampling, n, stop strings, streaming, a seed."""

    model_config = ConfigDict(extra="forbid")

    # strict integers: JSON `true` is not a count; seeds fit torch's 64-bit generator
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, strict=True)  # vLLM's extension; 0 = off
    n: int = Field(default=1, ge=1, strict=True)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, strict=True)
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

    _no_logprobs = refuse("logprobs", neutral=(None, False, 0), why="logprobs are not supported")
    _no_bias = refuse("logit_bias", why="logit_bias is not supported")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionBody(Body):
    prompt: str | list[str]
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

    _no_echo = refuse("echo", why="echo is not supported")
    _no_best_of = refuse("best_of", neutral=(None, 1),
                         why="best_of is not supported (best-of-n with a reward model is not served yet)")
    _no_suffix = refuse("suffix", why="suffix (insertion) is not supported")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
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


# the web page's own routes (palmrl/serving/ui.py)

class CompareBody(BaseModel):
    """POST /ui/compare: one prompt for two hidden checkpoints."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    annotator: str
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)


class JudgeBody(BaseModel):
    """POST /ui/judge: the person's verdict on a comparison (a choice, 1-5 ratings, or both)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)
    annotator: str
    choice: Literal["A", "B", "tie", "both_bad"] | None = None
    ratings: dict[Literal["A", "B"], int | None] = Field(default_factory=dict)
