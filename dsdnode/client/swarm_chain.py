"""A chain of remote servers: one session along a routed chain, push forwarding, failover.

The client opens a stream to every hop and sends each an OpenSession naming the next hop. A block
goes to hop 1 only; hops push it on; the last hop answers on its client stream. With relay=True
(the way Petals routes, kept as a benchmark baseline) every hop answers the client, which carries
the block to the next hop itself: 2N links a round instead of N+1.

Failover is one mechanism for every fault. Whatever goes wrong -- a hop refuses the session
(busy, too small, shutting down), dies, hangs past its deadline, or sends a reply the client cannot
use -- becomes a ChainFailure naming the suspects. The client excludes them for this chain (a busy
server only until its retry hint), routes again, opens a new session and replays the committed
prefix from the hidden states it kept, so the output is the same as without the fault. Every
failure excludes at least one peer or waits out a bounded busy period, and the number of
failovers is bounded: it never loops."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

import torch

from ..net.dht import SpanRecord
from ..net.p2p import P2PNode, Stream, StreamClosed
from ..net.protocol import DTYPE_NAMES, SESSION_PROTOCOL
from ..net.stream import close_quietly
from ..net.wire import (CloseSession, ErrorReply, Forward, ForwardResult, OpenSession, SessionOpened,
                        TensorPayload, WireLimits, decode, encode)
from .deadlines import DeadlineSettings, PassDeadline
from .interface import ChainOutput, TreeBlock
from .routing import Hop, NoRoute, best_chain, ping_records, same_weights

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 15.0  # dial + OpenSession + reply, per hop (the server may look up and dial its next hop)
SUSPECT_PING_S = 2.0  # after a missed deadline: a hop that does not answer a ping this fast is hung
CLOSE_TIMEOUT_S = 2.0  # saying goodbye to a hop that may be hung
BUSY_RETRY_S = 2.0  # a busy server without a retry hint is tried again after this long
MAX_BUSY_WAIT_S = 30.0  # longest wait for busy servers when no other route exists
RECORDS_MAX_AGE_S = 60.0  # re-read the DHT when the records we route with are older


class ChainFailure(RuntimeError):
    """A fault of the chain; `suspects` maps each peer it is blamed on to why."""

    def __init__(self, message: str, suspects: dict[str, str] | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.suspects = suspects or {}
        self.retry_after_s = retry_after_s


@dataclass
class _Leg:
    hop: Hop
    stream: Stream
    reader: asyncio.Task | None = None

    @property
    def peer_id(self) -> str:
        return self.hop.candidate.record.peer_id


class RemoteChain:
    def __init__(self, node: P2PNode, model: str, num_layers: int, hidden_size: int, *, weights: str,
                 dtype: torch.dtype = torch.bfloat16, relay: bool = False, max_failovers: int = 8,
                 deadlines: DeadlineSettings = DeadlineSettings(), max_block: int = 64):
        """weights: digest of the weights this client's head comes from; only servers of the same
        weights are chained."""
        self.node, self.model, self.num_layers, self.hidden_size = node, model, num_layers, hidden_size
        self.weights = weights
        self.dtype_name = DTYPE_NAMES[dtype]
        self.relay, self.max_failovers, self.max_block = relay, max_failovers, max_block
        self.deadline = PassDeadline(deadlines)  # measurements carry over to the next session
        self.legs: list[_Leg] = []
        self.excluded: dict[str, str] = {}  # peer id -> why, for the life of this chain
        self.failovers = 0
        self.route: list[tuple[str, int, int]] = []  # (peer id, start, end) of the latest session's hops
        self.session_id = ""
        self._busy_until: dict[str, float] = {}  # busy peers: monotonic time to try them again
        self._busy_count: dict[str, int] = {}
        self._bad_next_hop_reports: dict[str, int] = {}
        self._reasons: dict[str, str] = {}  # excluded peer -> the failure that excluded it, for error messages
        self._records: list[SpanRecord] = []  # of servers of our weights
        self._unusable: dict[str, str] = {}  # providers we cannot chain (other weights or protocol) -> why
        self._records_at = -RECORDS_MAX_AGE_S
        self._results: asyncio.Queue = asyncio.Queue()
        self._step = 0
        self._history: torch.Tensor | None = None  # inputs of the committed prefix, for replay
        self._max_length = 0
        self._committed = 0

    @property
    def n_hops(self) -> int:
        return len(self.legs) or 1

    async def start_session(self, max_length: int) -> None:
        self._max_length, self._history, self._committed = max_length, None, 0
        await self.close()
        await self._with_failover(None)

    async def forward(self, hidden: torch.Tensor, commit_len: int, tree: TreeBlock | None = None,
                      kept: list[int] | None = None) -> ChainOutput:
        if not self._max_length:
            raise ChainFailure("no open session: call start_session first")
        if kept is not None:  # the kept path of the last block moves to its start, as on every hop
            self._history[:, self._committed:self._committed + len(kept)] = self._history[:, [self._committed + i for i in kept]]
        self._remember(hidden, commit_len)
        self._committed = commit_len
        # a replayed (re)opened session holds the committed prefix already compacted: nothing to keep
        return await self._with_failover(lambda replayed: self._pass(hidden, commit_len, tree,
                                                                     None if replayed else kept))

    async def shutdown(self) -> None:
        """Close the session and leave the swarm."""
        await self.close()
        await self.node.stop()

    async def close(self) -> None:
        legs, self.legs = self.legs, []
        await asyncio.gather(*(self._close_leg(leg) for leg in legs))

    # ---- failover -----------------------------------------------------------------------
    async def _with_failover(self, step):
        """Run `step` on the open session; on a fault blame, re-route, replay and run it again."""
        failure: ChainFailure | None = None
        for _ in range(self.max_failovers + 1):
            try:
                replayed = failure is not None or not self.legs
                if replayed:
                    if failure is not None:
                        self._blame(failure)
                        self.failovers += 1
                    await self.close()
                    await self._open()
                    await self._replay(self._committed)
                return await step(replayed) if step is not None else None
            except ChainFailure as e:
                failure = e
        raise ChainFailure(f"gave up after {self.max_failovers} failovers; last failure: {failure}")

    def _blame(self, failure: ChainFailure) -> None:
        now = time.monotonic()
        for peer, why in failure.suspects.items():
            if why == "busy":  # the server's hint, doubled each time the same server is still full
                times = self._busy_count[peer] = self._busy_count.get(peer, 0) + 1
                wait = (failure.retry_after_s if failure.retry_after_s is not None else BUSY_RETRY_S) * 2 ** (times - 1)
                self._busy_until[peer] = now + min(max(wait, 0.5), MAX_BUSY_WAIT_S)
            else:
                self.excluded[peer] = why
                self._reasons[peer] = str(failure)[:300]
        log.info("chain failure (%s); avoiding %s and re-routing", failure, sorted(failure.suspects))

    async def _route(self) -> list[Hop]:
        """The best chain over peers not excluded nor busy; waits (bounded) for busy ones if needed."""
        waited = 0.0
        fresh = False
        while True:
            now = time.monotonic()
            if now - self._records_at > RECORDS_MAX_AGE_S:
                found = await self.node.dht.discover(self.model)
                self._records, self._unusable = same_weights(found, self.weights)
                self._unusable.update(self.node.dht.incompatible.copy())
                self._records_at, fresh = now, True
            busy = {p: t for p, t in self._busy_until.items() if t > now}
            usable = [r for r in self._records if r.peer_id not in self.excluded and r.peer_id not in busy]
            candidates = await ping_records(self.node, usable)
            try:
                try:
                    return best_chain(candidates, self.num_layers, self._max_length)
                except NoRoute:  # records may be stale: let the servers say whether they are full
                    return best_chain(candidates, self.num_layers)
            except NoRoute as e:
                if not fresh:  # servers may have joined since we last looked
                    self._records_at = -RECORDS_MAX_AGE_S
                    continue
                wait = min(busy.values(), default=now) - now
                if not busy or waited + wait > MAX_BUSY_WAIT_S:
                    raise NoRoute(f"{e}{self._why_excluded(busy)}") from None
                log.info("every route needs a busy server; trying again in %.1f s", wait)
                await asyncio.sleep(wait)
                waited += wait

    def _why_excluded(self, busy: dict[str, float]) -> str:
        parts = ([self._reasons[p] for p in self.excluded] + [f"{p} is busy" for p in busy]
                 + [f"{p} {why}" for p, why in self._unusable.items()])
        return f"; servers avoided: {'; '.join(parts)}" if parts else ""

    # ---- session ------------------------------------------------------------------------
    async def _open(self) -> None:
        hops = await self._route()
        self.session_id = secrets.token_hex(8)
        self._results = asyncio.Queue()
        opened = await asyncio.gather(*(self._open_leg(hops, i) for i in range(len(hops))), return_exceptions=True)
        legs = [leg for leg in opened if isinstance(leg, _Leg)]
        failures = [e for e in opened if not isinstance(e, _Leg)]
        if failures:
            await asyncio.gather(*(self._close_leg(leg) for leg in legs))
            for e in failures:
                if not isinstance(e, ChainFailure):
                    raise e
            suspects = {p: why for e in failures for p, why in e.suspects.items()}
            retry = [e.retry_after_s for e in failures if e.retry_after_s is not None]
            raise ChainFailure("; ".join(map(str, failures)), suspects, max(retry, default=None))
        self.legs = legs
        self.route = [(h.candidate.record.peer_id, h.start, h.end) for h in hops]
        for leg in self.legs:
            leg.reader = asyncio.create_task(self._read(leg, self._results))
        log.info("session %s along %s", self.session_id, self.route)

    def _next_hop(self, hops: list[Hop], i: int) -> SpanRecord | None:
        """The span record hop i pushes its output to (None: it answers the client)."""
        return hops[i + 1].candidate.record if i + 1 < len(hops) and not self.relay else None

    async def _open_leg(self, hops: list[Hop], i: int) -> _Leg:
        hop = hops[i]
        peer = hop.candidate.record.peer_id
        nxt = self._next_hop(hops, i)
        try:
            stream = await self.node.open_stream(hop.candidate.peer, SESSION_PROTOCOL, timeout=OPEN_TIMEOUT_S)
        except Exception as e:
            raise ChainFailure(f"cannot reach {peer}: {e}", {peer: "unreachable"}) from None
        try:
            prv = hops[i - 1].candidate.record.peer_id if i > 0 and self._next_hop(hops, i - 1) else None
            await stream.send(encode(OpenSession(self.session_id, self.model, hop.start, hop.end, self._max_length,
                                                 nxt.peer_id if nxt else None, prv, self.dtype_name, self.weights)))
            reply = decode(await stream.recv(timeout=OPEN_TIMEOUT_S), WireLimits())
            if isinstance(reply, ErrorReply):
                raise self._refusal(peer, reply, nxt)
            if not isinstance(reply, SessionOpened) or reply.session_id != self.session_id:
                raise ChainFailure(f"{peer} answered OpenSession with {type(reply).__name__}", {peer: "bad_reply"})
        except ChainFailure:
            await close_quietly(stream)
            raise
        except Exception as e:  # lost stream, timeout, undecodable reply: that hop's fault
            await close_quietly(stream)
            raise ChainFailure(f"opening a session on {peer} failed: {e!r}", {peer: "bad_reply"}) from None
        return _Leg(hop, stream)

    def _pushes_to(self, leg: _Leg) -> SpanRecord | None:
        """The record of the hop `leg` pushes its output to (None: it answers the client, or its
        session is already closed)."""
        if leg not in self.legs:
            return None
        return self._next_hop([other.hop for other in self.legs], self.legs.index(leg))

    def _refusal(self, peer: str, reply: ErrorReply, nxt: SpanRecord | None) -> ChainFailure:
        """Whom an error reply is blamed on: the hop that sent it, or for bad_next_hop the hop it could
        not reach -- unless the same hop keeps saying that, then the hop itself."""
        message = f"{peer}: {reply.code}: {reply.message}"
        if reply.code == "bad_next_hop" and nxt is not None:
            reports = self._bad_next_hop_reports[peer] = self._bad_next_hop_reports.get(peer, 0) + 1
            suspects = {nxt.peer_id: "unreachable from the previous hop"}
            if reports > 1:
                suspects[peer] = "cannot reach its next hops"
            return ChainFailure(message, suspects)
        return ChainFailure(message, {peer: reply.code}, reply.retry_after_s if reply.code == "busy" else None)

    async def _close_leg(self, leg: _Leg) -> None:
        if leg.reader:
            leg.reader.cancel()
        try:
            await asyncio.wait_for(leg.stream.send(encode(CloseSession(self.session_id))), CLOSE_TIMEOUT_S)
        except Exception as e:  # the hop is gone or hung; its session expires there
            log.debug("could not close the session on %s: %r", leg.peer_id, e)
        await close_quietly(leg.stream)

    async def _read(self, leg: _Leg, results: asyncio.Queue) -> None:
        """Everything a hop sends us: the result (last hop) or errors (any hop). Anything unusable
        is a failure of that hop."""
        limits = WireLimits(hidden_size=self.hidden_size, max_block=self.max_block, max_length=self._max_length)
        while True:
            try:
                msg = decode(await leg.stream.recv(), limits)
            except (StreamClosed, ConnectionError) as e:
                await results.put(ChainFailure(f"lost the stream to {leg.peer_id}: {e}", {leg.peer_id: "lost"}))
                return
            except Exception as e:
                await results.put(ChainFailure(f"bad reply from {leg.peer_id}: {e}", {leg.peer_id: "bad_reply"}))
                return
            if isinstance(msg, ForwardResult):
                await results.put((leg, msg))
            elif isinstance(msg, ErrorReply) and msg.session_id in (None, self.session_id):
                await results.put(self._refusal(leg.peer_id, msg, self._pushes_to(leg)))
            else:
                await results.put(ChainFailure(f"{leg.peer_id} sent an unexpected {type(msg).__name__}",
                                               {leg.peer_id: "bad_reply"}))
                return

    # ---- blocks -------------------------------------------------------------------------
    async def _pass(self, hidden: torch.Tensor, commit_len: int, tree: TreeBlock | None = None,
                    kept: list[int] | None = None) -> ChainOutput:
        """One block through every hop: sent to hop 1 (push), or carried hop by hop (relay)."""
        if not self.relay:
            return await self._step_through(0, hidden, commit_len, len(self.legs), tree, kept)
        computes: list[float] = []
        for i in range(len(self.legs)):
            out = await self._step_through(i, hidden, commit_len, 1, tree, kept)
            hidden = out.hidden
            computes += out.hop_compute_s
        return ChainOutput(hidden, computes)

    async def _step_through(self, leg_index: int, hidden: torch.Tensor, commit_len: int, hops: int,
                            tree: TreeBlock | None = None, kept: list[int] | None = None) -> ChainOutput:
        """Send a block to one leg and wait, until a deadline measured from earlier passes, for the
        result computed by `hops` hops."""
        self._step += 1
        step, positions = self._step, hidden.shape[1]
        leg = self.legs[leg_index]
        t0 = time.monotonic()
        try:
            mask = None if tree is None else TensorPayload.from_torch(tree.mask)
            await leg.stream.send(encode(Forward(self.session_id, step, commit_len, TensorPayload.from_torch(hidden),
                                                 mask, [], None if tree is None else tree.positions, kept)))
        except (StreamClosed, ConnectionError) as e:
            raise ChainFailure(f"cannot send to {leg.peer_id}: {e}", {leg.peer_id: "lost"}) from None
        deadline, extended = self.deadline.seconds(positions), False
        while True:
            try:
                got = await asyncio.wait_for(self._results.get(), max(0.0, t0 + deadline - time.monotonic()))
            except TimeoutError:
                hung = await self._unreachable_hops()
                if hung:
                    raise ChainFailure(f"no answer within {deadline:.1f} s and {sorted(hung)} do not answer pings",
                                       {p: "hung" for p in hung}) from None
                if not extended:  # every hop is alive: perhaps busy with other sessions; wait patiently
                    deadline, extended = max(deadline, self.deadline.patient_seconds(positions)), True
                    continue
                raise ChainFailure(f"no answer within {deadline:.1f} s though every hop answers pings",
                                   {leg.peer_id: "slow" for leg in self.legs}) from None
            if isinstance(got, ChainFailure):
                raise got
            sender, result = got
            if result.step_id < step:
                continue  # a late answer to a step we gave up on
            out = self._check(sender, result, step, positions, hops)
            self.deadline.observe(positions, time.monotonic() - t0)
            return out

    def _check(self, sender: _Leg, got: ForwardResult, step: int, positions: int, hops: int) -> ChainOutput:
        """A reply the client can use, or a failure of the hop that sent it."""
        h = got.hidden
        problem = None
        if got.step_id != step or got.session_id != self.session_id:
            problem = f"step {got.step_id} of session {got.session_id!r}, expected step {step}"
        elif tuple(h.shape) != (1, positions, self.hidden_size) or h.dtype != self.dtype_name:
            problem = f"hidden {h.dtype}{list(h.shape)}, expected {self.dtype_name}{[1, positions, self.hidden_size]}"
        elif len(got.timings) != hops:
            problem = f"{len(got.timings)} hop timings, expected {hops}"
        if problem is None:
            hidden = h.to_torch()
            if bool(torch.isfinite(hidden).all()):
                t = got.timings
                return ChainOutput(hidden, [x.compute_s for x in t],
                                   [max(0.0, b.recv_time - a.send_time) for a, b in zip(t, t[1:])])
            problem = "non-finite hidden states"
        raise ChainFailure(f"unusable reply from {sender.peer_id}: {problem}", {sender.peer_id: "bad_reply"})

    def _remember(self, hidden: torch.Tensor, commit_len: int) -> None:
        """Keep the inputs of every position: a new chain is rebuilt from them."""
        if self._history is None:
            self._history = torch.zeros(1, self._max_length, hidden.shape[-1], dtype=hidden.dtype)
        self._history[:, commit_len:commit_len + hidden.shape[1]] = hidden

    async def _replay(self, commit_len: int) -> None:
        for at in range(0, commit_len, self.max_block):
            await self._pass(self._history[:, at:min(commit_len, at + self.max_block)], at)

    async def _unreachable_hops(self) -> set[str]:
        async def alive(leg: _Leg) -> bool:
            try:
                await self.node.ping(leg.hop.candidate.peer, timeout=SUSPECT_PING_S)
                return True
            except Exception:
                return False
        states = await asyncio.gather(*(alive(leg) for leg in self.legs))
        return {leg.peer_id for leg, ok in zip(self.legs, states) if not ok}
