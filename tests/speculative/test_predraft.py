"""Drafting ahead for a block's likely rejections (SSD): the outcomes chosen are corrections the
block cannot hold, ranked by the draft's path probability, and the tree drafted ahead below one is
exactly what a fresh draft would propose there, before and after the rounds' reroot; and they are
drafted only where the measured odds say they pay (AheadOdds, AheadGate)."""

import math

import pytest

from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.speculative.draft import Drafter, TreeGrowth
from dsdnode.speculative.predraft import AheadGate, AheadOdds, Rejection, likely_rejections, rejection_mass
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


def test_rejection_mass_is_the_drafts_chance_of_ending_above_the_deepest_depth():
    """A chain drafted greedily: the draft's mass of ending at depth i is P(path to i) times the
    mass its node puts off its one child; the likeliest rejection is part of it, never more."""
    model = tiny_model("qwen2", seed=4)
    growth = TreeGrowth(drafter(model), CONTEXT, 1)
    for _ in range(BLOCK_DEPTH):
        growth.step()
    block = growth.tree.truncated(BLOCK_DEPTH)
    expected, path = 0.0, 1.0
    for node in [-1, 0, 1]:  # the chain's nodes above its deepest one
        child = node + 1
        q = dict((t, math.exp(lp)) for lp, t in growth.top[node])[block.tokens[child]]
        expected += path * (1 - q)
        path *= q
    assert rejection_mass(growth, block) == pytest.approx(expected)
    best = likely_rejections(growth, block, 1)[0]
    assert 0 < math.exp(best.score) <= rejection_mass(growth, block)


def odds(full, flight_s, s0=0.01, per_row=0.001, calibration=1.0):
    return AheadOdds(full, flight_s, s0, per_row, calibration)


def outcomes(*probs):
    return [Rejection(-1, i, math.log(p)) for i, p in enumerate(probs)]


def test_branches_are_drafted_where_a_rejection_is_likely_and_the_flight_holds_them():
    likely = outcomes(0.3, 0.2, 0.1)
    # a block that is mostly rejected, a flight long enough for all: every outcome pays
    assert odds(0.2, 1.0).choose(likely, 0.8, 2, 5, 4) == 3
    # a draft that never misses: nothing to gain, whatever the flight
    assert odds(1.0, 1.0).choose(likely, 0.8, 2, 5, 4) == 0
    # no flight measured yet
    assert odds(0.2, None).choose(likely, 0.8, 2, 5, 4) == 0
    # a likely full acceptance, and a flight that holds the main tree's 5 steps alone (0.06 s): the
    # branches' rows would push main depths past the reply, which costs more than their rare hits save
    assert odds(0.9, 0.065).choose(likely, 0.8, 2, 5, 4) == 0
    # the same flight with a likely rejection: the hits pay for the lost main depths
    assert odds(0.1, 0.065).choose(likely, 0.8, 2, 5, 4) > 0
    # ... unless the hits measured fall far below the draft's shares
    assert odds(0.1, 0.065, calibration=0.02).choose(likely, 0.8, 2, 5, 4) == 0


def test_the_gate_learns_flight_step_cost_and_calibration():
    gate = AheadGate()
    assert gate.odds(0.5).flight_s is None  # nothing measured: no branches
    for rows in (2, 6, 2, 6, 2, 6):  # steps of 2 and 6 rows: 10 ms + 1 ms a row
        gate.observe(0.2, [(rows, 0.01 + 0.001 * rows)], None, True, False)
    o = gate.odds(0.5)
    assert o.flight_s == pytest.approx(0.2)
    assert o.step_s0 == pytest.approx(0.01) and o.step_row_s == pytest.approx(0.001)
    assert o.calibration == 1.0  # no branches drafted yet: the draft's shares taken at their word
    for _ in range(20):  # branches said to cover half the rejections, never hit
        gate.observe(0.2, [], 0.5, True, False)
    assert gate.odds(0.5).calibration < 0.1
    before = gate.odds(0.5).calibration
    gate.observe(0.2, [], 0.5, False, False)  # a full acceptance says nothing about the branches
    assert gate.odds(0.5).calibration == before
