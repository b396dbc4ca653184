"""Token trees: several candidate continuations in one block (a chain of drafts is a width-1 tree).

A tree hangs off the root, the last accepted token, which opens every block. Node i is block
position i+1; nodes are kept in topological order (a parent before its children), so a node sees
only earlier block positions and the block's mask is causal-with-holes. A node at depth d sits at
position commit_len + d, so siblings share a position id: the block carries explicit positions.

Where candidates come from:
- the draft model (`Drafter.propose_tree`), one batched forward per depth: greedy keeps the `width`
  best (node, token) pairs of a depth by the draft's path probability; sampling draws `width`
  children of the root and one child of every other node, each i.i.d. from the draft's distribution
  at its parent (multi-candidate rejection sampling needs i.i.d. candidates; which nodes get how many
  children is fixed before their children are drawn);
- prompt lookup (`lookup_continuation`): the tokens that followed the latest earlier occurrence of
  the text's last n-gram, added as a branch of fixed proposals at no draft cost (code and math repeat
  themselves: names, numbers, whole lines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class TreeShape:
    """width: draft nodes kept per depth (1 = a chain of drafts); depth: drafted depths (a chain's k)."""

    width: int
    depth: int

    def __post_init__(self) -> None:
        if not (isinstance(self.width, int) and self.width >= 1 and isinstance(self.depth, int) and self.depth >= 0):
            raise ValueError(f"a tree shape needs width >= 1 and depth >= 0, got {self.width}x{self.depth}")

    @property
    def nodes(self) -> int:
        """Draft nodes of a full tree of this shape (prompt-lookup branches come on top)."""
        return self.width * self.depth


@dataclass
class TokenTree:
    """tokens[i]: node i's token; parents[i]: its parent node (-1: the root); drafted[i]: drawn from
    (or, greedy, chosen by) the draft's distribution at its parent, else a fixed proposal (prompt
    lookup); dists[n]: the processed draft distribution at node n (-1: the root) its drafted
    children were drawn from (sampling only)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    drafted: list[bool] = field(default_factory=list)
    dists: dict[int, Tensor] = field(default_factory=dict)

    @classmethod
    def chain(cls, tokens: list[int], probs: Tensor | None = None) -> "TokenTree":
        """A chain of drafts; probs[i]: the distribution draft i was drawn from."""
        tree = cls(list(tokens), list(range(-1, len(tokens) - 1)), [True] * len(tokens))
        if probs is not None:
            tree.dists = {i - 1: probs[i] for i in range(len(tokens))}
        return tree

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, drafted: bool = True) -> int:
        if not -1 <= parent < len(self.tokens):
            raise ValueError(f"parent {parent} is not a node of this tree of {len(self.tokens)}")
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.drafted.append(drafted)
        return len(self.tokens) - 1

    def child_lists(self) -> dict[int, list[int]]:
        """Every node's children (-1: the root's), in the order they were added."""
        kids: dict[int, list[int]] = {}
        for i, p in enumerate(self.parents):
            kids.setdefault(p, []).append(i)
        return kids

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def add_branch(self, tokens: list[int], merge: bool) -> None:
        """Hang a fixed continuation of the root on the tree. merge: follow nodes that already hold
        its tokens (greedy: one node per prefix); else every token is a new node (sampling: a fixed
        proposal is a candidate of its own, even where a drafted sibling holds the same token)."""
        node = -1
        for t in tokens:
            same = [c for c in self.child_lists().get(node, []) if self.tokens[c] == t] if merge else []
            node = same[0] if same else self.add(t, node, drafted=False)

    def block_mask(self) -> Tensor:
        """[n+1, n+1] bool over the block [root, nodes...]: each position sees its ancestors and itself."""
        n = len(self.tokens) + 1
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            mask[i + 1] = mask[p + 1]
            mask[i + 1, i + 1] = True
        return mask

    def depths(self) -> list[int]:
        """Every node's depth (the root's children: 1)."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return depths

    def positions(self, root_position: int) -> list[int]:
        """Position ids of the block [root, nodes...]."""
        return [root_position] + [root_position + d for d in self.depths()]

    def truncated(self, depth: int) -> "TokenTree":
        """The nodes down to `depth`: a prefix of a tree grown depth by depth (one with a lookup
        branch added is not: ValueError)."""
        depths = self.depths()
        n = sum(d <= depth for d in depths)
        if any(d > depth for d in depths[:n]):
            raise ValueError("only a tree whose nodes come depth by depth can be cut at a depth")
        parents = self.parents[:n]
        has_children = set(parents)
        return TokenTree(self.tokens[:n], parents, self.drafted[:n],
                         {node: q for node, q in self.dists.items() if node in has_children})

    def follow(self, tokens: list[int]) -> list[int] | None:
        """The drafted nodes spelling `tokens` from the root (None: the tree does not hold them)."""
        kids, path, node = self.child_lists(), [], -1
        for t in tokens:
            node = next((c for c in kids.get(node, []) if self.drafted[c] and self.tokens[c] == t), None)
            if node is None:
                return None
            path.append(node)
        return path

    def subtree(self, node: int) -> tuple["TokenTree", list[int]]:
        """The nodes below `node` as a tree of their own (`node` its root), and the old index of each
        of its nodes; draft distributions come along (the one at `node` becomes the root's)."""
        old: list[int] = []
        new_id = {node: -1}
        for i, p in enumerate(self.parents):
            if p in new_id:
                new_id[i] = len(old)
                old.append(i)
        tree = TokenTree([self.tokens[i] for i in old], [new_id[self.parents[i]] for i in old],
                         [self.drafted[i] for i in old],
                         {new_id[n]: q for n, q in self.dists.items() if n in new_id})
        return tree, old


def lookup_continuation(context: list[int], length: int, ngram_max: int = 3, ngram_min: int = 1,
                        window: int = 4096) -> list[int]:
    """Up to `length` tokens that followed the latest earlier occurrence of the context's last n-gram
    (longest n first, within the last `window` tokens); [] when nothing matches.

    Prompt lookup decoding (Saxena 2023): candidates for free where the text repeats itself."""
    if length < 1:
        return []
    text = context[-window:]
    for n in range(min(ngram_max, len(text) - 1), ngram_min - 1, -1):
        tail = text[-n:]
        for start in range(len(text) - n - 1, -1, -1):  # latest first; the match must not be the tail itself
            if text[start + n - 1] == tail[-1] and text[start:start + n] == tail:
                return text[start + n:start + n + length]
    return []
