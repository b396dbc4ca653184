"""What every HTTP request passes before any route runs: the API key, a body size limit, and a
bounded number of generations at once with a bounded queue.

One ASGI middleware, so a rejected request costs no JSON parsing, no tokenizing and no swarm work:
- **Key**: with an API key, every path but OPEN_PATHS (liveness, and the web page with its static
  assets, which asks for the key itself) needs `Authorization: Bearer KEY`; /ready, /metrics,
  /docs and /openapi.json included (they tell an outsider what the swarm is and how loaded).
- **Body**: a body longer than `max_body_bytes` (declared or streamed) is refused with 413 before
  it is read whole; the limit follows from the prompt limit (a token is never more than
  BODY_BYTES_PER_TOKEN bytes of JSON), so a 9 MB prompt is never parsed, let alone tokenized.
- **Concurrency**: at most `max_concurrent` generation requests (POSTs under /v1) run at once and
  `max_queued` more wait their turn; beyond that: 429 with Retry-After. A streamed answer holds its
  place until its last event is sent.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from dataclasses import dataclass

from ..errors import UserError
from .schemas import ApiError

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/"})  # answer without the key: liveness, and the web page (it holds no data)
OPEN_PREFIXES: tuple[str, ...] = ("/ui/",)  # the page's script and style
BODY_BYTES_PER_TOKEN = 64  # JSON bytes a prompt token can take, escapes included, with room to spare
BODY_BASE_BYTES = 64 * 1024  # the rest of a request: settings, chat roles, stop strings
RETRY_AFTER_S = 2


@dataclass(frozen=True)
class GuardSettings:
    api_key: str | None = None
    max_body_bytes: int = BODY_BASE_BYTES + 4096 * BODY_BYTES_PER_TOKEN
    max_concurrent: int = 4  # generations running at once
    max_queued: int = 16  # generations waiting for a place; more get 429

    @classmethod
    def for_prompts(cls, max_prompt_tokens: int, **kw) -> GuardSettings:
        return cls(max_body_bytes=BODY_BASE_BYTES + max_prompt_tokens * BODY_BYTES_PER_TOKEN, **kw)


class BodyTooLarge(UserError):
    """A chunked body went past the limit while it was read (the sender's doing: answered 413)."""


class RequestGuard:
    """ASGI middleware: key, body size, generations at once (see the module docstring)."""

    def __init__(self, app, settings: GuardSettings) -> None:
        self.app, self.settings = app, settings
        self._expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None
        self._running = asyncio.Semaphore(settings.max_concurrent)
        self._waiting = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self._expected is not None and not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
            given = dict(scope.get("headers") or []).get(b"authorization")
            if given is None:
                return await _error(send, 401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                                    "invalid_api_key")
            if not hmac.compare_digest(given, self._expected):
                return await _error(send, 401, "Incorrect API key provided", "invalid_api_key")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        limit = self.settings.max_body_bytes
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _error(send, 413, f"the request body is over {limit} bytes", "request_too_large")
        if declared is None:  # a chunked body: read it here, up to the limit, before any route sees it
            try:
                receive = await _buffered(receive, limit)
            except BodyTooLarge:
                return await _error(send, 413, f"the request body is over {limit} bytes", "request_too_large")
        if scope.get("method") != "POST" or not path.startswith("/v1"):
            return await self.app(scope, receive, send)
        if self._running.locked() and self._waiting >= self.settings.max_queued:
            return await _error(send, 429, f"{self.settings.max_concurrent} requests are running and "
                                           f"{self.settings.max_queued} waiting; try again shortly",
                                "rate_limit_exceeded", headers=[(b"retry-after", str(RETRY_AFTER_S).encode())])
        self._waiting += 1
        try:
            await self._running.acquire()
        finally:
            self._waiting -= 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._running.release()


async def _buffered(receive, limit: int):
    """Read a whole body of at most `limit` bytes (BodyTooLarge beyond); returns a `receive` that
    hands it to the app in one message, then passes on what comes next (a disconnect)."""
    chunks, got, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return _replay([message], receive)
        got += len(message.get("body", b""))
        if got > limit:
            raise BodyTooLarge()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _replay(messages: list, receive):
    async def wrapped():
        return messages.pop(0) if messages else await receive()

    return wrapped


async def _error(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    """An ApiError in OpenAI's format, sent before any route ran."""
    kind = "rate_limit_error" if status == 429 else "invalid_request_error"
    body = json.dumps(ApiError(status, message, type=kind, code=code).body()).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def is_public_bind(host: str) -> bool:
    """Whether listening on `host` can take connections from other machines (a wildcard, or any
    address that is not loopback)."""
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host != "localhost"
