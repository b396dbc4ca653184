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

TOP_SPARE = 4  # draft tokens kept per node beyond the tree's width, as likely corrections (predraft.py)


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

    def _expand(self, tree: TokenTree, frontier, width: int,
                top: dict[int, list[tuple[float, int]]]) -> list[tuple[int, float]]:
        """Add one depth of children to the frontier; returns the new (node, log path probability).
        Each frontier node's best TOP_SPARE + width tokens by the draft go to top[node] (log
        probability, token): the likely corrections where the target rejects the node's children
        (predraft.py drafts ahead for them)."""
        new = []
        if self.sampling.greedy:  # the `width` best (node, token) pairs of the depth, best first
            pairs = []
            for node, score, logits in frontier:
                best = torch.log_softmax(logits, dim=-1).topk(min(width + TOP_SPARE, logits.shape[-1]))
                top[node] = [(float(v), int(t)) for v, t in zip(best.values, best.indices)]
                pairs += [(score + v, node, t) for v, t in top[node][:width]]
            for score, node, token in sorted(pairs, key=lambda x: -x[0])[:width]:
                new.append((tree.add(token, node), score))
            return new
        for node, score, logits in frontier:  # i.i.d. draws: `width` at the root, one elsewhere
            q = logits_to_probs(logits, self.sampling)
            tree.dists[node] = q
            best = q.topk(min(width + TOP_SPARE, q.shape[-1]))
            top[node] = [(float(v.clamp(min=1e-30).log()), int(t)) for v, t in zip(best.values, best.indices)]
            for _ in range(width if node < 0 else 1):
                token = sample(q, self.rng)
                new.append((tree.add(token, node), score + float(q[token].clamp(min=1e-30).log())))
        return new

    def _tree_step(self, tree: TokenTree, nodes: list[int], in_cache: list[int], positions: list[int]) -> torch.Tensor:
        """Run tree nodes (node i at positions[i]) after the context and the tree's cached nodes."""
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
    """A tree drafted one depth at a time, so that drafting can stop between depths and go on later
    (while a block is in flight the round's tree grows on below its deepest nodes; the next round
    takes the part below the text's actual continuation, `rerooted`, and grows it further if it is
    too shallow). Between steps nothing else may use the drafter: its cache holds the context and
    then the tree's nodes of every depth but the newest.

    Branches (speculative speculative decoding, predraft.py): a token added below a node of the tree
    after the block was sent, the correction the target is guessed to give where it rejects that
    node's children; it grows a tree of its own, in the same draft forwards as the main tree, so
    that the next round's draft is ready if the guess holds."""

    def __init__(self, drafter: Drafter, context: list[int], width: int):
        self.drafter, self.context, self.width = drafter, list(context), width
        self.tree = TokenTree()
        self.depth = 0
        self._newest: list[tuple[int, float]] = []  # the newest depth's (node, log path probability)
        self._in_cache: list[int] = []  # tree nodes whose keys/values the caches hold after the context
        self._scores: dict[int, float] = {}  # every node's log path probability
        self.top: dict[int, list[tuple[float, int]]] = {}  # a drafted node's best tokens (Drafter._expand)
        self.branches: list[_Branch] = []

    def step(self, main: bool = True, branch_depth: int = 0) -> int:
        """Draft one more depth in one draft forward: of the main tree (over the context's new tokens
        for its first depth, over the newest depth's nodes after that) if `main`, and of every
        branch less than `branch_depth` deep. Returns the rows of tree nodes the forward ran (0 for a
        first depth, which runs the context's new tokens)."""
        d = self.drafter
        grow = [b for b in self.branches if b.depth < branch_depth]
        frontiers, fed = [], []
        if main and self.depth == 0:  # a tree has branches only once it has nodes
            frontiers.append((-1, 0.0, d._step(self.context)))
        else:
            fed = ([n for n, _ in self._newest] if main else []) + [n for b in grow for n, _ in b.newest]
            depths = self.tree.depths()
            logits = d._tree_step(self.tree, fed, self._in_cache, [len(self.context) + depths[n] - 1 for n in fed])
            self._in_cache += fed
            rows = dict(zip(fed, logits))
            frontiers = [(n, score, rows[n]) for n, score in self._newest] if main else []
            for b in grow:
                b.newest = d._expand(self.tree, [(n, score, rows[n]) for n, score in b.newest], self.width, self.top)
                b.depth += 1
                self._scores.update(b.newest)
        if main:
            self._newest = d._expand(self.tree, frontiers, self.width, self.top)
            self._scores.update(self._newest)
            self.depth += 1
        return len(fed)

    def branch(self, node: int, token: int, score: float) -> int:
        """Add `token` below `node` (a node whose children are cached: depth < self.depth, or -1)
        as the root of a branch with log path probability `score`; returns its node."""
        alt = self.tree.add(token, node)
        self._scores[alt] = score
        self.branches.append(_Branch(alt, [(alt, score)]))
        return alt

    def score(self, node: int) -> float:
        """A node's log path probability by the draft (the root's: 0)."""
        return 0.0 if node < 0 else self._scores[node]

    def has_room(self) -> bool:
        """Whether the drafter's caches hold one more depth (the step feeds the newest nodes)."""
        capacity = min(cache.capacity for cache in self.drafter.caches)
        unfed = len(self._newest) + sum(len(b.newest) for b in self.branches)
        return len(self.context) + len(self._in_cache) + unfed <= capacity

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
        newest = {n for n, _ in self._newest} | {n for b in self.branches for n, _ in b.newest}
        if any(n in newest for n in old):  # (one tree's newest nodes: the main tree's or one branch's)
            depth = max(dd for n, dd in zip(old, depths) if n in newest)
            unfed = newest
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
        root_score = self._scores[path[-1]]  # scores below the new root start from 0 there
        growth._newest = [(new_id[n], self._scores[n] - root_score) for n in old if n in unfed]
        growth._scores = {new_id[n]: self._scores[n] - root_score for n in old}
        new_id[path[-1]] = -1
        growth.top = {new_id[n]: top for n, top in self.top.items() if n in new_id}
        return growth


@dataclass
class _Branch:
    """A branch of a TreeGrowth: its root node, its newest depth's (node, log path probability) and
    the depths drafted below the root."""

    root: int
    newest: list[tuple[int, float]]
    depth: int = 0
