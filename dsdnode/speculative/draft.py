"""The drafter: a small model with its own static KV cache proposing k tokens at a time.

The draft model is a `Head` plus one or more local spans (usually one span of all its layers).
It remembers which tokens its cache holds; before each proposal it rolls back to the longest
prefix it shares with the accepted text (moving a position, nothing recomputed) and feeds only
what is new. Head, spans and caches live on the client's device; each step's logits come back to
the CPU (Head.logits), where tokens are picked and sampled.

Drafting is tree drafting (tree.py, TreeGrowth): after the context, one batched forward per step
over the nodes chosen last, with a tree mask and explicit positions, appended to the draft's cache
after the context (the next proposal rolls back over them like over any rejected draft). A chain
of k drafts is the width-1 tree of depth k."""

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

    def propose_tree(self, context: list[int], shape: TreeShape) -> TokenTree:
        """A tree of shape.depth depths after `context` (tree.py says how nodes are chosen)."""
        growth = TreeGrowth(self, context, shape.width)
        growth.deepen(shape.depth)
        return growth.tree

    def _sample_children(self, tree: TokenTree, frontier, width: int) -> list[tuple[int, float]]:
        """Sampling: draw children of the frontier's (node, log path probability, logits), i.i.d.
        from the draft's distribution at each: `width` at the root, one elsewhere (how many is fixed
        before any is drawn). Returns the new (node, log path probability)."""
        new = []
        for node, score, logits in frontier:
            q = logits_to_probs(logits, self.sampling)
            tree.dists[node] = q
            for _ in range(width if node < 0 else 1):
                token = sample(q, self.rng)
                new.append((tree.add(token, node), score + float(q[token].clamp(min=1e-30).log())))
        return new

    def _tree_step(self, tree: TokenTree, nodes: list[int], in_cache: list[int], positions: list[int]) -> torch.Tensor:
        """Run tree nodes (node i at positions[i]) after the context and the tree's cached nodes;
        returns their logits. Every node's ancestors must be cached already."""
        seen = in_cache + nodes
        col = {node: j for j, node in enumerate(seen)}
        mask = torch.zeros(len(nodes), len(seen), dtype=torch.bool)
        for i, node in enumerate(nodes):
            while node >= 0:
                mask[i, col[node]] = True
                node = tree.parents[node]
        hidden = self.head.embed_tokens([tree.tokens[n] for n in nodes])
        commit = len(self.cached) + len(in_cache)
        for span, cache in zip(self.spans, self.caches):
            hidden = span(hidden, cache, commit, tree_mask=mask, position_ids=torch.tensor([positions]))
        return self.head.logits(hidden)


class TreeGrowth:
    """A tree drafted a step at a time, so that drafting can stop between steps and go on later.

    Each step feeds the nodes chosen last (one draft forward, each node at its own depth's position)
    and chooses the next `width` nodes. A round waiting for its draft deepens the tree (children of
    the deepest nodes only: one more depth per step). While a block is in flight the round's tree
    grows on ahead: below its deepest nodes (the text may take the whole block), then (greedy)
    the likeliest candidates anywhere in the tree by the draft's path probability, beside drafted
    nodes too (the target may choose another token there: then the bonus token is such a hidden
    candidate, and what was drafted below it is the next round's start). The next round takes the
    part below the text's actual continuation (`rerooted`) and deepens it if it is too shallow.
    Between steps nothing else may use the drafter: its cache holds the context and then the fed
    nodes, in the order they were fed (= node order)."""

    def __init__(self, drafter: Drafter, context: list[int], width: int):
        self.drafter, self.context, self.width = drafter, list(context), width
        self.tree = TokenTree()
        self.depth = 0  # the deepest node's depth
        self._depths: list[int] = []  # every node's depth
        self._newest: list[int] = []  # nodes chosen but not fed yet
        self._in_cache: list[int] = []  # tree nodes whose keys/values the caches hold after the context
        self._scores: dict[int, float] = {}  # every node's log path probability
        # greedy: (log path probability, parent, token) of fed nodes' likeliest children not in the tree
        self._candidates: list[tuple[float, int, int]] = []

    @property
    def greedy(self) -> bool:
        return self.drafter.sampling.greedy

    def step(self, ahead: int | None = None) -> bool:
        """Draft once more: feed the nodes chosen last, then choose up to `width` nodes. ahead=None:
        children of the deepest nodes (one depth deeper); ahead=D: deepen while shallower than D,
        then (greedy) the likeliest candidates anywhere no deeper than D, until the tree holds
        2 x D x width nodes. Deepening comes first because the draft's probabilities understate how
        often its first choice is the target's argmax (measured by the controller as acceptance):
        ranked by them alone, hidden second choices near the root would starve the path that a
        well-aligned draft needs. False: nothing left to choose (a step that only fed its nodes)."""
        d = self.drafter
        if not self.greedy and ahead is not None and self.depth >= ahead:
            return False
        if self._newest:
            fed = self._newest
            logits = d._tree_step(self.tree, fed, self._in_cache,
                                  [len(self.context) + self._depths[n] - 1 for n in fed])
            self._in_cache += fed
            frontier = [(n, self._scores[n], row) for n, row in zip(fed, logits)]
        elif not self.tree.tokens and not self._candidates:  # nothing drafted yet: the root's children
            frontier = [(-1, 0.0, d._step(self.context))]
        else:
            frontier = []
        if not self.greedy:
            return self._added(d._sample_children(self.tree, frontier, self.width))
        for node, score, logits in frontier:
            top = torch.log_softmax(logits, dim=-1).topk(min(self.width + 1, logits.shape[-1]))
            self._candidates += [(score + float(v), node, int(t)) for v, t in zip(top.values, top.indices)]
        if ahead is None or self.depth < ahead:
            eligible, room = [c for c in self._candidates if self._depth(c[1]) == self.depth], self.width
        else:  # as many nodes again as deepening to `ahead` drafts, beside them
            eligible = [c for c in self._candidates if self._depth(c[1]) < ahead]
            room = min(self.width, 2 * ahead * self.width - len(self.tree))
        chosen = sorted(eligible, key=lambda c: -c[0])[:max(0, room)]  # stable: earlier candidates first on ties
        taken = set(chosen)
        self._candidates = [c for c in self._candidates if c not in taken]
        return self._added([(self.tree.add(token, parent), score) for score, parent, token in chosen])

    def deepen(self, depth: int) -> None:
        """Step until the tree is `depth` deep (or the caches are full, or nothing is left to choose)."""
        while self.depth < depth and self.has_room() and self.step():
            pass

    def _depth(self, node: int) -> int:
        return 0 if node < 0 else self._depths[node]

    def _added(self, new: list[tuple[int, float]]) -> bool:
        for node, score in new:
            self._depths.append(self._depth(self.tree.parents[node]) + 1)
            self._scores[node] = score
            self.depth = max(self.depth, self._depths[node])
        self._newest = [node for node, _ in new]
        return bool(new)

    def has_room(self) -> bool:
        """Whether the drafter's caches hold the next step (it feeds the newest nodes)."""
        capacity = min(cache.capacity for cache in self.drafter.caches)
        return len(self.context) + len(self._in_cache) + len(self._newest) <= capacity

    def block(self, depth: int, width: int) -> TokenTree:
        """The tree a round sends, down to `depth`. Greedy: the `width` x `depth` likeliest nodes (a
        parent is at least as likely as its children and comes first, so they form a tree); width 1
        stays a chain (the path to the likeliest deepest node), as the controller's chains assume.
        Sampling: every node down to `depth` (a node's candidates must stay i.i.d. draws)."""
        keep = [n for n, dd in enumerate(self._depths) if dd <= depth]
        if keep and self.greedy and width == 1:
            deepest = max(self._depths[n] for n in keep)
            node = max((n for n in keep if self._depths[n] == deepest), key=lambda n: self._scores[n])
            keep = []
            while node >= 0:
                keep.append(node)
                node = self.tree.parents[node]
        elif len(keep) > width * depth and self.greedy:
            keep = sorted(sorted(keep, key=lambda n: -self._scores[n])[:width * depth])
        return self.tree.pruned(keep)

    def rerooted(self, node: int) -> "TreeGrowth":
        """The growth of the nodes below `node`, after the context and the path to `node`: the next
        round's draft where the text went on along that path. The drafter's cache keeps that path's
        and those nodes' keys and values, moved to follow the context: nothing is recomputed (but for
        sampling, whose deepest nodes are fed again when none of them waits to be fed: it keeps no
        candidates). This growth must not be used afterwards."""
        path = []
        n = node
        while n >= 0:
            path.append(n)
            n = self.tree.parents[n]
        path.reverse()
        sub, old = self.tree.subtree(node)
        depths = sub.depths()
        newest = set(self._newest)
        unfed = {n for n in old if n in newest}
        if not self.greedy and old and not unfed:
            unfed = {old[i] for i, dd in enumerate(depths) if dd == max(depths)}
        base = len(self.context)
        row = {n: base + j for j, n in enumerate(self._in_cache)}
        cached_path = [n for n in path if n in row]  # all of it but a node chosen and not fed yet
        fed = [n for n in old if n in row and n not in unfed]
        for cache in self.drafter.caches:
            cache.keep_rows(base, [row[n] for n in cached_path + fed])
        self.drafter.cached = self.context + [self.tree.tokens[n] for n in cached_path]
        new_id = {n: i for i, n in enumerate(old)}
        new_id[node] = -1
        offset = self._scores[node]
        growth = TreeGrowth(self.drafter, self.context + [self.tree.tokens[n] for n in path], self.width)
        growth.tree, growth._depths, growth.depth = sub, depths, max(depths, default=0)
        growth._in_cache = [new_id[n] for n in fed]
        growth._newest = [new_id[n] for n in old if n in unfed]
        growth._scores = {new_id[n]: self._scores[n] - offset for n in old}
        growth._candidates = [(s - offset, new_id[p], t) for s, p, t in self._candidates if p in new_id]
        return growth
