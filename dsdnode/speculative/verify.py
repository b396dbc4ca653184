"""Deciding how much of a drafted block the target accepts.

The verifiers work on token trees (tree.py; a chain of drafts is a width-1 tree) and take the
target's logits for the block [root, node_0 .. node_{n-1}]: row 0 predicts the token after the
root (the last accepted token), row i+1 the token after node i. Each walks down from the root and
returns the accepted path plus exactly one token chosen by the target, so a round always makes
progress (len(tokens) == accepted + 1 >= 1).

- verify_tree_greedy: follow the child that holds the target's argmax; lossless for greedy decoding.
- verify_tree_sampling: lossless for sampling; multi-candidate rejection sampling (SpecInfer,
  Miao et al. 2024): a node's candidates are tried in order, each accepted with
  min(1, p(x) / q(x)); after a rejection the target's distribution becomes norm(max(0, p - q)).
  Drafted candidates are i.i.d. draws from the draft's q at their parent; a prompt-lookup candidate
  is a fixed proposal (q = one-hot), accepted with p(x), after which p loses x. When all are
  rejected (or the node is a leaf) the token is drawn from what is left of p, so every emitted token
  is distributed exactly as the target's p.
- verify_tree_adaptive: opt-in, lossy; where no child holds the argmax, accepts the first child
  that is an unimportant near-miss (importance.py).
verify_greedy / verify_sampling / verify_adaptive are the same on a chain of drafts.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .importance import AdaptiveSettings, ImportanceScorer
from .sampling import SamplingSettings, logits_to_probs, sample
from .tree import TokenTree


@dataclass
class VerifyResult:
    """accepted: draft tokens accepted (0..k); tokens: those tokens plus one target token
    (correction at the first rejection, or the bonus after a full accept);
    relaxed: how many of the accepted tokens were accepted only by the adaptive rule;
    path: the accepted tree nodes (a chain: 0..accepted-1);
    ranks: at each node visited that has children, the rank of the accepted child among them
    (-1: none accepted), which tells the controller what a wider tree would have caught."""

    accepted: int
    tokens: list[int]
    relaxed: int = 0
    path: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)


def _check_block(draft: list[int], target_logits: Tensor) -> tuple[list[int], int]:
    """Validate shapes and ids; return the draft as plain ints and the vocabulary size."""
    if not isinstance(target_logits, Tensor) or target_logits.dim() != 2:
        raise ValueError("target_logits must be a 2-D tensor [k+1, V]")
    if not target_logits.is_floating_point():
        raise ValueError(f"target_logits must be floating point, got {target_logits.dtype}")
    try:
        ids = [operator.index(t) for t in draft]
    except TypeError as e:
        raise ValueError(f"draft must be a list of integer token ids: {e}") from None
    rows, vocab = target_logits.shape
    if rows != len(ids) + 1:
        raise ValueError(f"target_logits has {rows} rows; a draft of {len(ids)} tokens "
                         f"needs {len(ids) + 1} (one per draft token plus the bonus)")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"draft token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    return ids, vocab


def _check_tree(tree: TokenTree, target_logits: Tensor) -> dict[int, list[int]]:
    """Validate the tree against the logits; return its children lists."""
    _check_block(tree.tokens, target_logits)
    if any(not -1 <= p < i for i, p in enumerate(tree.parents)) or len(tree.parents) != len(tree.tokens):
        raise ValueError("tree parents must come before their children")
    return tree.child_lists()


def _walk(tree: TokenTree, kids: dict[int, list[int]], choose) -> VerifyResult:
    """Down from the root: choose(node, children) -> (rank of the accepted child or -1, the target's
    token there if none, relaxed?) until nothing is accepted or a leaf is reached."""
    node, path, ranks, relaxed = -1, [], [], 0
    while True:
        cands = kids.get(node, [])
        rank, token, was_relaxed = choose(node, cands)
        if cands:
            ranks.append(rank)
        if rank < 0:
            return VerifyResult(len(path), [tree.tokens[i] for i in path] + [token], relaxed, path, ranks)
        node = cands[rank]
        path.append(node)
        relaxed += was_relaxed


def verify_tree_greedy(tree: TokenTree, target_logits: Tensor) -> VerifyResult:
    """Follow the child holding the target's argmax; emit the argmax where none does."""
    kids = _check_tree(tree, target_logits)
    top = target_logits.argmax(dim=-1).tolist()

    def choose(node: int, cands: list[int]):
        t = top[node + 1]
        return next((r for r, c in enumerate(cands) if tree.tokens[c] == t), -1), t, False
    return _walk(tree, kids, choose)


def verify_tree_sampling(tree: TokenTree, target_logits: Tensor, s: SamplingSettings,
                         generator: torch.Generator | None) -> VerifyResult:
    """Multi-candidate rejection sampling (module doc). tree.dists must hold the draft distribution
    [V] at every node with drafted children. Temperature 0 is greedy verification."""
    kids = _check_tree(tree, target_logits)
    if s.greedy:
        return verify_tree_greedy(tree, target_logits)
    vocab = target_logits.shape[1]
    for node in {p for p, d in zip(tree.parents, tree.drafted) if d}:
        q = tree.dists.get(node)
        if not isinstance(q, Tensor) or tuple(q.shape) != (vocab,):
            raise ValueError(f"the draft distribution at node {node} must have shape ({vocab},)")
        if not math.isfinite(float(q.sum())) or float(q.min()) < 0:
            raise ValueError("draft distributions must be finite and non-negative")

    def choose(node: int, cands: list[int]):
        p = logits_to_probs(target_logits[node + 1], s)
        for rank, c in enumerate(cands):
            x = tree.tokens[c]
            q = tree.dists[node].to(torch.float32) if tree.drafted[c] else None
            qx = float(q[x]) if q is not None else 1.0
            # u < p/q without dividing: q == 0 accepts iff p > 0, the limit of min(1, p/q)
            if float(torch.rand(1, generator=generator)) * qx < float(p[x]):
                return rank, x, False
            if q is not None:
                residual = (p - q).clamp_(min=0.0)
            else:
                residual = p.clone()
                residual[x] = 0.0
            total = float(residual.sum())
            if total > 0:  # else p == q up to rounding: the rejection had probability ~0, keep p
                p = residual / total
        return -1, sample(p, generator), False
    return _walk(tree, kids, choose)


def verify_tree_adaptive(tree: TokenTree, target_logits: Tensor, importance: ImportanceScorer,
                         s: AdaptiveSettings) -> VerifyResult:
    """Greedy tree verification that also accepts an unimportant near-miss (lossy, opt-in).

    At a node whose children do not hold the argmax, with p = softmax(row) (temperature 1), the first
    child x (in order) with importance.relaxable(x, p, s) and p(x) >= s.tau * p(argmax) is accepted as
    relaxed. enabled=False gives exactly verify_tree_greedy."""
    if not s.enabled:
        return verify_tree_greedy(tree, target_logits)
    kids = _check_tree(tree, target_logits)
    top = target_logits.argmax(dim=-1).tolist()

    def choose(node: int, cands: list[int]):
        t = top[node + 1]
        exact = next((r for r, c in enumerate(cands) if tree.tokens[c] == t), -1)
        if exact >= 0 or not any(not importance.key(tree.tokens[c]) for c in cands):  # table lookups first
            return exact, t, False
        probs = torch.softmax(target_logits[node + 1].detach().to(torch.float32), dim=-1)
        for rank, c in enumerate(cands):
            x = tree.tokens[c]
            if importance.relaxable(x, probs, s) and float(probs[x]) >= s.tau * float(probs[t]):
                return rank, x, True
        return -1, t, False
    return _walk(tree, kids, choose)


def verify_greedy(draft: list[int], target_logits: Tensor) -> VerifyResult:
    """verify_tree_greedy on a chain: the longest prefix with draft[i] == argmax(row i), then the next argmax."""
    ids, _ = _check_block(draft, target_logits)
    return verify_tree_greedy(TokenTree.chain(ids), target_logits)


def verify_sampling(draft: list[int], draft_probs: Tensor, target_logits: Tensor,
                    s: SamplingSettings, generator: torch.Generator | None) -> VerifyResult:
    """Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023) on a chain: draft[i]
    is accepted with probability min(1, p_i(x) / q_i(x)); at the first rejection the token is drawn
    from norm(max(0, p_i - q_i)); after k accepts the bonus is drawn from p_k. draft_probs: [k, V],
    the processed distributions the drafts were sampled from."""
    ids, vocab = _check_block(draft, target_logits)
    if not isinstance(draft_probs, Tensor) or tuple(draft_probs.shape) != (len(ids), vocab):
        got = tuple(draft_probs.shape) if isinstance(draft_probs, Tensor) else draft_probs
        raise ValueError(f"draft_probs must have shape ({len(ids)}, {vocab}), got {got}")
    return verify_tree_sampling(TokenTree.chain(ids, draft_probs), target_logits, s, generator)


def verify_adaptive(draft: list[int], target_logits: Tensor, importance: ImportanceScorer,
                    s: AdaptiveSettings) -> VerifyResult:
    """verify_tree_adaptive on a chain."""
    ids, _ = _check_block(draft, target_logits)
    return verify_tree_adaptive(TokenTree.chain(ids), target_logits, importance, s)
