"""Drafting ahead for a block's likely rejections (SSD): the outcomes chosen are corrections the
block cannot hold, ranked by the draft's path probability, and the tree drafted ahead below one is
exactly what a fresh draft would propose there, before and after the rounds' reroot."""

import pytest

from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.speculative.draft import Drafter, TreeGrowth
from dsdnode.speculative.predraft import likely_rejections
from dsdnode.speculative.sampling import SamplingSettings
from dsdnode.speculative.tree import TreeShape
from tests.helpers.tiny_models import tiny_model

CONTEXT = [5, 9, 2, 7, 31, 40]
BLOCK_DEPTH = 3
BRANCHES = 2


def drafter(model) -> Drafter:
    return Drafter(Head.of_model(model), [Span.of_model(model, 0, model.config.num_hidden_layers)], 128,
                   SamplingSettings())


def in_flight(model, width: int, branches: int, branch_depth: int):
    """A block of BLOCK_DEPTH sent, then what the worker does while it is in flight: branches for
    the likeliest rejections, and steps of the main tree and the branches together."""
    growth = TreeGrowth(drafter(model), CONTEXT, width)
    for _ in range(BLOCK_DEPTH):
        growth.step()
    block = growth.tree.truncated(BLOCK_DEPTH)
    rejections = likely_rejections(growth, block, branches)
    for r in rejections:
        growth.branch(r.node, r.token, r.score)
    for _ in range(branch_depth + 1):
        growth.step(True, branch_depth)
    return growth, block, rejections


def tokens_to(tree, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(tree.tokens[node])
        node = tree.parents[node]
    return path[::-1]


@pytest.mark.parametrize("width", [1, 3])
def test_rejections_are_corrections_the_block_cannot_hold_best_first(width):
    model = tiny_model("qwen2", seed=4)
    growth, block, rejections = in_flight(model, width, 4, 0)
    assert len(rejections) == 4
    assert [r.score for r in rejections] == sorted((r.score for r in rejections), reverse=True)
    kids, depths = block.child_lists(), block.depths()
    for r in rejections:
        assert r.node == -1 or depths[r.node] < BLOCK_DEPTH  # below the deepest depth the main tree grows on
        assert r.token not in {block.tokens[c] for c in kids.get(r.node, [])}
        logp = dict((t, lp) for lp, t in growth.top[r.node])[r.token]
        assert r.score == pytest.approx(growth.score(r.node) + logp)
    # no outcome is left out that the draft finds likelier than the last one taken
    everything = likely_rejections(growth, block, 1000)
    assert everything[:4] == rejections and len(everything) > 4


@pytest.mark.parametrize("width", [1, 2])
def test_a_branch_drafted_ahead_is_the_fresh_draft_of_its_outcome(width):
    """Reroot at each branch (the target gave that correction) and at a main node below the block
    (full acceptance): the tree drafted ahead equals a cold drafter's on the longer context, and so
    does one more depth grown from the moved cache rows."""
    model = tiny_model("qwen2", seed=4)
    branch_depth = 2
    cold = drafter(model)
    for i in range(BRANCHES + 1):
        growth, _, _ = in_flight(model, width, BRANCHES, branch_depth)
        if i < BRANCHES:
            node, depth = growth.branches[i].root, branch_depth
        else:
            node = next(n for n, d in enumerate(growth.tree.depths()) if d == BLOCK_DEPTH + 1)
            depth = growth.depth - (BLOCK_DEPTH + 1)
        context = CONTEXT + tokens_to(growth.tree, node)
        sub = growth.rerooted(node)
        assert sub.context == context and sub.depth == depth
        assert sub.tree.tokens == cold.propose_tree(context, TreeShape(width, depth)).tokens
        sub.step()
        assert sub.tree.tokens == cold.propose_tree(context, TreeShape(width, depth + 1)).tokens
