"""The drafter: a small model with its own static KV cache proposing k tokens at a time.

The draft model is a `Head` plus one or more local spans (usually one span of all its layers).
It remembers which tokens its cache holds; before each proposal it rolls back to the longest
prefix it shares with the accepted text (moving a position, nothing recomputed) and feeds only
what is new. Head, spans and caches live on the client's device; each step's logits come back to
the CPU (Head.logits), where tokens are picked and sampled.

Drafting is tree drafting (tree.py): after the context, one batched forward per depth over that
depth's nodes, with a tree mask and explicit positions, appended to the draft's cache after the
context (the next proposal rolls back over them like over any rejected draft). A chain of k drafts
is the width-1 tree of depth k."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.head import Head
from ..models.span import Span
from .sampling import SamplingSettings, logits_to_probs, sample
from .tree import TokenTree, TreeShape


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None  # [k, V] distributions the tokens were drawn from (None when greedy)


class Drafter:
    def __init__(self, head: Head, spans: list[Span], capacity: int, sampling: SamplingSettings, rng=None):
        self.head, self.spans = head, spans
        self.caches = [s.new_cache(capacity) for s in spans]
        self.cached: list[int] = []  # the tokens whose keys/values the caches hold
        self.sampling, self.rng = sampling, rng

    def _step(self, context: list[int]) -> torch.Tensor:
        """Bring the cache up to date with `context`; return the logits of its next token."""
        limit = min(len(self.cached), len(context) - 1)  # always feed at least one token
        if self.cached[:limit] == context[:limit]:
            keep = limit
        else:
            keep = next(i for i in range(limit) if self.cached[i] != context[i])
        hidden = self.head.embed_tokens(context[keep:])
        for span, cache in zip(self.spans, self.caches):
            hidden = span(hidden, cache, keep)
        self.cached = list(context)
        return self.head.logits(hidden[:, -1:])[0]

    def propose(self, context: list[int], k: int) -> Proposal:
        """Draft k tokens after `context` (a width-1 tree)."""
        tree = self.propose_tree(context, TreeShape(1, k))
        probs = [tree.dists[p] for p in tree.parents] if tree.dists else []
        return Proposal(tree.tokens, torch.stack(probs) if probs else None)

    def propose_tree(self, context: list[int], shape: TreeShape) -> TokenTree:
        """A tree of shape.depth depths after `context` (tree.py says how nodes are chosen)."""
        tree = TokenTree()
        if shape.depth == 0:
            return tree
        frontier = [(-1, 0.0, self._step(list(context)))]  # (node, log path probability, logits after it)
        in_cache: list[int] = []  # tree nodes whose keys/values the caches hold after the context
        for depth in range(1, shape.depth + 1):
            new = self._expand(tree, frontier, shape.width)
            if depth == shape.depth:
                break
            logits = self._tree_step(tree, new, in_cache, len(context) + depth - 1)
            in_cache += [node for node, _ in new]
            frontier = [(node, score, row) for (node, score), row in zip(new, logits)]
        return tree

    def _expand(self, tree: TokenTree, frontier, width: int) -> list[tuple[int, float]]:
        """Add one depth of children to the frontier; returns the new (node, log path probability)."""
        new = []
        if self.sampling.greedy:  # the `width` best (node, token) pairs of the depth, best first
            pairs = []
            for node, score, logits in frontier:
                top = torch.log_softmax(logits, dim=-1).topk(width)
                pairs += [(score + float(v), node, int(t)) for v, t in zip(top.values, top.indices)]
            for score, node, token in sorted(pairs, key=lambda x: -x[0])[:width]:
                new.append((tree.add(token, node), score))
            return new
        for node, score, logits in frontier:  # i.i.d. draws: `width` at the root, one elsewhere
            q = logits_to_probs(logits, self.sampling)
            tree.dists[node] = q
            for _ in range(width if node < 0 else 1):
                token = sample(q, self.rng)
                new.append((tree.add(token, node), score + float(q[token].clamp(min=1e-30).log())))
        return new

    def _tree_step(self, tree: TokenTree, new: list[tuple[int, float]], in_cache: list[int],
                   position: int) -> torch.Tensor:
        """Run one depth's new nodes (at `position`) after the context and the tree's cached nodes."""
        nodes = [node for node, _ in new]
        seen = in_cache + nodes
        col = {node: j for j, node in enumerate(seen)}
        mask = torch.zeros(len(nodes), len(seen), dtype=torch.bool)
        for i, node in enumerate(nodes):
            while node >= 0:
                mask[i, col[node]] = True
                node = tree.parents[node]
        hidden = self.head.embed_tokens([tree.tokens[n] for n in nodes])
        positions = torch.full((1, len(nodes)), position)
        commit = len(self.cached) + len(in_cache)
        for span, cache in zip(self.spans, self.caches):
            hidden = span(hidden, cache, commit, tree_mask=mask, position_ids=positions)
        return self.head.logits(hidden)


def extend(first: Proposal, more: Proposal) -> Proposal:
    parts = [p.probs for p in (first, more) if p.probs is not None]
    probs = torch.cat(parts) if parts else None
    return Proposal(first.tokens + more.tokens, probs)


def truncate(p: Proposal, k: int) -> Proposal:
    return Proposal(p.tokens[:k], None if p.probs is None else p.probs[:k])
