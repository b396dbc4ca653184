"""Audits: another server recomputes a hop's work, so a server that returns wrong activations is caught.

Every hop sends the client a copy of the output it pushed on, and stamps a digest of the input it
received (server/daemon.py); the client checks each round that hop i's input digest matches hop
i-1's copy (or the block the client sent), so a hop cannot send the client one thing and push
another. The client keeps, per hop of the current route, the hop's input and output at every
position. An audit of a hop opens a shadow session on another server that serves the same layers,
sends it the hop's recorded inputs of every position since the last audit of that hop (one catch-up
block, cheap per position; a new shadow session first catches up from position 0) and compares the
outputs with the hop's copies, position by position, within a tolerance measured per dtype. The
audited hop sees nothing: every block it serves is treated the same, audited or not.

A mismatch is settled by a third server for those layers: whichever of the two it agrees with is
right; the other is convicted (banned, client/bans.py) and excluded, and the generation rolls back
to the first wrong position and recomputes on a route without it. With no third server, the audited
hop is excluded for the session (not banned) and the generation rolls back all the same. A span no
other server serves cannot be audited: its positions are released (logged once, counted in AuditStats.unaudited)."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..net.records import SpanRecord
from ..net.p2p import P2PNode, PeerInfo, Stream
from ..net.protocol import SESSION_PROTOCOL
from ..net.stream import close_quietly
from ..net.wire import (CloseSession, ErrorReply, Forward, ForwardResult, OpenSession, SessionOpened, TensorPayload,
                        WireLimits, decode, encode)
from .bans import BanList
from .standing import Standing, record_group
from ..errors import PeerError

log = logging.getLogger(__name__)

# Largest honest difference times a margin (docs/ARCHITECTURE.md, "Trust"): the per-position relative
# L2 difference between a span run block by block (with rollbacks) and the same positions as one
# catch-up block, measured at most 1.1e-5 in float32 and 3.2e-2 in bfloat16. float16 was not measured:
# it gets bfloat16's. Servers that compute in different dtypes differ far more (up to 0.55 measured,
# float32 vs bfloat16 on SmolLM2 0:15), so only servers that compute alike are compared.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


def tolerance(compute_dtype: str, wire_dtype: str) -> float:
    """Outputs computed in one dtype and sent in another differ by the coarser one's tolerance."""
    return max(TOLERANCE[compute_dtype], TOLERANCE[wire_dtype])
AUDIT_TIMEOUT_S = 20.0  # one shadow-session exchange (open, or a catch-up block)
AUDITOR_TRIES = 2  # auditors tried for one hop before the hop counts as unauditable this time


class AuditUnavailable(PeerError, RuntimeError):
    """The auditor could not do the work (refused, unreachable, slow, unusable reply)."""


class UnlikeAuditor(AuditUnavailable):
    """The auditor computes in another dtype than the audited hop: no fault, but no comparison."""


def relative_diff(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per position (dim 1): |got - want| / |want| over the hidden dimension."""
    a, b = got.float(), want.float()
    return (a - b).norm(dim=-1)[0] / b.norm(dim=-1)[0].clamp_min(1e-6)


def first_mismatch(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> int | None:
    """The first position (dim 1) whose relative L2 difference exceeds tolerance (or is not finite)."""
    bad = ~(relative_diff(got, want) <= tolerance)  # NaN counts as bad
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


class ShadowSession:
    """A session on an auditing server, fed by the client itself (request/response on one stream)."""

    def __init__(self, record: SpanRecord, stream: Stream, session_id: str, limits: WireLimits):
        self.record, self.stream, self.session_id, self.limits = record, stream, session_id, limits
        self.compute_dtype = ""
        self.length = 0  # positions the shadow cache holds
        self._step = 0

    @classmethod
    async def open(cls, node: P2PNode, record: SpanRecord, model: str, weights: str, start: int, end: int,
                   max_length: int, dtype: str, limits: WireLimits) -> ShadowSession:
        try:
            stream = await node.open_stream(PeerInfo(record.peer_id, tuple(record.addrs)), SESSION_PROTOCOL,
                                            timeout=AUDIT_TIMEOUT_S)
        except Exception as e:
            raise AuditUnavailable(f"cannot reach auditor {record.peer_id}: {e!r}") from None
        shadow = cls(record, stream, secrets.token_hex(8), limits)
        opened = await shadow._ask(OpenSession(shadow.session_id, model, start, end, max_length, None, None, dtype, weights),
                                   SessionOpened)
        shadow.compute_dtype = opened.compute_dtype
        return shadow

    async def run(self, hidden: torch.Tensor, commit_len: int, max_block: int) -> torch.Tensor:
        """Outputs of positions commit_len.. for these inputs, in blocks of at most max_block."""
        outs = []
        for at in range(0, hidden.shape[1], max_block):
            block = hidden[:, at:at + max_block]
            self._step += 1
            got = await self._ask(Forward(self.session_id, self._step, commit_len + at,
                                          TensorPayload.from_torch(block), None, []), ForwardResult)
            if got.step_id != self._step or tuple(got.hidden.shape) != tuple(block.shape):
                raise AuditUnavailable(f"auditor {self.record.peer_id} answered a block with step {got.step_id}, "
                                       f"shape {list(got.hidden.shape)}")
            outs.append(got.hidden.to_torch())
        self.length = commit_len + hidden.shape[1]
        return torch.cat(outs, dim=1)

    async def _ask(self, msg, want: type):
        try:
            await self.stream.send(encode(msg))
            reply = decode(await self.stream.recv(timeout=AUDIT_TIMEOUT_S), self.limits)
        except Exception as e:
            raise AuditUnavailable(f"auditor {self.record.peer_id}: {e!r}") from None
        if isinstance(reply, ErrorReply) or not isinstance(reply, want):
            what = f"{reply.code}: {reply.message}" if isinstance(reply, ErrorReply) else type(reply).__name__
            raise AuditUnavailable(f"auditor {self.record.peer_id} answered {what}")
        return reply

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.stream.send(encode(CloseSession(self.session_id))), 2.0)
        except Exception:
            pass
        await close_quietly(self.stream)


@dataclass
class HopLog:
    """What one hop of the route was given and returned at every position, and how far it is audited."""

    record: SpanRecord
    start: int
    end: int
    compute_dtype: str
    inputs: torch.Tensor  # [1, max_length, H]
    outputs: torch.Tensor
    audited: int = 0  # positions [0, audited) of this hop agree with an auditor (or had none)
    shadow: ShadowSession | None = None
    block_start: int = 0  # where the last block was written (a token tree's kept path moves there)

    def keep(self, kept: list[int]) -> None:
        """After a token tree, keep its accepted path, gathered to the block's start, as every hop does
        with its cache: the log then holds one input and output per position, as a catch-up block
        recomputes them."""
        src = [self.block_start + i for i in kept]
        for rows in (self.inputs, self.outputs):
            rows[:, self.block_start:self.block_start + len(kept)] = rows[:, src]

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


@dataclass
class Verdict:
    """rollback_to: the first position whose output was wrong (None: nothing to roll back)."""

    rollback_to: int | None = None
    convicted: dict[str, str] = field(default_factory=dict)  # peer id -> why, banned
    excluded: dict[str, str] = field(default_factory=dict)  # peer id -> why, for this session only


@dataclass
class AuditStats:
    audits: int = 0  # hop audits run
    positions: int = 0  # hop positions checked against an auditor
    unaudited: int = 0  # hop positions released without an auditor
    mismatches: int = 0
    rounds_to_detection: list[int] = field(default_factory=list)  # rounds since the wrong position was computed


class Auditor:
    """The audit state of one chain: per-hop logs of the current route and the audits of them.

    `auditors(log)` gives the records that may audit a hop (same layers, not the hop, not excluded or
    banned), best first."""

    def __init__(self, node: P2PNode, model: str, weights: str, dtype: str, hidden_size: int, max_block: int,
                 auditors: Callable[[HopLog], list[SpanRecord]], standing: Standing, bans: BanList):
        self.node, self.model, self.weights, self.dtype, self.max_block = node, model, weights, dtype, max_block
        self.hidden_size = hidden_size
        self.auditors, self.standing, self.bans = auditors, standing, bans
        self.logs: list[HopLog] = []
        self.max_length = 0
        self.filled = 0  # positions [0, filled) have been computed on this route
        self.low_water = 0  # least commit_len since the running audit took its snapshot
        self.stats = AuditStats()
        self.round = 0
        self._computed_at: torch.Tensor | None = None  # round in which each position was last computed
        self._warned: set[tuple[int, int]] = set()
        self._unlike: set[tuple[str, str]] = set()  # (auditor peer, compute dtype) pairs known not to match

    async def new_route(self, hops: list[tuple[SpanRecord, int, int, str]], max_length: int,
                        dtype: torch.dtype) -> None:
        await self.close()
        self.max_length = max_length
        shape = (1, max_length, self.hidden_size)
        self.logs = [HopLog(rec, a, b, compute, torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                     for rec, a, b, compute in hops]
        self.filled = self.low_water = 0
        if self._computed_at is None or self._computed_at.numel() != max_length:
            self._computed_at = torch.zeros(max_length, dtype=torch.long)

    def record(self, hop: int, commit_len: int, inputs: torch.Tensor, outputs: torch.Tensor,
               kept: list[int] | None = None, tree: bool = False) -> None:
        """Log a block a hop computed. kept: the path kept of the hop's previous block (a token tree);
        tree: this block is a token tree, so only its first row (the token it grows from) is a
        position in sequence until the next block (or finish) says which path was kept."""
        t = inputs.shape[1]
        log_ = self.logs[hop]
        if kept is not None:
            log_.keep(kept)
        log_.block_start = commit_len
        log_.inputs[:, commit_len:commit_len + t] = inputs
        log_.outputs[:, commit_len:commit_len + t] = outputs
        log_.audited = min(log_.audited, commit_len)
        if hop == 0:
            self.filled = commit_len + (1 if tree else t)
            self.low_water = min(self.low_water, commit_len)
            self._computed_at[commit_len:commit_len + t] = self.round

    def keep_last(self, path: list[int]) -> None:
        """At the end of a generation: the accepted path of the last block joins the audited sequence."""
        if not self.logs:
            return
        if path != list(range(len(path))):
            for h in self.logs:
                h.keep(path)
        self.filled = max(self.filled, self.logs[0].block_start + len(path))

    @property
    def audited(self) -> int:
        return min((h.audited for h in self.logs), default=0)

    async def audit(self) -> Verdict:
        """Audit every hop's positions since its last audit, hops in parallel."""
        upto, self.low_water = self.filled, self.filled
        snapshot = [(h, h.audited, h.inputs[:, :upto].clone(), h.outputs[:, :upto].clone()) for h in self.logs]
        verdicts = await asyncio.gather(*(self._audit_hop(h, v, upto, i, o) for h, v, i, o in snapshot))
        verdict = Verdict()
        for v in verdicts:
            verdict.convicted.update(v.convicted)
            verdict.excluded.update(v.excluded)
            if v.rollback_to is not None:
                verdict.rollback_to = min(v.rollback_to, verdict.rollback_to or v.rollback_to)
        if verdict.rollback_to is not None:
            self.stats.rounds_to_detection.append(self.round - int(self._computed_at[verdict.rollback_to]))
        return verdict

    async def _audit_hop(self, h: HopLog, start: int, upto: int, inputs: torch.Tensor, outputs: torch.Tensor) -> Verdict:
        if start >= upto:
            return Verdict()
        tried = 0
        for rec in self._like(h):
            if tried == AUDITOR_TRIES:
                break
            tried += 1
            try:
                got = await self._recompute(h, rec, start, upto, inputs)
            except UnlikeAuditor:
                tried -= 1
                await self._drop_shadow(h)
                continue
            except AuditUnavailable as e:
                log.info("audit of %s (layers %d:%d) could not run on %s: %s", h.peer_id, h.start, h.end,
                         rec.peer_id, e)
                self.standing.failed(rec.peer_id, "failed an audit session")
                await self._drop_shadow(h)
                continue
            self.stats.audits += 1
            self.stats.positions += upto - start
            bad = first_mismatch(got, outputs[:, start:upto], self._tolerance(h))
            if bad is None:
                h.audited = min(upto, self.low_water)  # a rollback meanwhile drops positions past it
                return Verdict()
            self.stats.mismatches += 1
            return await self._dispute(h, rec, start, upto, start + bad, inputs, outputs, got)
        if (h.start, h.end) not in self._warned:
            self._warned.add((h.start, h.end))
            log.info("layers %d:%d cannot be audited: no other server %s; their results are used unchecked",
                        h.start, h.end, "answered" if tried else "serves them")
        self.stats.unaudited += upto - start
        h.audited = min(upto, self.low_water)
        return Verdict()

    async def _recompute(self, h: HopLog, rec: SpanRecord, start: int, upto: int, inputs: torch.Tensor) -> torch.Tensor:
        """The auditor's outputs of positions [start, upto) (its shadow session caught up first)."""
        if h.shadow is None or h.shadow.record.peer_id != rec.peer_id:
            await self._drop_shadow(h)
            h.shadow = await self._open_shadow(h, rec)
        begin = min(h.shadow.length, start)  # a new shadow session catches up from position 0
        out = await h.shadow.run(inputs[:, begin:upto], begin, self.max_block)
        return out[:, start - begin:]

    async def _open_shadow(self, h: HopLog, rec: SpanRecord) -> ShadowSession:
        """A shadow session on `rec` for the hop's layers; UnlikeAuditor if it computes in another dtype."""
        limits = WireLimits(hidden_size=self.hidden_size, max_block=self.max_block, max_length=self.max_length)
        shadow = await ShadowSession.open(self.node, rec, self.model, self.weights, h.start, h.end, self.max_length, self.dtype,
                                          limits)
        if shadow.compute_dtype != h.compute_dtype:
            await shadow.close()
            self._unlike.add((rec.peer_id, h.compute_dtype))
            raise UnlikeAuditor(f"{rec.peer_id} computes in {shadow.compute_dtype}, {h.peer_id} in {h.compute_dtype}")
        return shadow

    def _like(self, h: HopLog) -> list[SpanRecord]:
        """The hop's auditor candidates, less those known to compute in another dtype."""
        return [r for r in self.auditors(h) if (r.peer_id, h.compute_dtype) not in self._unlike]

    def _tolerance(self, h: HopLog) -> float:
        return tolerance(h.compute_dtype, self.dtype)

    async def _dispute(self, h: HopLog, auditor: SpanRecord, start: int, upto: int, bad: int,
                       inputs: torch.Tensor, outputs: torch.Tensor, audit_out: torch.Tensor) -> Verdict:
        """The hop and its auditor disagree from position `bad`: a third server decides."""
        rel = float(relative_diff(audit_out[:, bad - start:bad - start + 1], outputs[:, bad:bad + 1])[0])
        log.warning("audit: %s (layers %d:%d, %s) and auditor %s disagree from position %d (relative difference "
                    "%.3g, tolerance %.3g); asking a third server", h.peer_id, h.start, h.end, h.compute_dtype,
                    auditor.peer_id, bad, rel, self._tolerance(h))
        await self._drop_shadow(h)
        third_out = None
        for rec in self._like(h):
            if rec.peer_id == auditor.peer_id:
                continue
            try:
                shadow = await self._open_shadow(h, rec)
                try:
                    third_out = (await shadow.run(inputs[:, :upto], 0, self.max_block))[:, start:]
                finally:
                    await shadow.close()
                third = rec
                break
            except UnlikeAuditor:
                continue
            except AuditUnavailable as e:
                log.info("third opinion from %s failed: %s", rec.peer_id, e)
                self.standing.failed(rec.peer_id, "failed an audit session")
        where = f"layers {h.start}:{h.end} of {self.model}"
        if third_out is not None:
            with_auditor = first_mismatch(third_out, audit_out, self._tolerance(h)) is None
            with_hop = first_mismatch(third_out, outputs[:, start:upto], self._tolerance(h)) is None
            if with_auditor and not with_hop:
                return self._convict(h.record, (h.start, h.end), bad,
                                     f"wrong outputs for {where} from position {bad} (auditors {auditor.peer_id} "
                                     f"and {third.peer_id} agree with each other)")
            if with_hop and not with_auditor:  # the auditor lied; the hop's work stands
                self._convict(auditor, (h.start, h.end), None,
                              f"wrong outputs auditing {where} (the audited {h.peer_id} and {third.peer_id} agree)")
                h.audited = min(upto, self.low_water)
                return Verdict(convicted={auditor.peer_id: "wrong_results"})
        # no third opinion, or it agrees with neither: trust neither for this session
        log.warning("audit of %s (%s) unresolved: excluding it for this session", h.peer_id, where)
        self.standing.failed(h.peer_id, "audit unresolved")
        return Verdict(bad, excluded={h.peer_id: "disputed_results"})

    def _convict(self, rec: SpanRecord, layers: tuple[int, int], bad: int | None, reason: str) -> Verdict:
        self.bans.add(rec.peer_id, self.model, layers, reason)
        self.standing.failed(rec.peer_id, reason)
        return Verdict(bad, convicted={rec.peer_id: "wrong_results"})

    async def _drop_shadow(self, h: HopLog) -> None:
        if h.shadow is not None:
            shadow, h.shadow = h.shadow, None
            await shadow.close()

    async def close(self) -> None:
        await asyncio.gather(*(self._drop_shadow(h) for h in self.logs))


def prefer_other_groups(records: list[SpanRecord], audited: SpanRecord, standing: Standing) -> list[SpanRecord]:
    """Auditors from another network group than the audited server first (two peer ids of one operator
    would vouch for each other), then by standing."""
    group = record_group(audited)
    return sorted(records, key=lambda r: (record_group(r) == group, standing.penalty(r.peer_id), r.peer_id))


def audit_every(rate: float) -> int:
    """Rounds between audits for an audit rate (0: never)."""
    return math.ceil(1 / rate) if rate > 0 else 0
