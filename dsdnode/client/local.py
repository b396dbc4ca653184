"""An in-process chain of spans, with emulated per-link latency.

It runs the same protocol as the swarm (block in, final hidden states out, rollback riding on
commit_len) so the generation loop, the tests and `generate --local` exercise the real algorithm
without a network. A round crosses N+1 links (client -> hop 1 -> ... -> hop N -> client), each
delayed by `link_latency_s` with asyncio.sleep, so other work (drafting) proceeds meanwhile.
Hidden states stay on the spans' device between hops (nothing crosses a wire here); with
wire="int8" they are rounded at every link as an int8 wire session rounds them (net/wire.py), so
the text is what the swarm gives with that mode."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..models.span import Span, SpanCache
from ..net.wire import WIRE_MODES, TensorPayload
from .interface import UNCHECKED, ChainOutput, Checkpoint, TreeBlock
from ..errors import BadValue

LOCAL_PREFILL_CHUNK = 64  # nothing crosses a wire here: a block a server would accept


class LocalChain:
    def __init__(self, spans: list[Span], link_latency_s: float = 0.0, wire: str = "exact"):
        if wire not in WIRE_MODES:
            raise BadValue(f"wire must be one of {list(WIRE_MODES)}, got {wire!r}")
        self.spans, self.wire = spans, wire
        self.n_hops = len(spans)
        self.failovers = 0  # in-process spans do not fail
        self.route = [("local", s.start, s.end) for s in spans]
        self.unaudited_layers: list[tuple[int, int]] = []  # in-process spans: the user's own, nothing to audit
        self.link_latency_s = link_latency_s
        self.caches: list[SpanCache] = []

    async def start_session(self, max_length: int) -> None:
        self.caches = [s.new_cache(max_length, trim_windows=True) for s in self.spans]

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
            hidden = await loop.run_in_executor(None, span, self._cross(hidden), cache, commit_len, mask, positions, kept)
            computes.append(time.perf_counter() - t0)
        await self._link()
        return ChainOutput(self._cross(hidden), computes)

    def _cross(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states as they arrive over a link of this chain's wire mode."""
        if self.wire == "exact":
            return hidden
        return TensorPayload.int8_blocks(hidden).to_torch().to(device=hidden.device, dtype=hidden.dtype)

    async def prefill(self, hidden: torch.Tensor, chunk: int | None = None) -> list[ChainOutput]:
        """A pipeline of spans: span i computes chunk j once it arrived (one link after span i-1 passed
        it on; the sender does not wait for the link) and span i has finished chunk j-1 -- each span
        in a worker thread of its own."""
        chunk = chunk or LOCAL_PREFILL_CHUNK
        starts = list(range(0, hidden.shape[1], chunk))
        computes = [[0.0] * len(self.spans) for _ in starts]
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(len(self.spans) + 1)]

        def send(i: int, item) -> None:  # over the link into stage i
            loop.call_later(self.link_latency_s, queues[i].put_nowait, (item[0], self._cross(item[1])))

        async def stage(i: int, span: Span, cache: SpanCache, pool: ThreadPoolExecutor) -> None:
            for _ in starts:
                j, x = await queues[i].get()
                t0 = time.perf_counter()
                out = await loop.run_in_executor(pool, span, x, cache, starts[j])
                computes[j][i] = time.perf_counter() - t0
                send(i + 1, (j, out))

        for j, at in enumerate(starts):
            send(0, (j, hidden[:, at:at + chunk]))
        pools = [ThreadPoolExecutor(1) for _ in self.spans]
        try:
            await asyncio.gather(*(stage(i, s, c, p) for i, (s, c, p) in enumerate(zip(self.spans, self.caches, pools))))
            outs = [(await queues[-1].get())[1] for _ in starts]
        finally:
            for pool in pools:
                pool.shutdown(wait=False)
        return [ChainOutput(out, compute) for out, compute in zip(outs, computes)]

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
