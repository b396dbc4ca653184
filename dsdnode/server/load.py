"""A server's load: the pass time it announces, measured from the passes it serves, and admission by load.

Why: replicas of one span announced the throughput each measured once, at start; on a busy machine
identical replicas announced 1.09 and 0.81 tokens/s, and clients, which route in proportion to
capacity, followed the noise (BENCHMARKS.md). And clients that arrive in the same second cannot see
each other's sessions, so their choices are independent coins: 8 of them put more than 5 on one of
two equal replicas in 29 % of waves. Two things fix that:

- `PassClock`: the seconds of a one-position pass over the span, from the decoding passes the
  server serves (an EWMA; a batched forward counts whole, since that is what a session waits) and,
  while no pass was served for IDLE_REMEASURE_S, from a fresh start-up style measurement. The
  record's throughput and the load answer (net/peer_info.py) carry it: equal replicas announce
  equal, and a loaded one announces what a new session would see.
- `Admission`: the arrival order at a server is the one place where concurrent clients are
  serialised. A server that holds more open sessions than a replica of the session's layers (same
  weights, asked over the load answer, at most LOAD_CACHE_S old, the least it said within RECENT_S)
  answers "busy" with a short retry hint; the client routes to another server at once (client/router.py). Peers are hostile, and a
  replica's load is its claim: one claiming zero load would be sent every client. So a server refuses
  at most as many sessions as it admitted within BUDGET_MEMORY_S: a liar then gets every other
  arrival at most, about what an equal honest replica gets, never everything. (Counting a replica as
  holding at least the sessions sent to it, tried first, kept sessions that had ended counted for a
  minute: a server took 6 of 8 clients of the next wave.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..net.p2p import P2PNode, PeerInfo
from ..net.records import SpanRecord
from .sessions import SessionError

log = logging.getLogger(__name__)

PASS_EWMA = 0.2  # weight of one served pass in the announced pass time
DECODE_MAX_POSITIONS = 8  # blocks up to this long are decoding passes (longer ones are prefill)
IDLE_REMEASURE_S = 30.0  # with no pass served for this long, the pass time is measured afresh
REPLICAS_MAX_AGE_S = 30.0  # the replicas of our span are looked up this often (one discover)
FIRST_LOOKUP_S = 2.0  # while none is known, sooner: 2, 4, 8, ... s (replicas start at about the same time)
LOAD_CACHE_S = 0.5  # a replica's load answer is reused this long (a wave of opens asks once)
RECENT_S = 2.0  # a replica holds the least it answered this long ago or since
LOAD_TIMEOUT_S = 1.0  # a replica that does not answer this fast is not compared with
BUDGET_MEMORY_S = 60.0  # a server refuses at most as many sessions as it admitted this long ago or since
RETRY_AFTER_S = 1.0  # the hint of a load refusal: the client tries another server meanwhile


class PassClock:
    """Seconds of a one-position pass over the whole span, as served lately (see the module docstring)."""

    def __init__(self, start_s: float):
        self.s = start_s
        self.at = time.monotonic()  # when a pass was last served or measured

    def served(self, compute_s: float, positions: int, layers: int, span_layers: int) -> None:
        """A decoding forward of `layers` of the span's `span_layers` took compute_s (prefill blocks
        are not decoding passes, and say nothing about what a new session waits per token)."""
        if positions > DECODE_MAX_POSITIONS or layers <= 0:
            return
        self.s = (1 - PASS_EWMA) * self.s + PASS_EWMA * compute_s * span_layers / layers
        self.at = time.monotonic()

    def remeasured(self, s: float) -> None:
        """An idle server measured its pass afresh: that is what the next session gets."""
        self.s, self.at = s, time.monotonic()

    def idle(self) -> bool:
        return time.monotonic() - self.at > IDLE_REMEASURE_S

    @property
    def throughput(self) -> float:
        return 1.0 / self.s if self.s > 0 else 0.0


@dataclass
class _Replica:
    record: SpanRecord
    answers: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, open sessions) lately
    answered: bool = False  # its last question got an answer
    asked_at: float = -LOAD_CACHE_S

    def heard(self, sessions: int | None) -> None:
        now = self.asked_at = time.monotonic()
        self.answered = sessions is not None
        self.answers = [(t, n) for t, n in self.answers if now - t <= RECENT_S]
        if sessions is not None:
            self.answers.append((now, sessions))

    @property
    def sessions(self) -> int | None:
        """The least it answered within RECENT_S (None: its last question went unanswered). Seen in a
        wave of 8 clients over two spans: a chain refused at one hop closes the sessions it had just
        opened at the others, so a replica's count peaked at sessions that lived a fraction of a
        second, and a server that compared with the peak took 6 of 8 clients."""
        return min(n for _, n in self.answers) if self.answered and self.answers else None


class Admission:
    """Refuses a session by load when a replica of its layers holds fewer (see the module docstring)."""

    def __init__(self, node: P2PNode, model: str, weights: str, open_sessions: Callable[[], int],
                 discover: Callable[[], Awaitable[list[SpanRecord]]] | None = None):
        self.node, self.model, self.weights, self.open_sessions = node, model, weights, open_sessions
        self.discover = discover or (lambda: node.dht.discover(model))
        self.replicas: dict[str, _Replica] = {}
        self._asking: asyncio.Task | None = None
        self.pending = 0  # sessions admitted and not yet in the server's table
        self.admitted_at: list[float] = []  # monotonic times of admissions and refusals lately
        self.refused_at: list[float] = []
        self.refused = 0

    @contextlib.asynccontextmanager
    async def admit(self, start: int, end: int):
        """Admits a session of layers start:end (see `check`); it counts as held from here until the
        block ends (the server puts it in its table by then), so that opens which arrive together,
        and all wait for the same load answers, do not all see the same count."""
        await self.check(start, end)
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def check(self, start: int, end: int) -> None:
        """SessionError("busy") if a replica serving layers start:end holds fewer sessions than we would
        with this one, unless we refused as many sessions as we admitted within BUDGET_MEMORY_S. A
        server without load never asks anyone."""
        refusal = await self._refusal(start, end)
        now = time.monotonic()
        self.admitted_at = [t for t in self.admitted_at if now - t < BUDGET_MEMORY_S]
        self.refused_at = [t for t in self.refused_at if now - t < BUDGET_MEMORY_S]
        if refusal is None or len(self.refused_at) >= len(self.admitted_at):
            self.admitted_at.append(now)
            return
        self.refused_at.append(now)
        self.refused += 1
        log.info("refused a session of layers %d:%d: %s", start, end, refusal)
        raise SessionError("busy", f"{refusal}: open the session there", retry_after_s=RETRY_AFTER_S)

    async def _refusal(self, start: int, end: int) -> str | None:
        """Why a session of layers start:end should go to a less loaded replica (None: it should not)."""
        if self.open_sessions() + self.pending == 0:
            return None
        covering = [r for r in self.replicas.values() if r.record.start <= start and end <= r.record.end]
        if not covering:
            return None
        await self._ask(covering)
        held = self.open_sessions() + self.pending  # after the wait: others may have been admitted meanwhile
        loads = [(r.sessions, r.record.peer_id) for r in covering if r.sessions is not None]
        if not loads:
            log.info("no replica of layers %d:%d said its load (of %d asked)", start, end, len(covering))
            return None
        least, peer = min(loads)
        if held <= least:
            return None
        return f"this server holds {held} sessions and replica {peer} of these layers {least}"

    async def keep_current(self) -> None:
        """Look the replicas up every REPLICAS_MAX_AGE_S (sooner while none is known), in the
        background: an open never waits for the DHT, and a wave of clients finds the list ready."""
        pause = FIRST_LOOKUP_S
        while True:
            await self.lookup()
            await asyncio.sleep(REPLICAS_MAX_AGE_S if self.replicas else pause)
            pause = min(2 * pause, REPLICAS_MAX_AGE_S)

    async def lookup(self) -> None:
        try:
            records = await self.discover()
        except Exception as e:  # the DHT may be busy: no replicas to compare with until the next try
            log.info("looking up the replicas of our span failed: %r", e)
            return
        fresh = {r.peer_id: r for r in records
                 if r.peer_id != self.node.peer_id and r.weights == self.weights and not r.withdrawn}
        self.replicas = {p: self.replicas.get(p, _Replica(r)) for p, r in fresh.items()}
        for p, r in fresh.items():
            self.replicas[p].record = r

    async def _ask(self, replicas: list[_Replica]) -> None:
        """Fresh load answers of `replicas` (one round of questions at a time, reused LOAD_CACHE_S)."""
        now = time.monotonic()
        stale = [r for r in replicas if now - r.asked_at > LOAD_CACHE_S]
        if stale and (self._asking is None or self._asking.done()):
            self._asking = asyncio.create_task(self._ask_all(stale))
        if self._asking is not None and not self._asking.done():
            await asyncio.shield(self._asking)

    async def _ask_all(self, replicas: list[_Replica]) -> None:
        async def one(r: _Replica) -> None:
            try:
                load = await self.node.ask_load(PeerInfo(r.record.peer_id, tuple(r.record.addrs)), LOAD_TIMEOUT_S)
                r.heard(load[self.model][0] if self.model in load else None)
            except Exception as e:  # gone or slow: not compared with until it answers again
                log.debug("replica %s gave no load: %r", r.record.peer_id, e)
                r.heard(None)

        await asyncio.gather(*(one(r) for r in replicas))

    def stop(self) -> None:
        if self._asking is not None:
            self._asking.cancel()
