"""Audits: other servers recompute a hop's work, so a server that returns wrong activations is caught.

Every hop sends the client a copy of the output it pushed on, and stamps a digest of the input it
received (server/daemon.py); the client checks each round that hop i's input digest matches hop
i-1's copy (or the block the client sent), so a hop cannot send the client one thing and push
another. The client keeps, per hop of the current route, the hop's input and output at every
position. An audit of a hop recomputes the positions since its last audit on a panel: one other
server that serves the hop's layers, or, when no single server does, several servers that serve
them piecewise (the client chains their shadow sessions). Outputs are compared position by position
within a tolerance measured per dtype. The audited hop sees nothing: every block it serves is
treated the same, audited or not.

Independence (one operator may run many peer ids, client/standing.py): a panel is drawn at random
among the eligible servers (not excluded, not banned, not of a banned network group, not flagged for
announcing addresses it was not reached at) whose observed network group differs from the audited
hop's. A disagreement asks a second panel drawn from yet other groups:
  - both panels agree with each other against the hop: the hop is convicted (banned, client/bans.py,
    keyed by peer id and observed group) -- but only if every server of both panels has a measured
    history with this client (it served this client's own sessions); otherwise the hop is only
    excluded for this chain;
  - the second panel agrees with the hop, and either has a history: the first panel's servers are
    the liars (a one-server panel is convicted if both have a history, else excluded for the chain);
  - otherwise (no second panel, it agrees with neither, or a party has no history) nothing is
    settled: the hop is excluded for this chain, and so is every server of either panel without a
    history (two fresh Sybil ids cannot take turns framing honest servers and then serve the span
    themselves, nor vouch for each other), the generation rolls back to the first disputed position,
    and the new route is audited after its first round. A hop no panel can
cover cannot be audited: its layers are reported (`unaudited_layers`), and a chain that must be
audited refuses (client/swarm_chain.py)."""

from __future__ import annotations

import asyncio
import logging
import math
import random
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
from .standing import Standing
from ..errors import PeerError

log = logging.getLogger(__name__)

# Largest honest difference times a margin (docs/ARCHITECTURE.md, "Trust"): the per-position relative
# L2 difference between a span run block by block (with rollbacks) and the same positions as one
# catch-up block, measured at most 1.1e-5 in float32 and 3.2e-2 in bfloat16. float16 was not measured:
# it gets bfloat16's. Servers that compute in different dtypes differ far more (up to 0.55 measured,
# float32 vs bfloat16 on SmolLM2 0:15), so only servers that compute alike are compared.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


# The mean of those differences over the positions one audit compares (at least WINDOW_MIN of them):
# rounding differences average out, a steady perturbation does not. bfloat16, SmolLM2 on code text
# (scripts/audit_tolerance.py, BENCHMARKS.md "Audit tolerance"): the largest honest mean over 30
# positions 1.7e-2, so 0.04 leaves a margin of 2.4x and catches a 5 % perturbation, which the
# per-position bound of 0.1 lets through. float32 needs none (its per-position bound catches 1 %).
WINDOW_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.04, "float16": 0.04}
WINDOW_MIN = 8


def tolerance(compute_dtype: str, wire_dtype: str) -> tuple[float, float]:
    """(per position, window mean): outputs computed in one dtype and sent in another differ by the
    coarser one's tolerances."""
    return (max(TOLERANCE[compute_dtype], TOLERANCE[wire_dtype]),
            max(WINDOW_TOLERANCE[compute_dtype], WINDOW_TOLERANCE[wire_dtype]))
AUDIT_TIMEOUT_S = 20.0  # one shadow-session exchange (open, or a catch-up block)
AUDITOR_TRIES = 2  # auditors tried for one hop before the hop counts as unauditable this time


class AuditUnavailable(PeerError, RuntimeError):
    """The auditor could not do the work (refused, unreachable, slow, unusable reply)."""

    def __init__(self, message: str, peer: str = ""):
        super().__init__(message)
        self.peer = peer


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


def disagreement(got: torch.Tensor, want: torch.Tensor, tolerances: tuple[float, float]) -> int | None:
    """Where two recomputations of the same positions disagree: the first position beyond the
    per-position tolerance, else 0 when the mean difference over the window (WINDOW_MIN positions or
    more) exceeds the window tolerance; None: they agree."""
    bad = first_mismatch(got, want, tolerances[0])
    if bad is None and got.shape[1] >= WINDOW_MIN and not float(relative_diff(got, want).mean()) <= tolerances[1]:
        return 0
    return bad


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
            raise AuditUnavailable(f"cannot reach auditor {record.peer_id}: {e!r}", record.peer_id) from None
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
                                       f"shape {list(got.hidden.shape)}", self.record.peer_id)
            outs.append(got.hidden.to_torch())
        self.length = commit_len + hidden.shape[1]
        return torch.cat(outs, dim=1)

    async def _ask(self, msg, want: type):
        try:
            await self.stream.send(encode(msg))
            reply = decode(await self.stream.recv(timeout=AUDIT_TIMEOUT_S), self.limits)
        except Exception as e:
            raise AuditUnavailable(f"auditor {self.record.peer_id}: {e!r}", self.record.peer_id) from None
        if isinstance(reply, ErrorReply) or not isinstance(reply, want):
            what = f"{reply.code}: {reply.message}" if isinstance(reply, ErrorReply) else type(reply).__name__
            raise AuditUnavailable(f"auditor {self.record.peer_id} answered {what}", self.record.peer_id)
        return reply

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.stream.send(encode(CloseSession(self.session_id))), 2.0)
        except Exception:
            pass
        await close_quietly(self.stream)


@dataclass(frozen=True)
class Piece:
    """One server of an audit panel, the layers it recomputes, and its observed network group."""

    record: SpanRecord
    group: str
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


Panel = tuple[Piece, ...]


def panel_key(panel: Panel) -> tuple[tuple[str, int, int], ...]:
    return tuple((p.peer_id, p.start, p.end) for p in panel)


def draw_panel(eligible: list[tuple[SpanRecord, str]], start: int, end: int, avoid: set[str],
               rng: random.Random) -> Panel | None:
    """A random panel that recomputes layers [start, end) from servers (record, observed group) whose
    groups are not in `avoid`: from each layer boundary, one of the servers that reach farthest, at
    random (so a server that covers the whole range is always preferred to pieces). None: no panel
    covers the range."""
    pool = [(r, g) for r, g in eligible if g not in avoid and r.start < end and r.end > start]
    rng.shuffle(pool)
    pieces, p = [], start
    while p < end:
        here = [(r, g) for r, g in pool if r.start <= p < r.end]
        if not here:
            return None
        r, g = max(here, key=lambda rg: min(rg[0].end, end))  # the first of equal reach: a random one
        pieces.append(Piece(r, g, p, min(r.end, end)))
        p = pieces[-1].end
    return tuple(pieces)


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
    panel: Panel = ()  # who audited this hop last (its shadow sessions are reused if drawn again)
    shadows: list[ShadowSession] = field(default_factory=list)  # one per piece of the panel
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
    piecewise: int = 0  # audits whose panel had more than one server
    rounds_to_detection: list[int] = field(default_factory=list)  # rounds since the wrong position was computed


MAX_DRAWS = 8  # panels drawn for one audit, those that compute in another dtype included


class Auditor:
    """The audit state of one chain: per-hop logs of the current route and the audits of them.

    `eligible(log)` gives the servers (record, observed group) that may sit on a panel auditing a hop:
    serving some of its layers, of another group than the hop's, not excluded, banned or flagged.
    `group_of(peer)` is a peer's observed group (what a ban is keyed by, besides its id)."""

    def __init__(self, node: P2PNode, model: str, weights: str, dtype: str, hidden_size: int, max_block: int,
                 eligible: Callable[[HopLog], list[tuple[SpanRecord, str]]], group_of: Callable[[str], str],
                 standing: Standing, bans: BanList, rng: random.Random | None = None):
        self.node, self.model, self.weights, self.dtype, self.max_block = node, model, weights, dtype, max_block
        self.hidden_size = hidden_size
        self.eligible, self.group_of, self.standing, self.bans = eligible, group_of, standing, bans
        self.rng = rng or random.SystemRandom()  # an attacker must not predict who audits
        self.logs: list[HopLog] = []
        self.max_length = 0
        self.filled = 0  # positions [0, filled) have been computed on this route
        self.low_water = 0  # least commit_len since the running audit took its snapshot
        self.stats = AuditStats()
        self.unaudited_layers: set[tuple[int, int]] = set()  # hop layer ranges released without any audit
        self.round = 0
        self._computed_at: torch.Tensor | None = None  # round in which each position was last computed
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

    def note_unauditable(self) -> bool:
        """Note the hops of a new route that no panel could audit (as far as eligibility tells before
        asking) in unaudited_layers; whether any hop can be audited."""
        able = [self._draw(h, set()) is not None for h in self.logs]
        for h, ok in zip(self.logs, able):
            if not ok and (h.start, h.end) not in self.unaudited_layers:
                self.unaudited_layers.add((h.start, h.end))
                log.info("layers %d:%d cannot be audited: no server of another network group serves them; "
                         "their results are used unchecked", h.start, h.end)
        return any(able)

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
        failed = 0
        for _ in range(MAX_DRAWS):
            panel = self._draw(h, set())  # anew for every audit: no one can tell when it will audit
            if panel is None or failed == AUDITOR_TRIES:
                break
            try:
                got = await self._recompute(h, panel, start, upto, inputs)
            except AuditUnavailable as e:
                await self._drop_shadows(h)
                if not isinstance(e, UnlikeAuditor):
                    failed += 1
                    log.info("audit of %s (layers %d:%d) could not run: %s", h.peer_id, h.start, h.end, e)
                    self.standing.failed(e.peer, "failed an audit session")
                continue
            self.stats.audits += 1
            self.stats.piecewise += len(panel) > 1
            self.stats.positions += upto - start
            bad = disagreement(got, outputs[:, start:upto], self._tolerance(h))
            if bad is None:
                h.audited = min(upto, self.low_water)  # a rollback meanwhile drops positions past it
                return Verdict()
            self.stats.mismatches += 1
            return await self._dispute(h, panel, start, upto, start + bad, inputs, outputs, got)
        if (h.start, h.end) not in self.unaudited_layers:
            self.unaudited_layers.add((h.start, h.end))
            log.info("layers %d:%d cannot be audited: no independent server %s; their results are used unchecked",
                     h.start, h.end, "answered" if failed else "serves them")
        self.stats.unaudited += upto - start
        h.audited = min(upto, self.low_water)
        return Verdict()

    def _draw(self, h: HopLog, avoid: set[str]) -> Panel | None:
        """A random panel for the hop from servers of groups not in `avoid` (nor the hop's), less those
        known to compute in another dtype than the hop."""
        eligible = [(r, g) for r, g in self.eligible(h) if (r.peer_id, h.compute_dtype) not in self._unlike]
        return draw_panel(eligible, h.start, h.end, avoid, self.rng)

    async def _recompute(self, h: HopLog, panel: Panel, start: int, upto: int, inputs: torch.Tensor) -> torch.Tensor:
        """The panel's outputs of positions [start, upto) (its shadow sessions caught up first)."""
        if panel_key(h.panel) != panel_key(panel) or not h.shadows:
            await self._drop_shadows(h)
            h.shadows = await self._open_panel(h, panel)
            h.panel = panel
        begin = min(h.shadows[0].length, start)  # new shadow sessions catch up from position 0
        out = await self._run(h.shadows, inputs[:, begin:upto], begin)
        return out[:, start - begin:]

    async def _run(self, shadows: list[ShadowSession], hidden: torch.Tensor, commit_len: int) -> torch.Tensor:
        for shadow in shadows:  # piece by piece: each piece's output is the next one's input
            hidden = await shadow.run(hidden, commit_len, self.max_block)
        return hidden

    async def _open_panel(self, h: HopLog, panel: Panel) -> list[ShadowSession]:
        shadows: list[ShadowSession] = []
        try:
            for piece in panel:
                shadows.append(await self._open_shadow(h, piece))
        except BaseException:
            await asyncio.gather(*(s.close() for s in shadows))
            raise
        return shadows

    async def _open_shadow(self, h: HopLog, piece: Piece) -> ShadowSession:
        """A shadow session on `piece`'s server for its layers; UnlikeAuditor if it computes in another dtype."""
        limits = WireLimits(hidden_size=self.hidden_size, max_block=self.max_block, max_length=self.max_length)
        shadow = await ShadowSession.open(self.node, piece.record, self.model, self.weights, piece.start, piece.end,
                                          self.max_length, self.dtype, limits)
        if shadow.compute_dtype != h.compute_dtype:
            await shadow.close()
            self._unlike.add((piece.peer_id, h.compute_dtype))
            raise UnlikeAuditor(f"{piece.peer_id} computes in {shadow.compute_dtype}, {h.peer_id} in {h.compute_dtype}",
                                piece.peer_id)
        return shadow

    def _tolerance(self, h: HopLog) -> tuple[float, float]:
        return tolerance(h.compute_dtype, self.dtype)

    def _vouched(self, peers: list[str]) -> bool:
        """Every one of `peers` has served this client's own sessions (may take part in a conviction)."""
        return all(self.standing.has_history(p) for p in peers)

    async def _second_opinion(self, h: HopLog, first: Panel, upto: int,
                              inputs: torch.Tensor) -> tuple[Panel, torch.Tensor] | None:
        """Outputs [0, upto) of a second random panel, from groups that are neither the hop's nor the
        first panel's (None: no such panel answered)."""
        avoid = {p.group for p in first}
        for _ in range(AUDITOR_TRIES):
            panel = self._draw(h, avoid)
            if panel is None:
                return None
            try:
                shadows = await self._open_panel(h, panel)
            except AuditUnavailable as e:
                log.info("second opinion from %s failed: %s", [p.peer_id for p in panel], e)
                avoid |= {p.group for p in panel}
                continue
            try:
                return panel, await self._run(shadows, inputs[:, :upto], 0)
            except AuditUnavailable as e:
                log.info("second opinion from %s failed: %s", [p.peer_id for p in panel], e)
                self.standing.failed(e.peer, "failed an audit session")
                avoid |= {p.group for p in panel}
            finally:
                await asyncio.gather(*(s.close() for s in shadows))
        return None

    async def _dispute(self, h: HopLog, first: Panel, start: int, upto: int, bad: int,
                       inputs: torch.Tensor, outputs: torch.Tensor, first_out: torch.Tensor) -> Verdict:
        """The hop and a first panel disagree from position `bad`: a second, independent panel decides
        (see the module's docstring for the rules)."""
        tol = self._tolerance(h)
        rel = float(relative_diff(first_out[:, bad - start:], outputs[:, bad:upto]).mean())
        names = [p.peer_id for p in first]
        log.warning("audit: %s (layers %d:%d, %s) and auditor(s) %s disagree from position %d (relative difference "
                    "%.3g from there on average, tolerances %s); asking a second, independent panel", h.peer_id, h.start, h.end,
                    h.compute_dtype, names, bad, rel, tol)
        await self._drop_shadows(h)
        where = f"layers {h.start}:{h.end} of {self.model}"
        panelists = list(names)
        second = await self._second_opinion(h, first, upto, inputs)
        if second is not None:
            panel, second_out = second[0], second[1][:, start:]
            others = [p.peer_id for p in panel]
            panelists += others
            with_first = disagreement(second_out, first_out, tol) is None
            with_hop = disagreement(second_out, outputs[:, start:upto], tol) is None
            if with_first and not with_hop and self._vouched(panelists):
                return self._convict(h.peer_id, (h.start, h.end), bad,
                                     f"wrong outputs for {where} from position {bad} (independent auditors "
                                     f"{names} and {others} agree with each other)")
            if with_hop and not with_first and (self._vouched(others) or self._vouched([h.peer_id])):
                # the first panel lied: the hop's work stands (two agree, one of them known to this client)
                h.audited = min(upto, self.low_water)
                if len(first) == 1 and self._vouched([h.peer_id, *others]):
                    return self._convict(names[0], (h.start, h.end), None,
                                         f"wrong outputs auditing {where} (the audited {h.peer_id} and {others} agree)")
                log.warning("audit of %s: auditor(s) %s disagree with it and with %s; excluding them for this session",
                            h.peer_id, names, others)
                return Verdict(excluded={p: "disputed_results" for p in names})
        # not settled (one disagreement, no second panel, or parties without a history): no conviction;
        # the hop and every party without a history are avoided, and the new route is audited again
        excluded = {h.peer_id: "disputed_results"}
        excluded.update({p: "disputed without a history" for p in panelists if not self.standing.has_history(p)})
        log.warning("audit of %s (%s) not settled: excluding %s for this session", h.peer_id, where, sorted(excluded))
        return Verdict(bad, excluded=excluded)

    def _convict(self, peer: str, layers: tuple[int, int], bad: int | None, reason: str) -> Verdict:
        self.bans.add(peer, self.model, layers, reason, group=self.group_of(peer))
        self.standing.failed(peer, reason)
        return Verdict(bad, convicted={peer: "wrong_results"})

    async def _drop_shadows(self, h: HopLog) -> None:
        shadows, h.shadows, h.panel = h.shadows, [], ()
        await asyncio.gather(*(s.close() for s in shadows))

    async def close(self) -> None:
        await asyncio.gather(*(self._drop_shadows(h) for h in self.logs))


def audit_every(rate: float) -> int:
    """Rounds between audits for an audit rate (0: never)."""
    return math.ceil(1 / rate) if rate > 0 else 0
