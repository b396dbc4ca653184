"""Token trees: layout (mask, positions, merged branches), prompt lookup, and tree verification --
greedy follows the target, multi-candidate rejection sampling keeps the target's distribution
(checked statistically like the chain's), adaptive relaxes only unimportant near-misses."""

from collections import Counter

import pytest
import torch

from dsdnode.speculative.importance import AdaptiveSettings
from dsdnode.speculative.sampling import SamplingSettings, logits_to_probs, sample
from dsdnode.speculative.tree import TokenTree, TreeShape, lookup_continuation
from dsdnode.speculative.verify import verify_tree_adaptive, verify_tree_greedy, verify_tree_sampling
from tests.speculative.test_verify import ID, SCORER, TinyLM, chi2_critical, chi2_stat, one_hot_logits, row

torch.set_num_threads(1)


def sample_tree() -> TokenTree:
    """root -> a(0) -> {b(1), c(2)}; root -> d(3); c -> e(4)."""
    tree = TokenTree()
    a = tree.add(11, -1)
    tree.add(12, a)
    c = tree.add(13, a)
    tree.add(14, -1)
    tree.add(15, c)
    return tree


def test_mask_and_positions():
    tree = sample_tree()
    mask = tree.block_mask()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 0, 1, 0, 0],
                             [1, 0, 0, 0, 1, 0],
                             [1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert tree.positions(10) == [10, 11, 12, 12, 11, 13]
    assert not tree.is_chain and TokenTree.chain([1, 2, 3]).is_chain
    assert TreeShape(3, 4).nodes == 12
    with pytest.raises(ValueError):
        TreeShape(0, 2)


def test_a_grown_tree_is_cut_at_a_depth_followed_and_split():
    """Nodes of a grown tree come depth by depth: cutting keeps a prefix, and the draft distributions
    of the nodes left with children; following tokens finds drafted nodes only; the part below a node
    is a tree of its own, depth by depth, with the distributions it needs."""
    tree = TokenTree()
    a, b = tree.add(11, -1), tree.add(12, -1)  # depth 1 (best first)
    c, d = tree.add(13, b), tree.add(14, a)  # depth 2: b's child scored better than a's
    e = tree.add(15, d)  # depth 3
    tree.dists = {-1: torch.ones(3), a: torch.ones(3), b: torch.ones(3), d: torch.ones(3)}
    assert tree.depths() == [1, 1, 2, 2, 3]
    cut = tree.truncated(2)
    assert (cut.tokens, cut.parents) == ([11, 12, 13, 14], [-1, -1, b, a])
    assert set(cut.dists) == {-1, a, b}
    assert len(tree.truncated(5)) == 5
    assert tree.follow([11, 14, 15]) == [a, d, e] and tree.follow([12, 13]) == [b, c] and tree.follow([]) == []
    assert tree.follow([11, 13]) is None and tree.follow([11, 14, 15, 16]) is None
    below, old = tree.subtree(a)
    assert (below.tokens, below.parents, old) == ([14, 15], [-1, 0], [d, e])
    assert set(below.dists) == {-1, 0} and below.dists[-1] is tree.dists[a]
    assert len(tree.subtree(e)[0]) == 0
    tree.add_branch([16, 17], merge=False)  # a lookup branch after the drafted depths: not drafted
    assert tree.follow([16]) is None
    with pytest.raises(ValueError, match="depth by depth"):
        tree.truncated(2)


def test_branches_merge_only_when_asked():
    tree = sample_tree()
    tree.add_branch([11, 13, 15, 16], merge=True)  # follows a, c, e; adds 16 under e
    assert len(tree) == 6 and tree.parents[5] == 4 and not tree.drafted[5]
    tree.add_branch([11, 12], merge=False)
    assert len(tree) == 8 and tree.parents[6:] == [-1, 6]


def test_lookup_continuation_takes_the_latest_longest_match():
    text = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup_continuation(text, 3) == [7, 8, 5]  # "2 3" last seen before "7 8 5"
    assert lookup_continuation(text, 1) == [7]
    assert lookup_continuation([4, 5, 6], 3) == []
    assert lookup_continuation(text, 0) == []
    assert lookup_continuation([5, 6, 5], 4) == [6, 5]  # a 1-gram match


def test_greedy_follows_the_child_holding_the_argmax():
    tree = sample_tree()
    # rows: root, a, b, c, d, e -> the target wants a, then c, then e, then 2 after e
    logits = one_hot_logits([11, 13, 0, 15, 0, 2], vocab=20)
    r = verify_tree_greedy(tree, logits)
    assert (r.accepted, r.tokens, r.path, r.ranks) == (3, [11, 13, 15, 2], [0, 2, 4], [0, 1, 0])
    r = verify_tree_greedy(tree, one_hot_logits([14, 0, 0, 0, 5, 0], vocab=20))
    assert (r.tokens, r.path, r.ranks) == ([14, 5], [3], [1])  # d is a leaf: its row gives the bonus
    r = verify_tree_greedy(tree, one_hot_logits([7, 0, 0, 0, 0, 0], vocab=20))
    assert (r.tokens, r.path, r.ranks) == ([7], [], [-1])
    with pytest.raises(ValueError):
        verify_tree_greedy(tree, one_hot_logits([1, 2], vocab=20))


def tree_of_candidates(lm: TinyLM, width: int, lookup: int | None, depth2: bool) -> TokenTree:
    """`width` i.i.d. draft samples at the root, a lookup candidate after them, and (depth2) one
    drafted child under each drafted root child."""
    tree = TokenTree()
    tree.dists[-1] = lm.q[0]
    kids = []
    for _ in range(width):
        kids.append(tree.add(lm.rng.choices(range(len(lm.q[0])), weights=lm.q_lists[0])[0], -1))
    if lookup is not None:
        tree.add(lookup, -1, drafted=False)
    if depth2:
        for k in kids:
            x = tree.tokens[k]
            tree.dists[k] = lm.q[1][x]
            tree.add(lm.rng.choices(range(len(lm.q[0])), weights=lm.q_lists[1][x])[0], k)
    return tree


def target_rows(lm: TinyLM, tree: TokenTree) -> torch.Tensor:
    rows = [lm.t[0]]
    for i, p in enumerate(tree.parents):
        rows.append(lm.t[1][tree.tokens[i]] if p < 0 else lm.t[2][tree.tokens[p]][tree.tokens[i]])
    return torch.stack(rows)


SETTINGS = [SamplingSettings(temperature=1.0), SamplingSettings(temperature=0.7, top_p=0.8)]


@pytest.mark.parametrize("s,width,lookup", [(SETTINGS[0], 3, None), (SETTINGS[1], 2, 4)], ids=["t1-w3", "t0.7-p0.8-w2-lookup"])
def test_tree_sampling_first_token_matches_processed_target(s, width, lookup):
    vocab, n = 6, 10000
    lm, g = TinyLM(vocab, seed=21, s=s), torch.Generator().manual_seed(31)
    counts = Counter()
    for _ in range(n):
        tree = tree_of_candidates(lm, width, lookup, depth2=False)
        counts[verify_tree_sampling(tree, target_rows(lm, tree), s, g).tokens[0]] += 1
    p = logits_to_probs(lm.t[0], s)
    stat, dof = chi2_stat(counts, p, n)
    assert stat < chi2_critical(dof), (stat, counts, p)
    # power: the draft's own distribution is far from the target's
    wrong = Counter({i: round(float(lm.q[0][i]) * n) for i in range(vocab)})
    assert chi2_stat(wrong, p.clamp(min=1e-3), n)[0] > 10 * chi2_critical(dof)


def test_tree_sampling_first_two_tokens_joint_matches_target():
    """Joint law of the first two tokens of a round: candidates at two depths, the second token an
    accepted child, a correction or a bonus; when the round yields one token, the second comes from
    the target's row after it (what the next round would sample from)."""
    s, vocab, n = SETTINGS[1], 5, 15000
    lm, g = TinyLM(vocab, seed=22, s=s), torch.Generator().manual_seed(32)
    counts = Counter()
    for _ in range(n):
        tree = tree_of_candidates(lm, 2, 1, depth2=True)
        toks = verify_tree_sampling(tree, target_rows(lm, tree), s, g).tokens
        if len(toks) < 2:
            toks = toks + [sample(logits_to_probs(lm.t[1][toks[0]], s), g)]
        counts[toks[0] * vocab + toks[1]] += 1
    joint = logits_to_probs(lm.t[0], s)[:, None] * logits_to_probs(lm.t[1], s)
    stat, dof = chi2_stat(counts, joint, n)
    assert stat < chi2_critical(dof), stat


def test_tree_sampling_needs_the_draft_distributions():
    tree = TokenTree()
    tree.add(1, -1)
    with pytest.raises(ValueError, match="distribution"):
        verify_tree_sampling(tree, torch.zeros(2, 4), SamplingSettings(temperature=1.0), None)
    tree.drafted[0] = False  # a lookup candidate needs none
    assert len(verify_tree_sampling(tree, torch.zeros(2, 4), SamplingSettings(temperature=1.0), None).tokens) >= 1


def test_tree_adaptive_relaxes_an_unimportant_sibling_only():
    on = AdaptiveSettings(enabled=True, tau=0.3)
    tree = TokenTree()
    tree.add(ID["Ġ42"], -1)  # a key token the target does not want
    tree.add(ID["Ġa"], -1)  # a function word close to the target's choice
    rows = torch.stack([row({"Ġthe": 0.55, "Ġa": 0.4}), row({"Ġx": 0.9}), row({"Ġy": 0.9})])
    assert verify_tree_greedy(tree, rows).tokens == [ID["Ġthe"]]
    r = verify_tree_adaptive(tree, rows, SCORER, on)
    assert (r.tokens, r.relaxed, r.ranks) == ([ID["Ġa"], ID["Ġy"]], 1, [1])
    assert verify_tree_adaptive(tree, rows, SCORER, AdaptiveSettings(enabled=False)) == verify_tree_greedy(tree, rows)
