"""The drafter: a small model with its own static KV cache proposing k tokens at a time.

The draft model is a `Head` plus one or more local spans (usually one span of all its layers).
It remembers which tokens its cache holds; before each proposal it rolls back to the longest
prefix it shares with the accepted text (moving a position, nothing recomputed) and feeds only
what is new. Head, spans and caches live on the client's device; each step's logits come back to
the CPU (Head.logits), where tokens are picked and sampled."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.head import Head
from ..models.span import Span
from .sampling import SamplingSettings, logits_to_probs, sample


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
        """Draft k tokens after `context`."""
        tokens, rows = [], []
        context = list(context)
        for _ in range(k):
            logits = self._step(context)
            if self.sampling.greedy:
                token = int(logits.argmax())
            else:
                probs = logits_to_probs(logits, self.sampling)
                token = sample(probs, self.rng)
                rows.append(probs)
            tokens.append(token)
            context.append(token)
        return Proposal(tokens, torch.stack(rows) if rows else None)


def extend(first: Proposal, more: Proposal) -> Proposal:
    parts = [p.probs for p in (first, more) if p.probs is not None]
    probs = torch.cat(parts) if parts else None
    return Proposal(first.tokens + more.tokens, probs)


def truncate(p: Proposal, k: int) -> Proposal:
    return Proposal(p.tokens[:k], None if p.probs is None else p.probs[:k])
