"""Prompt-lookup drafting: the drafter of a target that has no draft model sharing its vocabulary.

The proposals are the tokens that followed the latest earlier occurrence of the text's last n-gram
(tree.lookup_continuation): no model, no cache, no draft time. They go to the target as a chain of
fixed proposals (drafted=False), so every verifier stays lossless: greedy accepts a node only where
it holds the target's argmax, and sampling treats each as a one-hot proposal (verify.py). Where
nothing matches, the round sends the last token alone and takes the target's one token (a plain
autoregressive step).

PromptLookupDrafter and LookupGrowth stand where Drafter and TreeGrowth stand in the generation
loop (client/generate.py): `growth(context, width)` starts a round's draft, `step()` adds a depth.
A lookup chain is never followed into the next round (TokenTree.follow follows drafted nodes
only), so it has no `rerooted`: every round looks up afresh in the text as it now stands."""

from __future__ import annotations

from .tree import TokenTree, lookup_continuation

LOOKUP_TOKENS = 64  # continuation looked up per round: as deep as any block drafts (cli_common.K_LIMIT)


class PromptLookupDrafter:
    """sampling / rng are set by the generation loop as on a Drafter; proposals ignore them (a fixed
    proposal is one token whatever the temperature)."""

    def __init__(self):
        self.sampling = None
        self.rng = None

    def growth(self, context: list[int], width: int) -> LookupGrowth:
        """The round's chain of proposals after `context` (a lookup proposes one continuation: the
        tree is a chain whatever `width` the controller asks for)."""
        return LookupGrowth(context)

    def prefill(self, prompt: list[int]) -> None:
        """Nothing to cache: the lookup reads the text itself."""


class LookupGrowth:
    """The lookup's continuation, one depth per step; past the continuation's end a step adds no
    node (the round sends a shorter chain than the controller asked for, or none)."""

    width = 1

    def __init__(self, context: list[int]):
        self.context = list(context)
        self.tree = TokenTree()
        self.depth = 0
        self._continuation: list[int] | None = None  # looked up at the first step

    def step(self) -> None:
        if self._continuation is None:
            self._continuation = lookup_continuation(self.context, LOOKUP_TOKENS)
        if self.depth < len(self._continuation):
            self.tree.add(self._continuation[self.depth], self.depth - 1, drafted=False)
        self.depth += 1

    def has_room(self) -> bool:
        """Whether another step would add a node."""
        return self._continuation is None or self.depth < len(self._continuation)
