"""Drafting ahead: the next round's tree, drafted while the chain computes this one.

While a block is in flight the client has nothing to do but wait for the servers. It spends the
wait drafting the next round's tree for the verification's likely outcomes, so that after the reply
the next block is often ready instead of costing a fresh draft on the critical path (on a CPU a
tree of 8 depths of a 0.5B draft is 0.5-0.9 s, most of a round's time at 50 ms links):

- full acceptance: the block's own tree grows on below its deepest nodes; whichever of them the text
  goes through, with the bonus token among their children, the part below is the next tree;
- rejections (speculative speculative decoding, SSD: Kumar, Dao and May, "Speculative Speculative
  Decoding", ICLR 2026, "Saguaro"): where the target rejects every child of a node v it gives a
  correction c that no child holds. The draft's own probabilities put P(path to v) * q(c | v) on
  that outcome, the same path score the tree's nodes are chosen by, so the likeliest outcomes are
  the best (node, token) pairs the tree left out (TreeGrowth.top keeps each node's best tokens).
  Each of the `rejections` likeliest grows a tree of its own (TreeGrowth.branch), batched into the
  same draft forwards as the main tree.

When the text goes on through a tree drafted ahead, the next round starts from it
(TreeGrowth.rerooted); otherwise nothing is lost but the draft's idle time. Drafting ahead only
chooses what is proposed: the target verifies every token, so it stays lossless. The same worker
drafts the first round's tree while the chain prefills the prompt (no guess there).

Branches are not free: they add rows to every draft forward in flight, so the main tree grows fewer
depths ahead before the reply, and after a full acceptance the missing depths are drafted on the
critical path (measured: with a draft that never missed, branches for 2 rejections cut a GSM8K run
from 2.47x to 1.52x, BENCHMARKS.md). So the worker drafts branches only where their expected gain is
positive (AheadGate, AheadOdds.choose): a hit saves the fresh draft of the depths the branch reached
in the block's flight time; a full acceptance loses the main tree's depths that the branches' rows
pushed out of the flight time. The odds come from measurement: the chance of a full acceptance from
the controller's acceptance, the share of rejections the branches catch from the draft's own
probabilities scaled by the hits measured so far, the flight time and the cost of a draft step by
its rows from the rounds before.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass

from .draft import TreeGrowth
from .controller import CostFit
from .lookup import LookupGrowth
from .tree import TokenTree


@dataclass(frozen=True)
class PredraftSettings:
    """rejections: at most this many rejection outcomes drafted ahead each round besides full
    acceptance (0: only full acceptance). gated: only as many as have a positive expected gain in
    that round (AheadGate), else always `rejections`. Off by default (0): in the gated swarm run
    (BENCHMARKS.md, "Gated drafting ahead") the gate cost nothing, but no branch was hit."""

    rejections: int = 0
    gated: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.rejections, int) and self.rejections >= 0):
            raise ValueError(f"rejections must be an int >= 0, got {self.rejections!r}")


@dataclass(frozen=True)
class Rejection:
    """An outcome of verification: the target goes down the tree to `node` (-1: the root), rejects
    its children and gives `token`; `score` is the draft's log probability of that."""

    node: int
    token: int
    score: float


def likely_rejections(growth: TreeGrowth, block: TokenTree, n: int) -> list[Rejection]:
    """The n likeliest rejections of `block` (the first nodes of growth.tree, then prompt-lookup
    nodes, which are not drafted and are not branched from) above its deepest depth (below it the
    main tree grows on), by the draft's path probability. A correction is never a token that a
    child of its node holds: the target would have accepted that child."""
    if n <= 0:
        return []
    kids, depths = block.child_lists(), block.depths()
    deepest = max((d for d, drafted in zip(depths, block.drafted) if drafted), default=0)
    nodes = [-1] + [i for i, (d, drafted) in enumerate(zip(depths, block.drafted)) if drafted and d < deepest]
    outcomes = []
    for node in nodes:
        held = {block.tokens[c] for c in kids.get(node, [])}
        base = growth.score(node)
        outcomes += [Rejection(node, token, base + logp) for logp, token in growth.top.get(node, [])
                     if token not in held]
    return sorted(outcomes, key=lambda r: -r.score)[:n]


def rejection_mass(growth: TreeGrowth, block: TokenTree) -> float:
    """The draft's probability that verification of `block` ends in a rejection above its deepest
    depth: over its drafted nodes v (and the root), P(path to v) * (1 - q(children of v | v)), the
    share of the draft's mass at v on tokens that no child holds. (A draft's probabilities, not the
    target's: AheadGate uses it only for how the rejections divide among the outcomes.)"""
    kids, depths = block.child_lists(), block.depths()
    deepest = max((d for d, drafted in zip(depths, block.drafted) if drafted), default=0)
    nodes = [-1] + [i for i, (d, drafted) in enumerate(zip(depths, block.drafted)) if drafted and d < deepest]
    mass = 0.0
    for node in nodes:
        held = {block.tokens[c] for c in kids.get(node, [])}
        q_held = sum(math.exp(logp) for logp, token in growth.top.get(node, []) if token in held)
        mass += math.exp(growth.score(node)) * max(0.0, 1.0 - q_held)
    return mass


@dataclass(frozen=True)
class AheadOdds:
    """What the gate knows when a block leaves, for the worker to choose how many rejections to draft
    ahead for (a snapshot: the worker thread reads it while the event loop updates the gate).

    full: chance the block is accepted whole (the controller's measured acceptance per depth, to
    the block's depth); flight_s: measured time from a block's send to its reply (None: not yet);
    step_s0 + step_row_s * rows: measured seconds of a draft forward over `rows` tree nodes;
    calibration: hits measured over hits the draft's shares predicted."""

    full: float
    flight_s: float | None
    step_s0: float
    step_row_s: float
    calibration: float

    def step_s(self, rows: int) -> float:
        return self.step_s0 + self.step_row_s * rows

    def gain_steps(self, share: float, width: int, n: int, main_steps: int, branch_depth: int) -> float:
        """Expected draft time saved on the critical path, in main-tree steps, by drafting `n`
        branches (of `width` rows a depth) besides the main tree (`main_steps` to go, `width` rows
        each), which catch `share` of the rejections by the draft's probabilities; <= 0: not worth
        it. A hit saves the depths the branch reached in the flight time; a full acceptance loses
        the main depths the branches pushed out of it; and a worker still busy when the reply comes
        delays the round by half a step on average (the step under way is finished)."""
        if n <= 0 or self.flight_s is None:
            return 0.0
        flight, s_main, s_mix = self.flight_s, self.step_s(width), self.step_s(width * (1 + n))
        if s_main <= 0:
            return 0.0
        main_alone = min(main_steps, flight / s_main)
        mixed = min(main_steps, branch_depth)  # steps that carry both, then the main tree's alone
        if flight <= mixed * s_mix:
            main_with = reached = flight / s_mix
        else:
            main_with, reached = mixed + min(main_steps - mixed, (flight - mixed * s_mix) / s_main), branch_depth
        busy_with = mixed * s_mix + (main_steps - mixed) * s_main > flight
        busy_alone = main_steps * s_main > flight
        tail = (busy_with * s_mix - busy_alone * s_main) / (2 * s_main)
        hit = (1.0 - self.full) * min(1.0, self.calibration * share)
        return hit * min(reached, branch_depth) - self.full * max(0.0, main_alone - main_with) - tail

    def choose(self, outcomes: list["Rejection"], mass: float, width: int, main_steps: int, branch_depth: int) -> int:
        """How many of `outcomes` (likeliest first) to draft ahead for: the count of the largest
        positive expected gain, 0 where none is positive."""
        best, best_gain, share = 0, 0.0, 0.0
        for n, r in enumerate(outcomes, 1):
            share += math.exp(r.score) / mass if mass > 0 else 0.0
            gain = self.gain_steps(share, width, n, main_steps, branch_depth)
            if gain > best_gain:
                best, best_gain = n, gain
        return best


FLIGHT_EMA = 0.3  # per round, the flight time's smoothing (a jittery link: its mean is what the worker has)
CALIBRATION_PRIOR = 2.0  # pseudo-rounds of the draft's shares taken at their word before hits are counted
CALIBRATION_FORGET = 0.1  # per rejected round with branches


class AheadGate:
    """The measurements behind AheadOdds, kept across a generation's rounds: the flight time (EMA),
    the draft step's cost by rows (a fit over the steps drafted in flight), and the calibration of
    the draft's shares (decaying counts of hits against predicted hits over the rounds that ended
    in a rejection while branches were drafted)."""

    def __init__(self) -> None:
        self.flight_s: float | None = None
        self._steps = CostFit()
        self._hits = self._predicted = CALIBRATION_PRIOR

    def odds(self, full: float) -> AheadOdds:
        if self._steps.s0 == 0:  # no step measured yet: the flight time alone says nothing
            return AheadOdds(full, None, 0.0, 0.0, 1.0)
        s0, per_row = self._steps.fit()
        return AheadOdds(full, self.flight_s, s0, per_row, self._hits / self._predicted)

    def observe(self, flight_s: float, steps: list[tuple[int, float]], share: float | None, rejected: bool,
                hit: bool) -> None:
        """One round: its block's flight time, the (rows, seconds) of the draft steps in flight, and
        where branches were drafted (share: the draft's share of the rejections they cover), whether
        the block ended in a rejection and whether one of them was it."""
        self.flight_s = flight_s if self.flight_s is None else self.flight_s + FLIGHT_EMA * (flight_s - self.flight_s)
        for rows, seconds in steps:
            self._steps.add(rows, seconds)
        if share is not None and rejected:
            keep = 1.0 - CALIBRATION_FORGET
            self._hits = keep * self._hits + hit
            self._predicted = keep * self._predicted + share


@dataclass(frozen=True)
class RejectionSource:
    """The block in flight, and how many of its likeliest rejections to draft ahead for: n, or as
    many as `odds` finds worth it (at most n) when given."""

    block: TokenTree
    n: int
    odds: AheadOdds | None = None


@dataclass(frozen=True)
class Ahead:
    """A tree drafted ahead for the next round, and what it was drafted for: "prefill" (the first
    round's, while the chain prefilled), "accept" (the text went through the last block's tree and
    on below it) or "rejection" (a branch drafted for the last block's rejection)."""

    growth: TreeGrowth | LookupGrowth
    source: str


class Predraft:
    """Drafting ahead in a worker thread, while a block is in flight or the chain prefills: grows
    `growth` until its main tree is `depth` deep and its branches (one for each likely rejection of
    `rejections`, added first) are `branch_depth` deep, its caches are full, or the round stops it.
    A prompt lookup's growth (no draft model) has no branches: it only looks up its chain."""

    def __init__(self, growth: TreeGrowth | LookupGrowth, depth: int, rejections: RejectionSource | None = None,
                 branch_depth: int = 0):
        self.stop = threading.Event()
        self.growth = growth
        self.rejections: list[Rejection] = []
        self.share: float | None = None  # the draft's share of the block's rejections that they cover
        self.steps: list[tuple[int, float]] = []  # (tree rows, seconds) of each tree step drafted
        self.task = asyncio.get_running_loop().run_in_executor(None, self._run, depth, rejections, branch_depth)

    def _run(self, depth: int, rejections: RejectionSource | None, branch_depth: int) -> None:
        g = self.growth
        if rejections is not None and rejections.n and isinstance(g, TreeGrowth):  # chosen here, not on the
            # event loop, which is sending the block
            outcomes = likely_rejections(g, rejections.block, rejections.n)
            mass = rejection_mass(g, rejections.block)
            n = len(outcomes) if rejections.odds is None else rejections.odds.choose(
                outcomes, mass, g.width, max(depth - g.depth, 0), branch_depth)
            self.rejections = outcomes[:n]
            self.share = sum(math.exp(r.score) for r in self.rejections) / mass if n and mass > 0 else None
            for r in self.rejections:
                g.branch(r.node, r.token, r.score)
        timed = isinstance(g, TreeGrowth)  # (a lookup's step costs nothing)
        branches = g.branches if self.rejections else []
        while g.has_room() and not self.stop.is_set():
            main = g.depth < depth
            if not (main or any(b.depth < branch_depth for b in branches)):
                return
            tree, t0 = g.depth > 0, time.perf_counter()
            rows = g.step(main, branch_depth) if self.rejections else g.step()
            if timed and tree:  # (a first depth feeds the context's new tokens: not a tree step's cost)
                self.steps.append((rows, time.perf_counter() - t0))

    async def finish(self) -> None:
        self.stop.set()
        await self.task
