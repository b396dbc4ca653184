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
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from .draft import TreeGrowth
from .lookup import LookupGrowth
from .tree import TokenTree


@dataclass(frozen=True)
class PredraftSettings:
    """rejections: rejection outcomes drafted ahead each round besides full acceptance (0: only
    full acceptance). Off by default: in the one swarm run so far (a draft that rarely misses,
    BENCHMARKS.md) the branches slowed the main tree on shared cores more than their hits saved;
    they should be drafted only where a rejection is likely before they are on by default."""

    rejections: int = 0

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


@dataclass(frozen=True)
class RejectionSource:
    """The block in flight and how many of its likeliest rejections to draft ahead for."""

    block: TokenTree
    n: int


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
        self.task = asyncio.get_running_loop().run_in_executor(None, self._run, depth, rejections, branch_depth)

    def _run(self, depth: int, rejections: RejectionSource | None, branch_depth: int) -> None:
        g = self.growth
        if rejections is not None and isinstance(g, TreeGrowth):  # chosen here, not on the event loop,
            # which is sending the block
            self.rejections = likely_rejections(g, rejections.block, rejections.n)
            for r in self.rejections:
                g.branch(r.node, r.token, r.score)
        while g.has_room() and not self.stop.is_set():
            main = g.depth < depth
            if not self.rejections:
                if not main:
                    return
                g.step()
            elif main or any(b.depth < branch_depth for b in g.branches):
                g.step(main, branch_depth)
            else:
                return

    async def finish(self) -> None:
        self.stop.set()
        await self.task
