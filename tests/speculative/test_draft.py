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


def grown(model, width: int, depth: int) -> TreeGrowth:
    drafter = Drafter(Head.of_model(model), [Span.of_model(model, 0, model.config.num_hidden_layers)], 64,
                      SamplingSettings())
    growth = TreeGrowth(drafter, CONTEXT, width)
    for _ in range(depth):
        growth.step()
    return growth


def path_to(tree, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


@pytest.mark.parametrize("width", [1, 3])
def test_a_rerooted_tree_drafts_what_a_fresh_draft_would(width):
    """For every node of a grown tree: reroot there and draft one more depth; each new node's draft
    logits equal the whole model's on the context, the path and the node's own ancestors (float32),
    whether the part below the node reaches the newest depth, stops short of it or is empty."""
    model = tiny_model("qwen2", seed=4)
    probe = grown(model, width, 4)
    cases = {len(probe.tree.subtree(n)[0]) for n in range(len(probe.tree))}
    assert 0 in cases and len(cases) > 1  # leaves and inner nodes alike
    for node in range(len(probe.tree)):
        growth = grown(model, width, 4)
        path = [growth.tree.tokens[n] for n in path_to(growth.tree, node)]
        sub = growth.rerooted(node)
        assert sub.context == CONTEXT + path and sub.width == width
        assert len(sub.tree) <= len(growth.tree.subtree(node)[0])
        sub.step()
        frontier = [n for n, _ in sub._newest]
        assert frontier and len(frontier) <= width
        parents = {n: sub.tree.parents[n] for n in frontier}
        drafter = sub.drafter
        new = drafter._tree_step(sub.tree, frontier, sub._in_cache, [len(sub.context) + sub.depth - 1] * len(frontier))
        for n, row in zip(frontier, new):
            ids = sub.context + [sub.tree.tokens[a] for a in path_to(sub.tree, n)]
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0, -1]
            assert torch.allclose(row, ref, atol=1e-4), (node, n, parents[n])


def test_kept_rows_must_be_positions_in_order():
    growth = grown(tiny_model("llama", seed=2), 2, 3)
    cache = growth.drafter.caches[0]
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.keep_rows(len(CONTEXT), [len(CONTEXT) + 1, len(CONTEXT)])
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.keep_rows(len(CONTEXT), [cache.length])
