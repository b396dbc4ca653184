"""Audits: other servers recompute a hop's work, so a server that returns wrong activations is caught.

Every hop sends the client a copy of the output it pushed on, and stamps a digest of the input it
received (server/daemon.py); the client checks each round that hop i's input digest matches hop
i-1's copy (or the block the client sent), so a hop cannot send the client one thing and push
another. The client keeps, per hop of the current route, every block the hop was sent (step id,
commit_len, inputs, token tree, kept path) and the outputs it returned. Audits compare those
outputs, row by row within a tolerance measured per dtype, with a shadow route's
(client/shadow.py): every hop mirrored by a panel -- one other server that serves the hop's layers,
or several that serve them piecewise -- and the panels chained by pushes like a real route, fed the
route's blocks as they come, one per round, so that an auditor cannot tell its session from a real
one. A mirror's inputs are the mirrors' before it, not the hop's, so a disagreement at one hop voids
the comparisons after it (from where it began); those hops, and every hop of a route that could not
be mirrored, are audited by a panel of their own fed the hop's inputs back to back (a shadow
session). The audited hop sees nothing: every block it serves is treated the same, audited or not.

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
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..net.records import SpanRecord
from ..net.p2p import P2PNode
from ..net.wire import INT8_BLOCKS, WireLimits
from .bans import BanList
from .shadow import AuditorBusy, AuditUnavailable, HopBlock, Mirror, Piece, ShadowRoute, ShadowSession, UnlikeAuditor
from .standing import Standing

log = logging.getLogger(__name__)

# Largest honest difference times a margin (docs/ARCHITECTURE.md, "Trust"): the per-position relative
# L2 difference between a span run block by block (with rollbacks) and the same positions as one
# catch-up block (what audits sent before they replayed the hop's own blocks, so a bound on more than a
# replay differs by), measured at most 1.1e-5 in float32 and 3.2e-2 in bfloat16. float16 was not measured:
# it gets bfloat16's. Servers that compute in different dtypes differ far more (up to 0.55 measured,
# float32 vs bfloat16 on SmolLM2 0:15), so only servers that compute alike are compared.
# Hops of an int8 wire session (net/wire.py) send outputs rounded to int8 blocks; shadow sessions and
# routes are opened with the same wire, so they round at the same links and differ from an honest hop
# only where a value rounds the other way: bfloat16's bounds (the rounding changes a position by
# 1.2-1.9 % on real hidden states, BENCHMARKS.md "int8 wire").
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1, INT8_BLOCKS: 0.1}


# The mean of those differences over the positions one audit compares (at least WINDOW_MIN of them):
# rounding differences average out, a steady perturbation does not. bfloat16, SmolLM2 on code text
# (scripts/audit_tolerance.py, BENCHMARKS.md "Audit tolerance"): the largest honest mean over 30
# positions 1.7e-2, so 0.04 leaves a margin of 2.4x and catches a 5 % perturbation, which the
# per-position bound of 0.1 lets through. float32 needs none (its per-position bound catches 1 %).
WINDOW_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.04, "float16": 0.04, INT8_BLOCKS: 0.04}
WINDOW_MIN = 8


def tolerance(compute_dtype: str, wire_dtype: str) -> tuple[float, float]:
    """(per position, window mean): outputs computed in one dtype and sent in another differ by the
    coarser one's tolerances."""
    return (max(TOLERANCE[compute_dtype], TOLERANCE[wire_dtype]),
            max(WINDOW_TOLERANCE[compute_dtype], WINDOW_TOLERANCE[wire_dtype]))


AUDITOR_TRIES = 2  # auditors tried for one hop before the hop counts as unauditable this time


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
    """Every block one hop of the route was sent and returned, and how far it is audited."""

    record: SpanRecord
    start: int
    end: int
    compute_dtype: str
    blocks: list[HopBlock] = field(default_factory=list)
    checked: int = 0  # blocks [0, checked) agree with an auditor (or had none)
    audited: int = 0  # positions [0, audited) of this hop agree with an auditor (or had none)
    panel: Panel = ()  # who audited this hop last (its shadow sessions are reused if drawn again)
    shadows: list[ShadowSession] = field(default_factory=list)  # one per piece of the panel
    node: P2PNode | None = None  # the identity the shadow sessions of `panel` come from

    @property
    def peer_id(self) -> str:
        return self.record.peer_id

    def outputs(self, first: int, last: int) -> torch.Tensor:
        """The hop's outputs of blocks [first, last), row after row."""
        return torch.cat([b.outputs for b in self.blocks[first:last]], dim=1)

    def block_of(self, first: int, row: int) -> int:
        """The index of the block that holds `row` of the rows of blocks first.."""
        for i, block in enumerate(self.blocks[first:], first):
            if row < block.inputs.shape[1]:
                return i
            row -= block.inputs.shape[1]
        raise IndexError(row)

    def rollback_position(self, first: int, row: int) -> int:
        """The position to roll back to for a wrong output in `row` of the rows of blocks first.."""
        i = self.block_of(first, row)
        return self.blocks[i].first_position(row - sum(b.inputs.shape[1] for b in self.blocks[first:i]))


@dataclass
class Verdict:
    """rollback_to: the first position whose output was wrong (None: nothing to roll back)."""

    rollback_to: int | None = None
    convicted: dict[str, str] = field(default_factory=dict)  # peer id -> why, banned
    excluded: dict[str, str] = field(default_factory=dict)  # peer id -> why, for this session only


@dataclass
class AuditStats:
    audits: int = 0  # hop audits run
    positions: int = 0  # rows of hop blocks checked against an auditor (rolled-back drafts included)
    unaudited: int = 0  # rows of hop blocks released without an auditor
    mismatches: int = 0
    piecewise: int = 0  # audits whose panel had more than one server
    routed: int = 0  # audits compared from a shadow route (the others: a shadow session fed back to back)
    rounds_to_detection: list[int] = field(default_factory=list)  # rounds since the wrong position was computed


MAX_DRAWS = 8  # panels drawn for one audit, those that compute in another dtype included


class Auditor:
    """The audit state of one chain: per-hop logs of the current route and the audits of them.

    `eligible(log)` gives the servers (record, observed group) that may sit on a panel auditing a hop:
    serving some of its layers, of another group than the hop's, not excluded, banned or flagged.
    `group_of(peer)` is a peer's observed group (what a ban is keyed by, besides its id)."""

    def __init__(self, node: P2PNode, model: str, weights: str, dtype: str, hidden_size: int, max_block: int,
                 eligible: Callable[[HopLog], list[tuple[SpanRecord, str]]], group_of: Callable[[str], str],
                 standing: Standing, bans: BanList, rng: random.Random | None = None, wire: str | None = None):
        """dtype: the session's; wire: what the audited hops' outputs travel as (None: dtype; int8
        blocks: their rounding is tolerated like bfloat16's, TOLERANCE)."""
        self.node, self.model, self.weights, self.dtype, self.max_block = node, model, weights, dtype, max_block
        self.wire = wire or dtype
        self.wire_mode = "int8" if self.wire == INT8_BLOCKS else "exact"  # shadows open sessions of the same mode
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
        self.shadow: ShadowRoute | None = None  # the current route's shadow route, fed as blocks come
        self._opening: asyncio.Task | None = None  # the shadow route being opened alongside the route's first blocks
        self._grew = asyncio.Event()  # set when the route's first hop logs a block (what feeds the shadow route)

    async def new_route(self, hops: list[tuple[SpanRecord, int, int, str]], max_length: int) -> None:
        await self.close()
        self.max_length = max_length
        self.logs = [HopLog(rec, a, b, compute) for rec, a, b, compute in hops]
        self.filled = self.low_water = 0
        if self._computed_at is None or self._computed_at.numel() != max_length:
            self._computed_at = torch.zeros(max_length, dtype=torch.long)

    def prepare(self) -> None:
        """Open the new route's shadow route in the background: it is then fed the route's blocks from the
        first, each as the route computed it (a real session's pace), and is caught up at the first audit."""
        self._opening = asyncio.create_task(self._shadow_route())

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

    def record(self, hop: int, step: int, commit_len: int, inputs: torch.Tensor, outputs: torch.Tensor,
               kept: list[int] | None = None, mask: torch.Tensor | None = None,
               positions: list[int] | None = None, queued: bool = False) -> None:
        """Log a block a hop was sent (step, commit_len, inputs, the kept path of its previous block, a
        token tree's mask and positions) and the outputs it returned. A token tree's rows are not
        positions in sequence: only its first row (the token it grows from) is, until the next block
        (or finish) says which path was kept."""
        t = inputs.shape[1]
        log_ = self.logs[hop]
        log_.blocks.append(HopBlock(step, commit_len, inputs, outputs, mask, positions, kept, queued))
        log_.audited = min(log_.audited, commit_len)
        if hop == 0:
            self._grew.set()
            self.filled = commit_len + (1 if mask is not None else t)
            self.low_water = min(self.low_water, commit_len)
            self._computed_at[commit_len:commit_len + t] = self.round

    def keep_last(self, path: list[int]) -> None:
        """At the end of a generation: the accepted path of the last block joins the audited sequence
        (every row of the block is audited, so whichever path it is)."""
        if self.logs and self.logs[0].blocks:
            self.filled = max(self.filled, self.logs[0].blocks[-1].commit_len + len(path))

    @property
    def audited(self) -> int:
        return min((h.audited for h in self.logs), default=0)

    async def audit(self) -> Verdict:
        """Audit every hop's blocks since its last audit: from the shadow route, and, for the hops it
        does not settle, from a shadow session of a panel of its own, hops in parallel."""
        upto, self.low_water = self.filled, self.filled
        snapshot = [(h, h.checked, len(h.blocks)) for h in self.logs]
        routed = await self._audit_route(snapshot, upto)
        rest = [(i, self._audit_hop(h, first, last, upto)) for i, (h, first, last) in enumerate(snapshot)
                if routed[i] is None]
        for (i, _), v in zip(rest, await asyncio.gather(*(c for _, c in rest))):
            routed[i] = v
        verdict = Verdict()
        for v in routed:
            verdict.convicted.update(v.convicted)
            verdict.excluded.update(v.excluded)
            if v.rollback_to is not None:
                verdict.rollback_to = min(v.rollback_to, verdict.rollback_to or v.rollback_to)
        if verdict.rollback_to is not None:
            self.stats.rounds_to_detection.append(self.round - int(self._computed_at[verdict.rollback_to]))
        return verdict

    async def _audit_route(self, snapshot: list[tuple[HopLog, int, int]], upto: int) -> list[Verdict | None]:
        """Each hop's blocks [first, last) against its mirror in the shadow route, hops in route order.
        A mirror's inputs are the outputs of the mirrors before it, so a disagreement at a hop voids the
        comparisons of the hops after it from the block where it began (None: not settled here, audited
        by a panel of its own), and the shadow route is dropped (a new one is drawn at the next audit)."""
        verdicts: list[Verdict | None] = [None] * len(snapshot)
        last = snapshot[0][2] if snapshot else 0
        if self._opening is not None:  # the shadow route opened with the route (its outcome is self.shadow)
            opening, self._opening = self._opening, None
            await asyncio.gather(opening, return_exceptions=True)
        route = await self._shadow_route() if last else None
        if route is None:
            return verdicts
        try:
            outs = await route.outputs(last)
        except AuditUnavailable as e:
            log.info("the shadow route %s failed: %s", [p.peer_id for p in route.pieces], e)
            self._auditor_failed(e)  # (a stall between two pieces names no one: no one is marked)
            await self._drop_route()
            return verdicts
        void = last  # blocks from here on are compared on inputs the hop was not sent
        for i, ((h, first, _), mirror) in enumerate(zip(snapshot, route.mirrors)):
            if first >= last:
                verdicts[i] = self._passed(h, last, upto)
                continue
            if void < last:
                continue
            got, rows = torch.cat(outs[i][first:last], dim=1), sum(b.inputs.shape[1] for b in h.blocks[first:last])
            bad = disagreement(got, h.outputs(first, last), self._tolerance(h))
            if bad is not None:
                void = h.block_of(first, bad)
            if not mirror.audits:  # the hop's own server carried the blocks on: no audit, but a check of the feed
                if bad is None:
                    verdicts[i] = self._unaudited(h, last, upto, rows, "serves them")
                else:
                    log.warning("audit: %s answered the same blocks of layers %d:%d two ways; excluding it for this "
                                "session", h.peer_id, h.start, h.end)
                    verdicts[i] = Verdict(h.rollback_position(first, bad), excluded={h.peer_id: "inconsistent results"})
                continue
            self.stats.audits += 1
            self.stats.routed += 1
            self.stats.piecewise += len(mirror.pieces) > 1
            self.stats.positions += rows
            if bad is None:
                verdicts[i] = self._passed(h, last, upto)
                continue
            self.stats.mismatches += 1
            verdicts[i] = await self._dispute(h, mirror.pieces, first, last, upto, bad, got)
        if void < last:
            await self._drop_route()
        return verdicts

    async def _shadow_route(self) -> ShadowRoute | None:
        """The route's shadow route, drawn and opened at random if there is none yet (None: no mirror of
        any hop would audit it, or none could be opened)."""
        if self.shadow is not None and self.shadow.failure is None:
            return self.shadow
        await self._drop_route()
        failed = 0
        for _ in range(MAX_DRAWS):
            mirrors = self._draw_route()
            if mirrors is None or failed == AUDITOR_TRIES:
                return None
            limits = WireLimits(hidden_size=self.hidden_size, max_block=self.max_block, max_length=self.max_length)
            try:
                route = await ShadowRoute.open(mirrors, self.model, self.weights, self.max_length, self.dtype, limits,
                                               self.node, self.wire_mode)
            except AuditUnavailable as e:
                failed += 1
                log.info("a shadow route could not open: %s", e)
                self._auditor_failed(e)
                continue
            unlike = {(p.peer_id, self.logs[i].compute_dtype)
                      for p, i, dtype in zip(route.pieces, route.mirror_of, route.compute_dtypes)
                      if mirrors[i].audits and dtype != self.logs[i].compute_dtype}
            if unlike:
                self._unlike |= unlike
                await route.close()
                continue
            self.shadow = route
            route.start(self.logs[0].blocks, self._grew)
            return route
        return None

    def _draw_route(self) -> list[Mirror] | None:
        """A mirror for every hop: a random panel (client/shadow.py), else the hop's own server as a
        feeder; no piece pushes to its own server (a real route never does). None: no mirror audits."""
        for _ in range(MAX_DRAWS):
            mirrors = []
            for h in self.logs:
                panel = self._draw(h, set())
                mirrors.append(Mirror(panel, True) if panel else
                               Mirror((Piece(h.record, self.group_of(h.peer_id), h.start, h.end),), False))
            if not any(m.audits for m in mirrors):
                return None
            pieces = [p for m in mirrors for p in m.pieces]
            if all(a.peer_id != b.peer_id for a, b in zip(pieces, pieces[1:])):
                return mirrors
        return None

    async def _drop_route(self) -> None:
        route, self.shadow = self.shadow, None
        if route is not None:
            await route.close()

    def _passed(self, h: HopLog, last: int, upto: int) -> Verdict:
        """Blocks [0, last) of the hop stand: so do positions [0, upto) (less what a rollback dropped)."""
        h.checked = max(h.checked, last)
        h.audited = min(upto, self.low_water)
        return Verdict()

    async def _audit_hop(self, h: HopLog, first: int, last: int, upto: int) -> Verdict:
        if first >= last:
            return self._passed(h, last, upto)
        rows = sum(b.inputs.shape[1] for b in h.blocks[first:last])
        failed = 0
        for _ in range(MAX_DRAWS):
            panel = self._draw(h, set())  # anew for every audit: no one can tell when it will audit
            if panel is None or failed == AUDITOR_TRIES:
                break
            try:
                got = await self._recompute(h, panel, first, last)
            except AuditUnavailable as e:
                await self._drop_shadows(h)
                if not isinstance(e, UnlikeAuditor):
                    failed += 1
                    log.info("audit of %s (layers %d:%d) could not run: %s", h.peer_id, h.start, h.end, e)
                    self._auditor_failed(e)
                continue
            self.stats.audits += 1
            self.stats.piecewise += len(panel) > 1
            self.stats.positions += rows
            bad = disagreement(got, h.outputs(first, last), self._tolerance(h))
            if bad is None:
                return self._passed(h, last, upto)
            self.stats.mismatches += 1
            return await self._dispute(h, panel, first, last, upto, bad, got)
        return self._unaudited(h, last, upto, rows, "answered" if failed else "serves them")

    def _unaudited(self, h: HopLog, last: int, upto: int, rows: int, why: str) -> Verdict:
        """Blocks [0, last) of the hop are released unchecked: no independent server `why`."""
        if (h.start, h.end) not in self.unaudited_layers:
            self.unaudited_layers.add((h.start, h.end))
            log.info("layers %d:%d cannot be audited: no independent server %s; their results are used unchecked",
                     h.start, h.end, why)
        self.stats.unaudited += rows
        return self._passed(h, last, upto)

    def _draw(self, h: HopLog, avoid: set[str]) -> Panel | None:
        """A random panel for the hop from servers of groups not in `avoid` (nor the hop's), less those
        known to compute in another dtype than the hop."""
        eligible = [(r, g) for r, g in self.eligible(h) if (r.peer_id, h.compute_dtype) not in self._unlike]
        return draw_panel(eligible, h.start, h.end, avoid, self.rng)

    async def _recompute(self, h: HopLog, panel: Panel, first: int, last: int) -> torch.Tensor:
        """The panel's outputs of blocks [first, last), row after row (its shadow sessions, if new, are
        sent every block of the route from the first)."""
        if panel_key(h.panel) != panel_key(panel) or not h.shadows:
            await self._drop_shadows(h)
            h.node, h.shadows = await self._open_panel(h, panel)
            h.panel = panel
        begin = h.shadows[0].replayed  # == first for the shadows of the last audit, 0 for new ones
        outs = await self._run(h.shadows, h.blocks[begin:last])
        return torch.cat(outs[first - begin:], dim=1)

    async def _run(self, shadows: list[ShadowSession], blocks: list[HopBlock]) -> list[torch.Tensor]:
        hiddens = [b.inputs for b in blocks]
        for shadow in shadows:  # piece by piece: each piece's outputs are the next one's inputs
            hiddens = await shadow.run(blocks, hiddens)
        return hiddens

    async def _open_panel(self, h: HopLog, panel: Panel) -> tuple[P2PNode, list[ShadowSession]]:
        """Shadow sessions on the panel's servers, from a fresh identity: no server can tell them from
        the sessions of a client it never saw (docs/ARCHITECTURE.md, "Shadow sessions")."""
        node = await P2PNode.start(client=True, latency=self.node.latency, max_frame_bytes=self.node.max_frame_bytes)
        shadows: list[ShadowSession] = []
        try:
            for piece in panel:
                shadows.append(await self._open_shadow(h, node, piece))
        except BaseException:
            await asyncio.gather(*(s.close() for s in shadows))
            await node.stop()
            raise
        return node, shadows

    async def _open_shadow(self, h: HopLog, node: P2PNode, piece: Piece) -> ShadowSession:
        """A shadow session on `piece`'s server for its layers; UnlikeAuditor if it computes in another dtype."""
        limits = WireLimits(hidden_size=self.hidden_size, max_block=self.max_block, max_length=self.max_length)
        shadow = await ShadowSession.open(node, piece.record, self.model, self.weights, piece.start, piece.end,
                                          self.max_length, self.dtype, limits, self.wire_mode)
        if shadow.compute_dtype != h.compute_dtype:
            await shadow.close()
            self._unlike.add((piece.peer_id, h.compute_dtype))
            raise UnlikeAuditor(f"{piece.peer_id} computes in {shadow.compute_dtype}, {h.peer_id} in {h.compute_dtype}",
                                piece.peer_id)
        return shadow

    def _tolerance(self, h: HopLog) -> tuple[float, float]:
        return tolerance(h.compute_dtype, self.wire)

    def _vouched(self, peers: list[str]) -> bool:
        """Every one of `peers` has served this client's own sessions (may take part in a conviction)."""
        return all(self.standing.has_history(p) for p in peers)

    async def _second_opinion(self, h: HopLog, first: Panel, last: int) -> tuple[Panel, torch.Tensor] | None:
        """Outputs of blocks [0, last), row after row, of a second random panel, from groups that are
        neither the hop's nor the first panel's (None: no such panel answered)."""
        avoid = {p.group for p in first}
        for _ in range(AUDITOR_TRIES):
            panel = self._draw(h, avoid)
            if panel is None:
                return None
            try:
                node, shadows = await self._open_panel(h, panel)
            except AuditUnavailable as e:
                log.info("second opinion from %s failed: %s", [p.peer_id for p in panel], e)
                avoid |= {p.group for p in panel}
                continue
            try:
                return panel, torch.cat(await self._run(shadows, h.blocks[:last]), dim=1)
            except AuditUnavailable as e:
                log.info("second opinion from %s failed: %s", [p.peer_id for p in panel], e)
                self._auditor_failed(e)
                avoid |= {p.group for p in panel}
            finally:
                await asyncio.gather(*(s.close() for s in shadows))
                await node.stop()
        return None

    async def _dispute(self, h: HopLog, first: Panel, begin: int, last: int, upto: int, bad_row: int,
                       first_out: torch.Tensor) -> Verdict:
        """The hop and a first panel disagree on blocks [begin, last) (positions up to `upto`) from row
        `bad_row` of them: a second, independent panel decides (see the module's docstring for the rules)."""
        tol = self._tolerance(h)
        outputs = h.outputs(begin, last)
        bad = h.rollback_position(begin, bad_row)
        rel = float(relative_diff(first_out[:, bad_row:], outputs[:, bad_row:]).mean())
        names = [p.peer_id for p in first]
        log.warning("audit: %s (layers %d:%d, %s) and auditor(s) %s disagree from position %d (relative difference "
                    "%.3g from there on average, tolerances %s); asking a second, independent panel", h.peer_id, h.start, h.end,
                    h.compute_dtype, names, bad, rel, tol)
        await self._drop_shadows(h)
        where = f"layers {h.start}:{h.end} of {self.model}"
        panelists = list(names)
        second = await self._second_opinion(h, first, last)
        if second is not None:
            panel, second_out = second[0], second[1][:, -outputs.shape[1]:]
            others = [p.peer_id for p in panel]
            panelists += others
            with_first = disagreement(second_out, first_out, tol) is None
            with_hop = disagreement(second_out, outputs, tol) is None
            if with_first and not with_hop and self._vouched(panelists):
                return self._convict(h.peer_id, (h.start, h.end), bad,
                                     f"wrong outputs for {where} from position {bad} (independent auditors "
                                     f"{names} and {others} agree with each other)")
            if with_hop and not with_first and (self._vouched(others) or self._vouched([h.peer_id])):
                # the first panel lied: the hop's work stands (two agree, one of them known to this client)
                self._passed(h, last, upto)
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

    def _auditor_failed(self, e: AuditUnavailable) -> None:
        """An auditor that failed its session is marked, unless it only said `busy` (a full server, or
        one that sends sessions to a less loaded replica, is not at fault) or nobody can be named."""
        if e.peer and not isinstance(e, AuditorBusy):
            self.standing.failed(e.peer, "failed an audit session")

    def _convict(self, peer: str, layers: tuple[int, int], bad: int | None, reason: str) -> Verdict:
        self.bans.add(peer, self.model, layers, reason, group=self.group_of(peer))
        self.standing.failed(peer, reason)
        return Verdict(bad, convicted={peer: "wrong_results"})

    async def _drop_shadows(self, h: HopLog) -> None:
        shadows, node, h.shadows, h.panel, h.node = h.shadows, h.node, [], (), None
        await asyncio.gather(*(s.close() for s in shadows))
        if node is not None:
            await node.stop()

    async def close(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
        await asyncio.gather(self._drop_route(), *(self._drop_shadows(h) for h in self.logs))


def audit_every(rate: float) -> int:
    """Rounds between audits for an audit rate (0: never)."""
    return math.ceil(1 / rate) if rate > 0 else 0
