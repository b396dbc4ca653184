"""A chain of remote servers: one session along a routed chain, push forwarding, failover.

The client opens a stream to every hop and sends each an OpenSession naming the next hop. A block
goes to hop 1 only; hops push it on; the last hop answers on its client stream. With relay=True
(the way Petals routes, kept as a benchmark baseline) every hop answers the client, which carries
the block to the next hop itself: 2N links a round instead of N+1.

Failover is one mechanism for every fault. Whatever goes wrong -- a hop refuses the session
(busy, too small, shutting down), dies, hangs past its deadline, or sends a reply the client cannot
use -- becomes a ChainFailure naming the suspects. The chain's Router (client/router.py: candidates,
exclusions, standing, the route) excludes them for this chain (a busy server only until its retry
hint) and routes again; the chain opens a new session and replays the committed
prefix from the hidden states it kept, so the output is the same as without the fault. Every
failure excludes at least one peer or waits out a bounded busy period, and the number of
failovers is bounded: it never loops.

Trust (client/audit.py, client/standing.py): every hop also sends the client a copy of its output
and a digest of its input; the client checks the digests every pass (a mismatch is a failure of both
hops involved), logs every hop's inputs and outputs, and audits them against other servers every
`audit_every` rounds and before a generation returns. A wrong hop is excluded, banned, and the
generation rolls back to its first wrong position (`checkpoint`, `finish`). Routing uses what this
client measured and each server's standing, within the Sybil limits."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

import torch

from ..net.records import SpanRecord
from ..net.p2p import P2PNode, PeerInfo, Stream, StreamClosed
from ..dtypes import dtype_name
from ..net.protocol import SESSION_PROTOCOL
from ..net.stream import close_quietly
from ..net.wire import (INT8_BLOCKS, WIRE_MODES, CloseSession, ErrorReply, Forward, ForwardResult, OpenSession,
                        SessionOpened, TensorPayload, WireLimits, decode, digest, encode, hidden_payload)
from .audit import Auditor, audit_every
from .bans import BanList
from .deadlines import DeadlineSettings, PassDeadline
from .interface import UNCHECKED, ChainOutput, Checkpoint, TreeBlock
from .pacing import PaceWatch, came_late
from .prefill import DEFAULT_POSITION_SHARE, PrefillCosts, PrefillMeter, choose_chunk
from .router import Router
from .routing import Hop, NoRoute
from .standing import Standing, TrustSettings, hop_compute_s
from ..errors import PeerError

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 15.0  # dial + OpenSession + reply, per hop (the server may look up and dial its next hop)
SUSPECT_PING_S = 2.0  # after a missed deadline: a hop that does not answer a ping this fast is hung
CLOSE_TIMEOUT_S = 2.0  # saying goodbye to a hop that may be hung

class AuditsRequired(NoRoute):
    """The chain was told to refuse rather than release outputs no independent server audited."""


class ChainFailure(PeerError, RuntimeError):
    """A fault of the chain; `suspects` maps each peer it is blamed on to why."""

    def __init__(self, message: str, suspects: dict[str, str] | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.suspects = suspects or {}
        self.retry_after_s = retry_after_s


@dataclass
class _Leg:
    hop: Hop
    stream: Stream
    compute_dtype: str  # what the hop says its layers compute in (audits compare like with like)
    session_id: str = ""  # this hop's own id of the session (OpenSession.next_session_id says why)
    reader: asyncio.Task | None = None

    @property
    def peer_id(self) -> str:
        return self.hop.candidate.record.peer_id


class RemoteChain:
    def __init__(self, node: P2PNode, model: str, num_layers: int, hidden_size: int, *, weights: str,
                 dtype: torch.dtype = torch.bfloat16, relay: bool = False, max_failovers: int = 8,
                 deadlines: DeadlineSettings = DeadlineSettings(), max_block: int = 64,
                 trust: TrustSettings = TrustSettings(), standing: Standing | None = None, bans: BanList | None = None,
                 meter: PrefillMeter | None = None, first_layer: int = 0, wire: str = "exact"):
        """weights: digest of the weights this client's head comes from; only servers of the same
        weights are chained. first_layer: the chain starts there, taking the output of the layers
        before it as its input (the client runs those: client/private.py). standing: shared by the chains of one client (what one learnt, the next
        routes on). meter: what blocks cost on this client's chains, shared likewise (prefill chunks).
        wire: "exact" (lossless) or "int8" (opt-in, lossy: every hop of every session sends hidden
        states as int8 blocks, net/wire.py; the client dequantizes what comes back to `dtype`)."""
        if wire not in WIRE_MODES:
            raise ValueError(f"wire must be one of {list(WIRE_MODES)}, got {wire!r}")
        self.wire = wire
        self.hidden_wire = INT8_BLOCKS if wire == "int8" else dtype_name(dtype)  # what replies must carry
        self.meter = meter or PrefillMeter()
        self.node, self.model, self.num_layers, self.hidden_size = node, model, num_layers, hidden_size
        self.weights = weights
        self.dtype, self.dtype_name = dtype, dtype_name(dtype)
        self.trust, self.standing, self.bans = trust, standing or Standing(trust), bans or BanList()
        self.router = Router(node, model, num_layers, weights, self.standing, self.bans, first_layer)
        self.auditor = Auditor(node, model, weights, self.dtype_name, hidden_size, max_block,
                               lambda h: self.router.audit_pool(h.peer_id, h.start, h.end), self.router.group_of,
                               self.standing, self.bans, wire=self.hidden_wire)
        self.audit_every = audit_every(trust.audit_rate)
        self.verified = 0  # positions whose outputs are audited (or unauditable), whatever the route
        self._audit_task: asyncio.Task | None = None
        # some hop of the current route has another server to audit it (decided once per route: the
        # records, exclusions and bans it depends on change only when the chain routes anew)
        self._auditable = True
        self._since_audit = 0
        self.relay, self.max_failovers, self.max_block = relay, max_failovers, max_block
        self.deadline = PassDeadline(deadlines)  # measurements carry over to the next session
        self.pace = PaceWatch()
        self._replace: dict[str, str] = {}  # hops to replace before the next pass (slow-walking), and why
        self._stalls: set[tuple[str, str]] = set()  # (hop, next hop) of the passes that stalled between them
        self.legs: list[_Leg] = []
        self.failovers = 0
        self.route: list[tuple[str, int, int]] = []  # (peer id, start, end) of the latest session's hops
        self.session_id = ""
        self._results: asyncio.Queue = asyncio.Queue()
        self._step = 0
        self._history: torch.Tensor | None = None  # inputs of the committed prefix, for replay
        self._max_length = 0
        self._committed = 0

    @property
    def excluded(self) -> dict[str, str]:
        """Peers this chain avoids for its life, and why (kept by its Router)."""
        return self.router.excluded

    @property
    def unaudited_layers(self) -> list[tuple[int, int]]:
        return sorted(self.auditor.unaudited_layers) if self.audit_every else []

    def _refuse_unaudited(self) -> None:
        if self.trust.require_audit and self.auditor.unaudited_layers:
            layers = ", ".join(f"{a}:{b}" for a, b in sorted(self.auditor.unaudited_layers))
            raise AuditsRequired(f"layers {layers} of {self.model} cannot be audited (no server of another "
                                 f"network group serves them, or none answered) and audits are required")

    @property
    def n_hops(self) -> int:
        return len(self.legs) or 1

    async def start_session(self, max_length: int) -> None:
        self._max_length, self._history, self._committed = max_length, None, 0
        # the first audit comes after the first round: tokens are handed out only once checked, so this
        # is what the first token waits for; later audits come every audit_every rounds
        self.verified, self._since_audit = 0, max(0, self.audit_every - 1)
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
        self.verified = min(self.verified, commit_len)  # positions past it are computed anew
        # a replayed (re)opened session holds the committed prefix already compacted: nothing to keep
        return await self._with_failover(lambda replayed: self._pass(hidden, commit_len, tree,
                                                                     None if replayed else kept))

    async def prefill(self, hidden: torch.Tensor, chunk: int | None = None) -> list[ChainOutput]:
        if not self._max_length:
            raise ChainFailure("no open session: call start_session first")
        positions = hidden.shape[1]
        chunk = min(chunk or choose_chunk(self.prefill_costs(), positions, self.max_block), self.max_block)
        starts = list(range(0, positions, chunk))
        self._remember(hidden, 0)
        self._committed, self.verified = 0, 0
        blocks = [(hidden[:, at:at + chunk], at) for at in starts]

        async def run(replayed: bool) -> list[ChainOutput]:
            if self.relay:  # the client carries every block: nothing to overlap
                return [await self._pass(block, at) for block, at in blocks]
            return await self._steps_through(0, blocks, len(self.legs))

        try:
            return await self._with_failover(run)  # a failover replays nothing (committed 0) and runs it all again
        finally:
            self._committed = starts[-1]  # where a chunk-by-chunk prefill would stand

    def prefill_costs(self) -> PrefillCosts:
        """The costs a prefill's chunk is chosen by: measured ones, else the route's (each hop's advertised
        one-position step, half of each ping's round trip, bandwidth unknown)."""
        records = [leg.hop.candidate for leg in self.legs]
        step = sum(1.0 / max(c.record.throughput, 1e-3) for c in records) / max(1, len(records))
        rtt = sum(c.rtt_s or 0.0 for c in records) / max(1, len(records))
        fallback = PrefillCosts(self.n_hops, step, step * DEFAULT_POSITION_SHARE, rtt / 2, 0.0)
        return self.meter.costs(self.n_hops, fallback)

    # ---- audits -------------------------------------------------------------------------
    async def checkpoint(self) -> Checkpoint:
        self.auditor.round += 1
        if not self.audit_every:
            return Checkpoint(UNCHECKED)
        rollback = None
        if self._audit_task is not None and self._audit_task.done():
            rollback = await self._verdict()
        if rollback is None and self._audit_task is None:
            self._since_audit += 1
            if self._since_audit >= self.audit_every:
                self._since_audit = 0
                self._audit_task = asyncio.create_task(self.auditor.audit())
        if rollback is None and self._audit_task is None and not self._auditable:
            # no independent server serves any hop's layers: an audit would only release these positions
            # unchecked, so release them now and the text streams as it comes
            self.verified = max(self.verified, self.auditor.filled)
        self._refuse_unaudited()
        return Checkpoint(self.verified, rollback)

    async def finish(self, path: list[int] = (0,)) -> Checkpoint:
        if not self.audit_every:
            return Checkpoint(UNCHECKED)
        self.auditor.keep_last(list(path))
        rollback = await self._verdict() if self._audit_task is not None else None
        if rollback is None and self.auditor.audited < self.auditor.filled:
            self._audit_task = asyncio.create_task(self.auditor.audit())
            rollback = await self._verdict()
        self._refuse_unaudited()
        return Checkpoint(self.verified, rollback)

    async def _verdict(self) -> int | None:
        """Apply the finished (or awaited) audit: exclusions, and where to roll back to (None: nowhere)."""
        task, self._audit_task = self._audit_task, None
        verdict = await task
        for peer, why in {**verdict.convicted, **verdict.excluded}.items():
            self.router.exclude(peer, why, f"{peer}: {why} (audit)")
        if verdict.rollback_to is None:
            self.verified = max(self.verified, self.auditor.audited)
            return None
        keep = max(verdict.rollback_to, self.verified)  # what an earlier route verified stays verified
        self.verified = keep
        log.warning("audit: rolling back to position %d and re-routing without %s", keep,
                    sorted({**verdict.convicted, **verdict.excluded}))
        self.failovers += 1
        self._since_audit = self.audit_every - 1  # the new route is audited after its first round
        await self.close()  # the next forward routes anew and replays the kept prefix
        return keep

    async def shutdown(self) -> None:
        """Close the session and leave the swarm."""
        await self.close()
        await self.node.stop()

    async def close(self) -> None:
        """Close the session (and the audits of its route)."""
        legs, self.legs = self.legs, []
        task, self._audit_task = self._audit_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(self.auditor.close(), *(self._close_leg(leg) for leg in legs))

    # ---- failover -----------------------------------------------------------------------
    async def _with_failover(self, step):
        """Run `step` on the open session; on a fault blame, re-route, replay and run it again."""
        failure: ChainFailure | None = None
        for _ in range(self.max_failovers + 1):
            try:
                replayed = failure is not None or not self.legs
                if replayed:
                    if failure is not None:
                        self.router.blame(failure.suspects, str(failure), failure.retry_after_s)
                        self.failovers += 1
                    await self.close()
                    await self._open()
                    await self._replay(self._committed)
                return await step(replayed) if step is not None else None
            except ChainFailure as e:
                failure = e
        raise ChainFailure(f"gave up after {self.max_failovers} failovers; last failure: {failure}")

    # ---- session ------------------------------------------------------------------------
    async def _open(self) -> None:
        hops = await self.router.route(self._max_length)
        self.session_id = secrets.token_hex(8)  # names the session in logs; each hop gets an id of its own
        self._hop_ids = [secrets.token_hex(8) for _ in hops]
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
        await self.auditor.new_route([(leg.hop.candidate.record, leg.hop.start, leg.hop.end, leg.compute_dtype)
                                      for leg in self.legs], self._max_length)
        self._auditable = bool(self.audit_every) and self.auditor.note_unauditable()
        self._refuse_unaudited()
        if self._auditable:
            self.auditor.prepare()
        self.pace.reset([leg.peer_id for leg in self.legs])
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
            sid = self._hop_ids[i]
            await stream.send(encode(OpenSession(sid, self.model, hop.start, hop.end, self._max_length,
                                                 nxt.peer_id if nxt else None, prv, self.dtype_name, self.weights,
                                                 self._hop_ids[i + 1] if nxt else None, self.wire)))
            reply = decode(await stream.recv(timeout=OPEN_TIMEOUT_S), WireLimits())
            if isinstance(reply, ErrorReply):
                raise await self._refusal(peer, reply, nxt)
            if not isinstance(reply, SessionOpened) or reply.session_id != sid:
                raise ChainFailure(f"{peer} answered OpenSession with {type(reply).__name__}", {peer: "bad_reply"})
        except ChainFailure:
            await close_quietly(stream)
            raise
        except Exception as e:  # lost stream, timeout, undecodable reply: that hop's fault
            await close_quietly(stream)
            raise ChainFailure(f"opening a session on {peer} failed: {e!r}", {peer: "bad_reply"}) from None
        return _Leg(hop, stream, reply.compute_dtype, sid)

    def _pushes_to(self, leg: _Leg) -> SpanRecord | None:
        """The record of the hop `leg` pushes its output to (None: it answers the client, or its
        session is already closed)."""
        if leg not in self.legs:
            return None
        return self._next_hop([other.hop for other in self.legs], self.legs.index(leg))

    async def _refusal(self, peer: str, reply: ErrorReply, nxt: SpanRecord | None) -> ChainFailure:
        """Whom an error reply is blamed on: the hop that sent it -- for bad_next_hop ("I cannot reach
        my next hop") on evidence: the next hop if it does not answer this client's ping either, else
        the hop that said so (a hop's word alone cannot get an honest neighbour excluded)."""
        message = f"{peer}: {reply.code}: {reply.message}"
        if reply.code == "bad_next_hop" and nxt is not None:
            try:
                await self.node.ping(PeerInfo(nxt.peer_id, tuple(nxt.addrs)), timeout=SUSPECT_PING_S)
            except Exception:
                return ChainFailure(message, {nxt.peer_id: "unreachable from the previous hop and from this client"})
            return ChainFailure(f"{message} (it answers this client)", {peer: "cannot reach its next hop"})
        return ChainFailure(message, {peer: reply.code}, reply.retry_after_s if reply.code == "busy" else None)

    async def _close_leg(self, leg: _Leg) -> None:
        if leg.reader:
            leg.reader.cancel()
        try:
            await asyncio.wait_for(leg.stream.send(encode(CloseSession(leg.session_id))), CLOSE_TIMEOUT_S)
        except Exception as e:  # the hop is gone or hung; its session expires there
            log.debug("could not close the session on %s: %r", leg.peer_id, e)
        await close_quietly(leg.stream)

    async def _read(self, leg: _Leg, results: asyncio.Queue) -> None:
        """Everything a hop sends us: the result (last hop) or errors (any hop). Anything unusable
        is a failure of that hop."""
        limits = WireLimits(hidden_size=self.hidden_size, max_block=self.max_block, max_length=self._max_length)
        while True:
            try:
                frame = await leg.stream.recv()
                msg = decode(frame, limits)
            except (StreamClosed, ConnectionError) as e:
                await results.put(ChainFailure(f"lost the stream to {leg.peer_id}: {e}", {leg.peer_id: "lost"}))
                return
            except Exception as e:
                await results.put(ChainFailure(f"bad reply from {leg.peer_id}: {e}", {leg.peer_id: "bad_reply"}))
                return
            if isinstance(msg, ForwardResult):
                await results.put((leg, msg, time.monotonic(), len(frame)))
            elif isinstance(msg, ErrorReply) and msg.session_id in (None, leg.session_id):
                await results.put(await self._refusal(leg.peer_id, msg, self._pushes_to(leg)))
            else:
                await results.put(ChainFailure(f"{leg.peer_id} sent an unexpected {type(msg).__name__}",
                                               {leg.peer_id: "bad_reply"}))
                return

    # ---- blocks -------------------------------------------------------------------------
    async def _pass(self, hidden: torch.Tensor, commit_len: int, tree: TreeBlock | None = None,
                    kept: list[int] | None = None) -> ChainOutput:
        """One block through every hop: sent to hop 1 (push), or carried hop by hop (relay)."""
        if self._replace:  # the route works, but a hop walks slowly: fail over before this block
            replace, self._replace = self._replace, {}
            raise ChainFailure(f"replacing {sorted(replace)}: {'; '.join(replace.values())}", replace)
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
        outputs of `hops` hops from there (each hop's copy; the last one's is the result)."""
        return (await self._steps_through(leg_index, [(hidden, commit_len)], hops, tree, kept))[0]

    async def _steps_through(self, leg_index: int, blocks: list[tuple[torch.Tensor, int]], hops: int,
                             tree: TreeBlock | None = None, kept: list[int] | None = None) -> list[ChainOutput]:
        """Send blocks (hidden, commit_len) to one leg back to back -- its hops work on them as a
        pipeline -- and wait for every block's outputs of `hops` hops; one ChainOutput per block.
        Only the first block met no queue: it alone teaches deadlines, standing and the meter."""
        legs = self.legs[leg_index:leg_index + hops]
        first = self._step + 1
        sent: dict[int, tuple[int, int, TensorPayload, int]] = {}  # step -> (positions, commit_len, payload, bytes)
        t0 = time.monotonic()
        for hidden, commit_len in blocks:
            self._step += 1
            payload = hidden_payload(hidden, self.wire)
            try:
                mask = None if tree is None else TensorPayload.from_torch(tree.mask)
                frame = encode(Forward(legs[0].session_id, self._step, commit_len, payload, mask, [],
                                       None if tree is None else tree.positions, kept))
                await legs[0].stream.send(frame)
            except (StreamClosed, ConnectionError) as e:
                raise ChainFailure(f"cannot send to {legs[0].peer_id}: {e}", {legs[0].peer_id: "lost"}) from None
            sent[self._step] = (hidden.shape[1], commit_len, payload, len(frame))
        deadline = sum(self.deadline.seconds(n) for n, *_ in sent.values())
        extended = False
        got: dict[tuple[int, int], tuple[ForwardResult, torch.Tensor, float, int]] = {}  # (step, hop) -> output
        while len(got) < len(blocks) * hops:
            try:
                item = await asyncio.wait_for(self._results.get(), max(0.0, t0 + deadline - time.monotonic()))
            except TimeoutError:
                hung = await self._unreachable_hops()
                if hung:
                    raise ChainFailure(f"no answer within {deadline:.1f} s and {sorted(hung)} do not answer pings",
                                       {p: "hung" for p in hung}) from None
                if not extended:  # every hop is alive: perhaps busy with other sessions; wait patiently
                    patient = sum(self.deadline.patient_seconds(n) for n, *_ in sent.values())
                    deadline, extended = max(deadline, patient), True
                    continue
                raise ChainFailure(f"no answer within {deadline:.1f} s though every hop answers pings",
                                   self._stalled(legs, got, len(sent))) from None
            if isinstance(item, ChainFailure):
                raise item
            sender, result, at, size = item
            if result.step_id < first:
                continue  # a late answer to a step we gave up on
            hop = legs.index(sender) if sender in legs else -1
            step = result.step_id if result.step_id in sent else first  # another step fails the check
            got[(step, hop)] = (result, self._check(sender, result, step, sent[step][0], hop + 1), at, size)
        outputs = []
        for step, (positions, commit_len, payload, size) in sent.items():
            mine = [got[(step, j)] for j in range(hops)]
            self._check_digests(legs, payload, [g[0] for g in mine])
            t = mine[-1][0].timings
            links = [max(0.0, b.recv_time - a.send_time) for a, b in zip(t, t[1:])]
            if step == first:
                self.deadline.observe(positions, mine[-1][2] - t0)
                arrivals = [g[2] for g in mine]
                shares = hop_compute_s(t0, arrivals, [leg.hop.candidate.rtt_s for leg in legs])
                own = [max(0.0, s.send_time - s.recv_time) for s in (g[0].timings[-1] for g in mine)]
                for leg, compute, stamped in zip(legs, shares, own):
                    if not came_late(compute, stamped):
                        self.standing.measured(leg.hop.candidate.record, leg.hop.end - leg.hop.start, compute)
                self.meter.observe(positions, [x.compute_s for x in t], links)
                slow = self.pace.observe(
                    [leg.peer_id for leg in legs], shares, own,
                    positions, [self.router.replica_s(leg.peer_id, leg.hop.start, leg.hop.end) for leg in legs])
                hops_of = {leg.peer_id: leg.hop for leg in legs}
                self._replace.update({p: why for p, why in slow.items()  # slow beats no route at all
                                      if self.router.can_route_around(p, hops_of[p].start, hops_of[p].end)})
            inputs = [blocks[step - first][0]] + [g[1] for g in mine[:-1]]
            for j in range(hops):
                self.auditor.record(leg_index + j, step, commit_len, inputs[j], mine[j][1], kept,
                                    None if tree is None else tree.mask, None if tree is None else tree.positions,
                                    queued=step != first)
            outputs.append(ChainOutput(mine[-1][1], [x.compute_s for x in t], links, size, sum(g[3] for g in mine)))
        return outputs

    def _stalled(self, legs: list[_Leg], got: dict[tuple[int, int], tuple], steps: int) -> dict[str, str]:
        """Whom a pass that never finished is blamed on, though every hop answers pings: the first hop
        whose output copy did not come (j), or the hop that should have pushed to it (p) -- the client
        cannot tell a hung hop from a withheld push, so it decides from the stalls it saw before:
          - j stalled before behind another hop: j ("stalls behind several hops");
          - p's pushes stalled before at another hop: p ("its next hops stall");
          - the same two stalled before: j is avoided for the chain (unproven: no mark);
          - otherwise j is only paused (STALL_PAUSE_S, no mark), so a hop that withholds its pushes
            cannot get the honest servers after it excluded one by one.
        The first hop of a pass (sent the block by the client itself) is avoided for the chain (no mark)."""
        j = next(i for i in range(len(legs)) if sum(1 for _, hop in got if hop == i) < steps)
        late = legs[j].peer_id
        if j == 0 or self.relay:
            return {late: "stalled on the client's block"}
        before = legs[j - 1].peer_id
        seen, self._stalls = self._stalls, self._stalls | {(before, late)}
        if any(nxt == late and prv != before for prv, nxt in seen):
            return {late: "stalls behind several hops"}
        if any(prv == before and nxt != late for prv, nxt in seen):
            return {before: "its next hops stall"}
        return {late: "stalled again" if (before, late) in seen else "stalled"}

    def _check(self, sender: _Leg, got: ForwardResult, step: int, positions: int, timings: int) -> torch.Tensor:
        """The hidden states of a reply the client can use (a hop's copy carries `timings` timings, 0:
        the sender is not expected to answer this block), or a failure of the hop that sent it."""
        h = got.hidden
        problem = None
        if timings == 0:
            problem = f"an answer to step {got.step_id} it was not asked for"
        elif got.step_id != step or got.session_id != sender.session_id:
            problem = f"step {got.step_id} of session {got.session_id!r}, expected step {step}"
        elif tuple(h.shape) != (1, positions, self.hidden_size) or h.dtype != self.hidden_wire:
            problem = f"hidden {h.dtype}{list(h.shape)}, expected {self.hidden_wire}{[1, positions, self.hidden_size]}"
        elif len(got.timings) != timings:
            problem = f"{len(got.timings)} hop timings, expected {timings}"
        if problem is None:
            hidden = h.to_torch().to(self.dtype)
            if bool(torch.isfinite(hidden).all()):
                return hidden
            problem = "non-finite hidden states"
        raise ChainFailure(f"unusable reply from {sender.peer_id}: {problem}", {sender.peer_id: "bad_reply"})

    @staticmethod
    def _check_digests(legs: list[_Leg], sent: TensorPayload, results: list[ForwardResult]) -> None:
        """Each hop must have received what the previous hop sent the client as its output (hop 1: what
        the client sent). A mismatch means one of the two lied; the client cannot tell which, so it
        avoids both for this session."""
        given = [sent] + [r.hidden for r in results[:-1]]
        for j, (payload, result) in enumerate(zip(given, results)):
            if result.timings[-1].input_digest != digest(payload):
                suspects = {legs[j].peer_id: "digest_mismatch"}
                if j:
                    suspects[legs[j - 1].peer_id] = "digest_mismatch"
                raise ChainFailure(f"{legs[j].peer_id} computed on another input than "
                                   f"{'the block sent' if not j else legs[j - 1].peer_id + ' returned'}", suspects)

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
