"""The server's inference sessions: one KV cache each, a memory budget, idle expiry.

A session is opened by a client for a sub-range of the server's span with a maximum length; its
cache is allocated up front, so the budget check at open time is the only place memory can run out
and a full server answers "busy" instead of failing mid-generation. Closing a session (expiry
included) drops its cache at once, whoever still holds the Session object: memory follows the
budget, not the lifetime of streams and tasks that once served the session.

A session belongs to the peer that opened it: blocks are taken only from the opener's own stream
(first hop) or from the upstream peer the opener named (prev_peer); `admits` says whether a stream
may touch a session, and callers treat "no" exactly like an unknown session id.

Admission is fair between clients (a client is the peer id that opens sessions): each may hold at
most ClientLimits.max_sessions open sessions here and have at most max_queued_positions positions
waiting for compute. Past either limit it is told "busy" with a retry hint, like a full server, and
routes elsewhere; other clients are not held up by one that opens or sends too much."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..models.span import Span, SpanCache
from ..net.p2p import Stream
from ..errors import PeerError


BUSY_RETRY_AFTER_S = 2.0  # the hint a full server gives; clients back off further when it stays full
QUEUE_RETRY_AFTER_S = 0.5  # the hint for a client whose blocks already fill its share of the queue
ACTIVE_WITHIN_S = 5.0  # a session that sent a block this recently counts as active (load, batching)


@dataclass(frozen=True)
class ClientLimits:
    """What one client (peer id) may hold at this server at once."""

    max_sessions: int = 16
    max_queued_positions: int = 512


class SessionError(PeerError):
    """Becomes an ErrorReply with this code (and, for "busy", a retry hint)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s


@dataclass
class Session:
    session_id: str
    span: Span
    cache: SpanCache | None  # None once closed: the memory is gone even if the Session lingers
    client: Stream  # the opener's stream: where results (last hop) and errors go
    next_peer: str | None  # peer id this hop pushes its output to (None: the last hop)
    prev_peer: str | None  # peer id that pushes blocks in (None: the opener sends them)
    next_stream: Stream | None = None
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one block at a time, in order

    @property
    def owner(self) -> str | None:
        """Peer id of the client that opened the session."""
        return getattr(self.client, "remote_peer_id", None)

    @property
    def closed(self) -> bool:
        return self.cache is None

    def admits(self, stream: Stream, forward: bool) -> bool:
        """May a frame on `stream` act on this session? Blocks (forward=True) come from prev_peer if
        the opener named one, else on the opener's stream; anything else only on the opener's stream."""
        if forward and self.prev_peer is not None:
            return stream.remote_peer_id == self.prev_peer
        return stream is self.client


def cache_bytes(span: Span, length: int) -> int:
    config = span.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = span.dtype.itemsize
    return 2 * (span.end - span.start) * config.num_key_value_heads * head_dim * length * itemsize


class SessionTable:
    def __init__(self, span: Span, budget_bytes: int, max_length: int, idle_s: float,
                 limits: ClientLimits = ClientLimits()):
        self.span, self.budget, self.max_length, self.idle_s = span, budget_bytes, max_length, idle_s
        self.limits = limits
        self.sessions: dict[str, Session] = {}

    @property
    def used_bytes(self) -> int:
        """(Also read by the metrics thread: iterate a copy, the loop may change the table meanwhile.)"""
        return sum(s.cache.nbytes for s in list(self.sessions.values()) if s.cache is not None)

    def free_tokens(self) -> int:
        """How many more positions (over the whole span) fit in the budget."""
        per_token = cache_bytes(self.span, 1)
        return max(0, (self.budget - self.used_bytes) // per_token)

    def open(self, session_id: str, start: int, end: int, max_length: int, client: Stream,
             next_peer: str | None = None, prev_peer: str | None = None) -> Session:
        if session_id in self.sessions:
            raise SessionError("malformed", f"session {session_id} is already open")
        if not self.span.start <= start < end <= self.span.end:
            raise SessionError("wrong_span", f"this server holds layers {self.span.start}:{self.span.end}, "
                                             f"not {start}:{end}")
        if not 0 < max_length <= self.max_length:
            raise SessionError("too_large", f"max_length must be in 1..{self.max_length}, got {max_length}")
        owner = getattr(client, "remote_peer_id", None)
        held = sum(1 for s in self.sessions.values() if s.owner == owner)
        if owner is not None and held >= self.limits.max_sessions:
            raise SessionError("busy", f"this client already holds {held} sessions here (at most "
                                       f"{self.limits.max_sessions} per client); try another server",
                               BUSY_RETRY_AFTER_S)
        span = self.span.sub(start, end)
        need = cache_bytes(span, max_length)
        if self.used_bytes + need > self.budget:
            raise SessionError("busy", f"server is busy: {need >> 20} MiB of KV cache needed, "
                                       f"{(self.budget - self.used_bytes) >> 20} MiB free; try another server",
                               BUSY_RETRY_AFTER_S)
        session = Session(session_id, span, span.new_cache(max_length), client, next_peer, prev_peer)
        self.sessions[session_id] = session
        return session

    def get(self, session_id: str, stream: Stream, forward: bool = False) -> Session:
        """The open session `session_id` if `stream` may act on it (see Session.admits); a session
        of someone else is reported exactly like a missing one, so its existence does not leak."""
        session = self.sessions.get(session_id)
        if session is None or not session.admits(stream, forward):
            raise SessionError("unknown_session", f"no open session {session_id!r} on this server")
        session.last_used = time.monotonic()
        return session

    def close(self, session_id: str) -> Session | None:
        """Forget the session and free its cache now (a block being computed keeps its own reference
        until it finishes)."""
        session = self.sessions.pop(session_id, None)
        if session is not None:
            session.cache = None
        return session

    def admit_block(self, session: Session, positions: int, queued: int) -> None:
        """Refuse ("busy") a block of `positions` when its client already has `queued` positions
        waiting for compute here and the block would take it past its share."""
        limit = self.limits.max_queued_positions
        if queued and queued + positions > limit:
            raise SessionError("busy", f"this client has {queued} positions queued here (at most {limit} per "
                                       f"client); try again shortly or another server", QUEUE_RETRY_AFTER_S)

    def active(self) -> int:
        """Sessions that sent a block in the last ACTIVE_WITHIN_S seconds."""
        since = time.monotonic() - ACTIVE_WITHIN_S
        return sum(1 for s in list(self.sessions.values()) if s.last_used >= since)

    def expired(self) -> list[str]:
        now = time.monotonic()
        return [sid for sid, s in self.sessions.items() if now - s.last_used > self.idle_s]
