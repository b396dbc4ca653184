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

import torch

from ..models.head import Head
from ..models.span import Span
from .sampling import SamplingSettings, logits_to_probs, sample
from .tree import TokenTree, TreeShape


class Drafter:
    def __init__(self, head: Head, spans: list[Span], capacity: int, sampling: SamplingSettings, rng=None):
        self.head, self.spans = head, spans
        self.caches = [s.new_cache(capacity) for s in spans]
        self.cached: list[int] = []  # the tokens whose keys/values the caches hold
        self.sampling, self.rng = sampling, rng

    def _feed(self, context: list[int]) -> torch.Tensor:
        """Bring the cache up to date with `context` (at least its last token is fed); return the
        hidden states of what was fed."""
        limit = min(len(self.cached), len(context) - 1)  # always feed at least one token
        if self.cached[:limit] == context[:limit]:
            keep = limit
        else:
            keep = next(i for i in range(limit) if self.cached[i] != context[i])
        hidden = self.head.embed_tokens(context[keep:])
        for span, cache in zip(self.spans, self.caches):
            hidden = span(hidden, cache, keep)
        self.cached = list(context)
        return hidden

    def _step(self, context: list[int]) -> torch.Tensor:
        """Bring the cache up to date with `context`; return the logits of its next token."""
        return self.head.logits(self._feed(context)[:, -1:])[0]

    def prefill(self, prompt: list[int]) -> None:
        """Cache every prompt position but the last, which the first proposal feeds (run it while
        the chain prefills: otherwise the draft's prefill is drafting time of the first round)."""
        if len(prompt) > 1:
            self._feed(prompt[:-1])

    def growth(self, context: list[int], width: int) -> "TreeGrowth":
        """A tree after `context`, to be grown depth by depth (the generation loop's way to draft;
        speculative/lookup.py's PromptLookupDrafter answers the same call without a model)."""
        return TreeGrowth(self, context, width)

    def propose_tree(self, context: list[int], shape: TreeShape) -> TokenTree:
        """A tree of shape.depth depths after `context` (tree.py says how nodes are chosen)."""
        growth = self.growth(context, shape.width)
        while growth.depth < shape.depth:
            growth.step()
        return growth.tree

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


class TreeGrowth:
    """A tree drafted one depth at a time, so that drafting can stop between depths and go on later
    (while a block is in flight the round's tree grows on below its deepest nodes; the next round
    takes the part below the text's actual continuation, `rerooted`, and grows it further if it is
    too shallow). Between steps nothing else may use the drafter: its cache holds the context and
    then the tree's nodes of every depth but the newest."""

    def __init__(self, drafter: Drafter, context: list[int], width: int):
        self.drafter, self.context, self.width = drafter, list(context), width
        self.tree = TokenTree()
        self.depth = 0
        self._newest: list[tuple[int, float]] = []  # the newest depth's (node, log path probability)
        self._in_cache: list[int] = []  # tree nodes whose keys/values the caches hold after the context
        self._scores: dict[int, float] = {}  # every node's log path probability

    def step(self) -> None:
        """Draft one more depth: one draft forward (over the context's new tokens for the first
        depth, over the newest depth's nodes after that)."""
        d = self.drafter
        if self.depth == 0:
            frontier = [(-1, 0.0, d._step(self.context))]
        else:
            logits = d._tree_step(self.tree, self._newest, self._in_cache, len(self.context) + self.depth - 1)
            self._in_cache += [node for node, _ in self._newest]
            frontier = [(node, score, row) for (node, score), row in zip(self._newest, logits)]
        self._newest = d._expand(self.tree, frontier, self.width)
        self._scores.update(self._newest)
        self.depth += 1

    def has_room(self) -> bool:
        """Whether the drafter's caches hold one more depth (the step feeds the newest nodes)."""
        capacity = min(cache.capacity for cache in self.drafter.caches)
        return len(self.context) + len(self._in_cache) + len(self._newest) <= capacity

    def rerooted(self, node: int) -> "TreeGrowth":
        """The growth of the nodes below `node`, after the context and the path to `node`: the next
        round's draft where the text went on along that path. The drafter's cache keeps that path's
        and those nodes' keys and values, moved to follow the context: nothing is recomputed. This
        growth must not be used afterwards."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.tree.parents[node]
        path.reverse()
        sub, old = self.tree.subtree(path[-1])
        depths = sub.depths()
        newest = {n for n, _ in self._newest}
        if any(n in newest for n in old):
            depth, unfed = self.depth - len(path), newest
        else:  # the subtree stops short of the newest depth: its deepest nodes are grown on again
            depth = max(depths, default=0)
            unfed = {old[i] for i, dd in enumerate(depths) if dd == depth}
        base = len(self.context)
        row = {n: base + j for j, n in enumerate(self._in_cache)}
        cached_path = [n for n in path if n in row]  # all but a node of the newest depth, not fed yet
        kept = cached_path + [n for n in old if n in row and n not in unfed]
        for cache in self.drafter.caches:
            cache.keep_rows(base, [row[n] for n in kept])
        self.drafter.cached = self.context + [self.tree.tokens[n] for n in cached_path]
        new_id = {n: i for i, n in enumerate(old)}
        growth = TreeGrowth(self.drafter, self.context + [self.tree.tokens[n] for n in path], self.width)
        growth.tree, growth.depth = sub, depth
        growth._in_cache = [new_id[n] for n in old if n in row and n not in unfed]
        growth._newest = [(new_id[n], self._scores[n]) for n in old if n in unfed]
        growth._scores = {new_id[n]: self._scores[n] for n in old}
        return growth
