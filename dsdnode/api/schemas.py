"""The OpenAI wire format: request bodies (validated), response and stream-chunk bodies, errors.

Only what OpenAI clients send and read is modelled. Every field that would change the answer in a
way we cannot honour (tools, JSON mode, penalties, logit_bias, n > 1, logprobs, echo, best_of,
suffix) is rejected with a 400 (`unsupported_value`, naming the field) unless it has its neutral
value (no tools, response_format text, penalties 0, ...), so stock clients that send defaults
work and no request is silently answered differently from what it asked; fields that do not change
the answer (user, metadata, store, ...) are ignored. `dsd_k`, `adaptive` and `dsd_require_audit` are our own knobs, sent
by OpenAI clients through `extra_body`."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import DsdnodeError


class ApiError(DsdnodeError):
    """An error the client caused (4xx) or we could not avoid (5xx), in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    """Settings shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    dsd_k: Literal["auto"] | int = "auto"  # draft length: "auto" (chosen each round), a fixed k, 0 = no drafting
    adaptive: bool = False  # adaptive (lossy) verification
    dsd_stats: bool = False  # a stream's closing chunk carries `dsd`: speed, drafts accepted, route, audits
    dsd_require_audit: bool = False  # refuse (503) rather than return text some layers of which no one audited

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        """Many clients send `"temperature": null` for "not set": treat null as absent."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("dsd_k")
    @classmethod
    def _k(cls, v):
        if isinstance(v, int) and not 0 <= v <= 64:
            raise ValueError("dsd_k must be 'auto' or an integer in 0..64")
        return v

    def check_supported(self) -> None:
        """400 for the first field whose value asks for something this server does not do."""
        for name, neutral, why in UNSUPPORTED:
            if name in type(self).model_fields and not neutral(getattr(self, name)):
                raise ApiError(400, f"{name}: {why}", param=name, code="unsupported_value")

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _off(value) -> bool:
    return value is None or value is False or value == [] or value == {}


UNSUPPORTED: tuple[tuple[str, Callable[[object], bool], str], ...] = (  # (field, is its value neutral?, why not)
    ("n", lambda v: v == 1, "n > 1 is not supported: send one request per completion"),
    ("logprobs", _off, "logprobs are not supported"),
    ("top_logprobs", lambda v: v in (None, 0), "logprobs are not supported"),
    ("echo", _off, "echo is not supported"),
    ("best_of", lambda v: v in (None, 1), "best_of > 1 is not supported"),
    ("suffix", lambda v: v in (None, ""), "suffix (insertion) is not supported"),
    ("frequency_penalty", lambda v: v == 0, "penalties are not supported: send 0 or leave it out"),
    ("presence_penalty", lambda v: v == 0, "penalties are not supported: send 0 or leave it out"),
    ("logit_bias", _off, "logit_bias is not supported"),
    ("response_format", lambda v: v is None or v.get("type") == "text",
     "only {\"type\": \"text\"} is supported (no JSON mode or structured outputs)"),
    ("tools", _off, "tools (function calling) are not supported"),
    ("tool_choice", lambda v: v in (None, "none"), "tools (function calling) are not supported"),
    ("functions", _off, "functions (function calling) are not supported"),
    ("function_call", lambda v: v in (None, "none"), "functions (function calling) are not supported"),
)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None

    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ApiError(400, "a batch of prompts is not supported: send one prompt per request", param="prompt",
                           code="unsupported_value")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def template_dict(self) -> dict:
        """The message as chat templates expect it (OpenAI's "developer" is a system message)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- responses ---------------------------------------------------------------------------
@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class ResponseShape:
    """Builds the bodies of one response (whole or chunked) of either endpoint."""

    model: str
    chat: bool
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = self.created or int(time.time())

    def _envelope(self, object_: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, text: str, finish_reason: str, usage: Usage) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                       "finish_reason": finish_reason}])
        body["usage"] = usage.body()
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """One stream chunk: a text delta, or (text None) the closing chunk with finish_reason."""
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": 0, "text": text or "", "logprobs": None,
                                                   "finish_reason": finish_reason}])

    def usage_chunk(self, usage: Usage) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage.body()
        return body


def model_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "dsdnode"}]}
