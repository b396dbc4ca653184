"""The drafter's tree growth: a tree rerooted at one of its nodes keeps the draft cache rows it needs
and drafts exactly what a draft run afresh on the longer context would compute."""

import pytest
import torch

from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.speculative.draft import Drafter, TreeGrowth
from dsdnode.speculative.sampling import SamplingSettings
from tests.helpers.tiny_models import tiny_model

CONTEXT = [5, 9, 2, 7, 31]


def grown(model, width: int, depth: int, ahead_steps: int = 0, sampling=None) -> TreeGrowth:
    """A tree deepened to `depth`, then grown ahead (no deeper than depth + 1: one more depth, then
    nodes beside) for `ahead_steps`."""
    drafter = Drafter(Head.of_model(model), [Span.of_model(model, 0, model.config.num_hidden_layers)], 96,
                      sampling or SamplingSettings())
    growth = TreeGrowth(drafter, CONTEXT, width)
    for _ in range(depth):
        assert growth.step()
    for _ in range(ahead_steps):
        growth.step(depth + 1)
    return growth


def path_to(tree, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


def reference_logits(model, growth: TreeGrowth, node: int) -> torch.Tensor:
    ids = growth.context + [growth.tree.tokens[a] for a in path_to(growth.tree, node)]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("width,ahead_steps,greedy", [(1, 0, True), (3, 0, True), (1, 4, True), (3, 4, True),
                                                      (2, 0, False)])
def test_a_rerooted_tree_drafts_what_a_fresh_draft_would(width, ahead_steps, greedy):
    """For every node of a grown tree (also one grown ahead, with hidden nodes beside the drafted
    ones at several depths): reroot there, draft one more step and feed what it chose; each new
    node's draft logits equal the whole model's on the context, the path and the node's own ancestors
    (float32), whether the part below the node reaches the deepest nodes, stops short of them or is
    empty, and whether the node itself was fed."""
    model = tiny_model("qwen2", seed=4)
    sampling = SamplingSettings() if greedy else SamplingSettings(temperature=1.0, seed=3)
    probe = grown(model, width, 4, ahead_steps, sampling)
    cases = {len(probe.tree.subtree(n)[0]) for n in range(len(probe.tree))}
    assert 0 in cases and len(cases) > 1  # leaves and inner nodes alike
    for node in range(len(probe.tree)):
        growth = grown(model, width, 4, ahead_steps, sampling)
        path = [growth.tree.tokens[n] for n in path_to(growth.tree, node)]
        sub = growth.rerooted(node)
        assert sub.context == CONTEXT + path and sub.width == width
        assert len(sub.tree) <= len(growth.tree.subtree(node)[0])
        assert sub.step()
        frontier = sub._newest
        assert frontier and len(frontier) <= width
        new = sub.drafter._tree_step(sub.tree, frontier, sub._in_cache,
                                     [len(sub.context) + sub._depths[n] - 1 for n in frontier])
        for n, row in zip(frontier, new):
            assert torch.allclose(row, reference_logits(model, sub, n), atol=1e-4), (node, n)


def test_drafting_ahead_grows_beside_drafted_nodes_and_a_block_keeps_the_likeliest():
    """Grown ahead, a greedy tree gets one depth more, then nodes beside the drafted ones (the draft's
    next choices where the target may disagree), no deeper than asked; each node's children are
    the draft's likeliest tokens there, and `block` sends the likeliest nodes down to a depth, as a
    tree."""
    model = tiny_model("qwen2", seed=4)
    growth = grown(model, 2, 3)
    drafted = len(growth.tree)
    for _ in range(6):
        growth.step(4)
    depths = growth._depths
    assert len(growth.tree) > drafted and max(depths) == 4
    beside = [n for n in range(drafted, len(growth.tree)) if depths[n] <= 3]
    assert beside, "nothing was drafted beside the sent nodes"
    kids = growth.tree.child_lists()
    for parent, children in kids.items():
        top = reference_logits(model, growth, parent).topk(len(children)).indices.tolist()
        assert sorted(growth.tree.tokens[c] for c in children) == sorted(top), parent
    shallow = [n for n in range(len(growth.tree)) if depths[n] <= 3]
    assert len(shallow) > 2 * 3
    sent = growth.block(3, 2)
    best = sorted(shallow, key=lambda n: -growth._scores[n])[:2 * 3]
    assert sorted(sent.tokens) == sorted(growth.tree.tokens[n] for n in best) and max(sent.depths()) <= 3
    assert len(growth.block(3, 100)) == len(shallow)
    chain = growth.block(3, 1)  # width 1: the path to the likeliest node of depth 3
    third = max((n for n in shallow if depths[n] == 3), key=lambda n: growth._scores[n])
    assert chain.is_chain and chain.tokens == [growth.tree.tokens[n] for n in path_to(growth.tree, third)]


def test_kept_rows_must_be_positions_in_order():
    growth = grown(tiny_model("llama", seed=2), 2, 3)
    cache = growth.drafter.caches[0]
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.keep_rows(len(CONTEXT), [len(CONTEXT) + 1, len(CONTEXT)])
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.keep_rows(len(CONTEXT), [cache.length])
