"""The server's inference sessions: one KV cache each, a memory budget, idle expiry.

A session's cache is allocated and charged as its positions are written (doubling, in steps of at
least GROW_STEP positions, never past the session's max_length), not reserved up front: an
OpenSession costs a few hundred bytes to send, so a reservation of a whole max-length cache per
open let two throw-away peer ids fill a server. Opening checks only that the budget has room for
a first step; a block that needs more than the budget has left first reclaims sessions idle for
RECLAIM_IDLE_S (most idle first), then answers "busy" (the client fails over, replaying its
history elsewhere). A session that sends no block within OPEN_LEASE_S of opening is closed.
Closing a session (expiry included) drops its cache at once, whoever still holds the Session
object: memory follows the budget, not the lifetime of streams and tasks that once served it.
Sliding-window layers are trimmed to their window and the block after it (SpanCache, trim_windows:
a client rolls back within its last block only), and a session is charged what its cache holds, so
a model with sliding layers (Mistral, Gemma 2/3, gpt-oss) fits more and longer sessions.

A session belongs to the peer that opened it: it is keyed by (opener's peer id, session id), and
blocks pushed by the upstream peer the opener named (prev_peer) are found by (prev_peer, session
id), so a session id taken by someone else is simply another session, never a refusal of the
client that opens it (ids are bound to the opener's key; a client gives each hop its own id, so
only that hop and the one pushing to it know it). Blocks are taken only from the opener's own
stream (first hop) or from prev_peer; `admits` says whether a stream may touch a session, and
callers treat "no" exactly like an unknown session id.

Admission is fair between clients, and a client is both the peer id that opens sessions and the
network group of the address its connection comes from (`net/groups.py`: a /24 or /48; peer ids
are free, addresses are not). Each peer id and each group may hold at most a number of open
sessions and a share of the cache budget, and each peer id at most max_queued_positions
positions waiting for compute. Past a limit it is told "busy" with a retry hint, like a full
server, and routes elsewhere; other clients are not held up by one that opens or sends too much."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..models.span import Span, SpanCache
from ..net.p2p import Stream
from ..errors import PeerError


BUSY_RETRY_AFTER_S = 2.0  # the hint a full server gives; clients back off further when it stays full
QUEUE_RETRY_AFTER_S = 0.5  # the hint for a client whose blocks already fill its share of the queue
ACTIVE_WITHIN_S = 5.0  # a session that sent a block this recently counts as active (load, batching)
GROW_STEP = 128  # positions: the smallest cache a session is given, and the smallest growth
OPEN_LEASE_S = 30.0  # an opened session must send its first block within this (a chain's last hop
# gets it after every earlier hop prefilled its first block)
RECLAIM_IDLE_S = 15.0  # when memory is short, sessions idle this long are closed to make room


@dataclass(frozen=True)
class ClientLimits:
    """What one client may hold at this server at once: per peer id and per network group."""

    max_sessions: int = 16  # per peer id
    max_queued_positions: int = 512  # per peer id
    max_group_sessions: int = 32  # per network group
    max_cache_share: float = 0.5  # of the cache budget, per peer id and per network group


SessionKey = tuple[str | None, str]  # (opener's peer id, session id)


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
    group: str = ""  # the opener's network group (net/groups.py)
    max_length: int = 0  # the most positions its cache may grow to
    next_session_id: str | None = None  # the id of this session at the next hop (what pushes carry)
    wire: str = "exact"  # how its hidden states travel (net/wire.py WIRE_MODES), in and out alike
    next_stream: Stream | None = None
    last_used: float = field(default_factory=time.monotonic)
    opened: float = field(default_factory=time.monotonic)
    blocks: int = 0  # blocks admitted so far (none within OPEN_LEASE_S of opening: the session is closed)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one block at a time, in order

    @property
    def owner(self) -> str | None:
        """Peer id of the client that opened the session."""
        return getattr(self.client, "remote_peer_id", None)

    @property
    def key(self) -> SessionKey:
        return self.owner, self.session_id

    @property
    def closed(self) -> bool:
        return self.cache is None

    def admits(self, stream: Stream, forward: bool) -> bool:
        """May a frame on `stream` act on this session? Blocks (forward=True) come from prev_peer if
        the opener named one, else on the opener's stream; anything else only on the opener's stream."""
        if forward and self.prev_peer is not None:
            return stream.remote_peer_id == self.prev_peer
        return stream is self.client


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def keep_big_allocations_mapped(threshold: int = 1 << 20) -> None:
    """Have glibc serve allocations of `threshold` bytes and more by mmap, so a freed cache goes back
    to the system at once. Caches grow by reallocation (doubling); glibc otherwise raises its mmap
    threshold to the size of each big block freed (up to 32 MiB), and the next smaller caches then
    come from the heap, which keeps the memory after they are freed: measured, 38 of 68 MB of an
    expired session stayed resident. Setting the threshold fixes it; no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass


class SessionTable:
    def __init__(self, span: Span, budget_bytes: int, max_length: int, idle_s: float,
                 limits: ClientLimits = ClientLimits(), on_reclaim: Callable[[Session], None] | None = None,
                 open_lease_s: float = OPEN_LEASE_S):
        self.span, self.budget, self.max_length, self.idle_s = span, budget_bytes, max_length, idle_s
        self.open_lease_s = open_lease_s
        self.limits = limits
        self.on_reclaim = on_reclaim  # told of each idle session closed to make room (to tell its client)
        self.sessions: dict[SessionKey, Session] = {}
        self._pushed: dict[tuple[str, str], Session] = {}  # (prev_peer, session id) -> its session

    @property
    def used_bytes(self) -> int:
        """(Also read by the metrics thread: iterate a copy, the loop may change the table meanwhile.)"""
        return sum(s.cache.nbytes for s in list(self.sessions.values()) if s.cache is not None)

    def free_tokens(self) -> int:
        """How many more positions (over the whole span) fit in the budget: counted in the
        full-attention layers, which grow with every position (in all layers when every layer
        slides: each new session's window costs that much)."""
        cache = self.span.new_cache(0, trim_windows=True)
        per_token = cache.full.row_bytes or cache.sliding.row_bytes
        return max(0, (self.budget - self.used_bytes) // per_token)

    def open(self, session_id: str, start: int, end: int, max_length: int, client: Stream,
             next_peer: str | None = None, prev_peer: str | None = None, group: str = "",
             next_session_id: str | None = None) -> Session:
        """Open a session, its cache still empty (there must be room for a first step)."""
        owner = getattr(client, "remote_peer_id", None)
        if (owner, session_id) in self.sessions or (prev_peer, session_id) in self._pushed:
            raise SessionError("malformed", f"session {session_id} is already open")
        if not self.span.start <= start < end <= self.span.end:
            raise SessionError("wrong_span", f"this server holds layers {self.span.start}:{self.span.end}, "
                                             f"not {start}:{end}")
        if not 0 < max_length <= self.max_length:
            raise SessionError("too_large", f"max_length must be in 1..{self.max_length}, got {max_length}")
        held = sum(1 for s in self.sessions.values() if s.owner == owner)
        if owner is not None and held >= self.limits.max_sessions:
            raise SessionError("busy", f"this client already holds {held} sessions here (at most "
                                       f"{self.limits.max_sessions} per client); try another server",
                               BUSY_RETRY_AFTER_S)
        in_group = sum(1 for s in self.sessions.values() if s.group == group)
        if in_group >= self.limits.max_group_sessions:
            raise SessionError("busy", f"peers of this client's network hold {in_group} sessions here (at most "
                                       f"{self.limits.max_group_sessions} per network); try another server",
                               BUSY_RETRY_AFTER_S)
        span = self.span.sub(start, end)
        cache = span.new_cache(0, trim_windows=True)
        first = min(max_length, GROW_STEP)
        self._make_room(cache.nbytes_for(first, first), owner, group, None)
        session = Session(session_id, span, cache, client, next_peer, prev_peer, group, max_length,
                          next_session_id or session_id)
        self.sessions[session.key] = session
        if prev_peer is not None:
            self._pushed[prev_peer, session_id] = session
        return session

    def grow(self, session: Session, commit_len: int, block: int) -> None:
        """Give the session's cache room for a block of `block` positions after `commit_len`, charging
        the budget for what it allocates (full-attention layers: doubling, at least GROW_STEP, at
        most its max_length; trimmed sliding layers: their window and the longest block so far).
        "busy" if the budget, or the share of its peer id or network, has no room."""
        cache, positions = session.cache, commit_len + block
        if cache is None:
            return
        capacity = cache.capacity
        if positions > capacity:
            if positions > session.max_length:
                raise SessionError("too_large", f"{positions} positions exceed the session's max_length "
                                                f"{session.max_length}")
            capacity = min(session.max_length, max(positions, 2 * cache.capacity, GROW_STEP))
        extra = cache.nbytes_for(capacity, block) - cache.nbytes
        if extra > 0:
            self._make_room(extra, session.owner, session.group, session)
        cache.grow(capacity, block)  # (when every layer slides, only the position ids grow)

    def _make_room(self, extra: int, owner: str | None, group: str, asking: Session | None) -> None:
        """Check that `extra` more bytes fit the budget and the shares of `owner` and `group`; when
        only the budget is short, close the sessions idle longest (at least RECLAIM_IDLE_S) first."""
        share = int(self.limits.max_cache_share * self.budget)
        live = [s for s in self.sessions.values() if s.cache is not None]
        for what, mine in (("this client", [s for s in live if s.owner == owner]),
                           ("peers of this client's network", [s for s in live if s.group == group])):
            held = sum(s.cache.nbytes for s in mine)
            if held + extra > share:
                raise SessionError("busy", f"{what} hold {held >> 20} MiB of KV cache here (at most {share >> 20} "
                                           f"MiB); try another server", BUSY_RETRY_AFTER_S)
        now = time.monotonic()
        idle = sorted((s for s in live if s is not asking and now - s.last_used >= RECLAIM_IDLE_S),
                      key=lambda s: s.last_used)
        if self.used_bytes + extra > self.budget >= self.used_bytes - sum(s.cache.nbytes for s in idle) + extra:
            while self.used_bytes + extra > self.budget:  # only when that makes enough room
                reclaimed = self.close(idle.pop(0).key)
                if self.on_reclaim is not None:
                    self.on_reclaim(reclaimed)
        if self.used_bytes + extra > self.budget:
            raise SessionError("busy", f"server is busy: {extra >> 20} MiB of KV cache needed, "
                                       f"{max(0, self.budget - self.used_bytes) >> 20} MiB free; try another server",
                               BUSY_RETRY_AFTER_S)

    def get(self, session_id: str, stream: Stream, forward: bool = False) -> Session:
        """The open session `session_id` of the peer on `stream` (its opener, or for a block its
        prev_peer) if `stream` may act on it (see Session.admits); a session of someone else is
        reported exactly like a missing one, so its existence does not leak."""
        peer = stream.remote_peer_id
        session = self._pushed.get((peer, session_id)) if forward else None
        session = session or self.sessions.get((peer, session_id))
        if session is None or not session.admits(stream, forward):
            raise SessionError("unknown_session", f"no open session {session_id!r} on this server")
        session.last_used = time.monotonic()
        return session

    def close(self, key: SessionKey) -> Session | None:
        """Forget the session and free its cache now (a block being computed keeps its own reference
        until it finishes)."""
        session = self.sessions.pop(key, None)
        if session is not None:
            session.cache = None
            if self._pushed.get((session.prev_peer, session.session_id)) is session:
                del self._pushed[session.prev_peer, session.session_id]
        return session

    def admit_block(self, session: Session, commit_len: int, positions: int, queued: int) -> None:
        """Admit a block of `positions` after `commit_len` cached ones: "busy" when its client already
        has `queued` positions waiting for compute here and the block would take it past its share,
        or when its cache cannot grow to hold it (grow)."""
        limit = self.limits.max_queued_positions
        if queued and queued + positions > limit:
            raise SessionError("busy", f"this client has {queued} positions queued here (at most {limit} per "
                                       f"client); try again shortly or another server", QUEUE_RETRY_AFTER_S)
        cached = session.cache.length if session.cache is not None else 0
        if not 0 <= commit_len <= cached:  # checked before growing: a bogus commit_len must not allocate
            raise SessionError("bad_shape", f"commit_len {commit_len} is outside the cached 0..{cached} positions")
        self.grow(session, commit_len, positions)
        session.blocks += 1

    def active(self) -> int:
        """Sessions that sent a block in the last ACTIVE_WITHIN_S seconds."""
        since = time.monotonic() - ACTIVE_WITHIN_S
        return sum(1 for s in list(self.sessions.values()) if s.last_used >= since)

    def expired(self) -> list[SessionKey]:
        """Sessions idle past idle_s, and those that sent no block within open_lease_s of opening."""
        now = time.monotonic()
        return [key for key, s in self.sessions.items()
                if now - s.last_used > self.idle_s or (s.blocks == 0 and now - s.opened > self.open_lease_s)]
