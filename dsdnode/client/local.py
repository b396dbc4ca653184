"""An in-process chain of spans, with emulated per-link latency.

It runs the same protocol as the swarm (block in, final hidden states out, rollback riding on
commit_len) so the generation loop, the tests and `generate --local` exercise the real algorithm
without a network. A round crosses N+1 links (client -> hop 1 -> ... -> hop N -> client), each
delayed by `link_latency_s` with asyncio.sleep, so other work (drafting) proceeds meanwhile.
Hidden states stay on the spans' device between hops (nothing crosses a wire here)."""

from __future__ import annotations

import asyncio
import time

import torch

from ..models.span import Span, SpanCache
from .interface import UNCHECKED, ChainOutput, Checkpoint, TreeBlock
from ..errors import BadValue


class LocalChain:
    def __init__(self, spans: list[Span], link_latency_s: float = 0.0):
        self.spans = spans
        self.n_hops = len(spans)
        self.failovers = 0  # in-process spans do not fail
        self.route = [("local", s.start, s.end) for s in spans]
        self.link_latency_s = link_latency_s
        self.caches: list[SpanCache] = []

    async def start_session(self, max_length: int) -> None:
        self.caches = [s.new_cache(max_length) for s in self.spans]

    async def _link(self) -> None:
        if self.link_latency_s > 0:
            await asyncio.sleep(self.link_latency_s)

    async def forward(self, hidden: torch.Tensor, commit_len: int, tree: TreeBlock | None = None,
                      kept: list[int] | None = None) -> ChainOutput:
        loop = asyncio.get_running_loop()
        computes = []
        mask, positions = (None, None) if tree is None else (tree.mask, torch.tensor([tree.positions]))
        for span, cache in zip(self.spans, self.caches):
            await self._link()
            t0 = time.perf_counter()
            hidden = await loop.run_in_executor(None, span, hidden, cache, commit_len, mask, positions, kept)
            computes.append(time.perf_counter() - t0)
        await self._link()
        return ChainOutput(hidden, computes)

    async def checkpoint(self) -> Checkpoint:
        return Checkpoint(UNCHECKED)  # spans in this process are trusted

    async def finish(self, path: list[int] = (0,)) -> Checkpoint:
        return Checkpoint(UNCHECKED)

    async def close(self) -> None:
        self.caches = []


def split_layers(num_layers: int, n_hops: int) -> list[tuple[int, int]]:
    """Cut num_layers into n_hops contiguous spans as even as possible."""
    if not 1 <= n_hops <= num_layers:
        raise BadValue(f"cannot split {num_layers} layers into {n_hops} spans")
    bounds = [round(i * num_layers / n_hops) for i in range(n_hops + 1)]
    return list(zip(bounds, bounds[1:]))
