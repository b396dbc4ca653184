"""Continuous batching: the blocks of different sessions waiting at a server run in one forward.

A forward over a span costs about the time to read its weights, whatever the number of rows, so
blocks of several sessions run together cost little more than one alone (docs/ARCHITECTURE.md has
the figures). The batcher keeps one queue of blocks and one compute thread: whenever the thread is
free it takes every block queued (up to max_batch) and runs them as one Span.forward_batch. Blocks
that arrive while a batch computes wait for the next one -- continuous batching, as in vLLM, but
across the sessions of a decentralized swarm.

A lone block is never held back: it runs as soon as the thread is free, through the plain
Span.forward (the unbatched path, bit for bit). Only when other sessions of this server were
active lately, so another block may arrive at once, does the batcher wait up to `window_s` for
it. With batching off (max_batch=1) each block runs alone, in arrival order: the old path, kept
for comparison.

Sessions may use different sub-ranges of the span (Span.sub): only blocks over the same layers
share a forward."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..models.span import Block, Span

log = logging.getLogger(__name__)


@dataclass
class BatchSettings:
    max_batch: int = 16  # blocks per forward; 1 = no batching
    window_s: float = 0.002  # how long a block may wait for others when other sessions are active


@dataclass
class _Job:
    span: Span
    block: Block
    owner: str  # peer id of the session's opener (per-client accounting)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(frozen=True)
class BatchResult:
    hidden: torch.Tensor  # this block's output [1, T, H]
    compute_s: float  # the whole forward it was part of
    batch_size: int


class Batcher:
    """One compute thread shared by every session of a server; see the module docstring."""

    def __init__(self, executor: Executor, settings: BatchSettings, active_sessions: Callable[[], int],
                 observe: Callable[[int], None] = lambda blocks: None):
        """active_sessions: how many sessions sent a block lately (a lone one never waits);
        observe: told the number of blocks of every forward (metrics)."""
        self.executor, self.settings, self.active_sessions, self.observe = executor, settings, active_sessions, observe
        self.queue: list[_Job] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.blocks = 0

    @property
    def queued_positions(self) -> int:
        return sum(j.block.length for j in self.queue)

    def queued_by(self, owner: str) -> int:
        """Positions queued for the sessions of one client."""
        return sum(j.block.length for j in self.queue if j.owner == owner)

    async def run(self, span: Span, block: Block, owner: str) -> BatchResult:
        """Queue a block and wait for its output. ValueError (bad commit_len or kept, cache full) is
        this block's alone: it is checked before the block joins a batch, and the kept path of the
        previous block is compacted here, once (the forwards below only re-check the rollback)."""
        block.cache.begin_block(block.commit_len, block.length, block.kept)  # ValueError before anything runs
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._loop())
        job = _Job(span, block, owner)
        self.queue.append(job)
        self._wake.set()
        return await job.done

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for job in self.queue:
            if not job.done.done():
                job.done.cancel()
        self.queue.clear()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.queue:
                await self._gather()
                # in a method of its own: the batch's blocks hold their sessions' caches, and must not
                # outlive the forward (a closed or expired session's cache is freed at once)
                await self._run(self._take())

    async def _run(self, batch: list[_Job]) -> None:
        t0 = time.perf_counter()
        try:
            outs = await asyncio.get_running_loop().run_in_executor(self.executor, _forward, batch)
        except Exception as e:  # the whole batch failed (e.g. out of memory): each block says so
            for job in batch:
                if not job.done.done():
                    job.done.set_exception(e)
            return
        compute_s = time.perf_counter() - t0
        self.batches += 1
        self.blocks += len(batch)
        self.observe(len(batch))
        for job, out in zip(batch, outs):
            if not job.done.done():  # its waiter may be gone (session closed meanwhile)
                job.done.set_result(BatchResult(out, compute_s, len(batch)))

    async def _gather(self) -> None:
        """Wait up to window_s for blocks of other recently active sessions (never for a lone one)."""
        s = self.settings
        if s.max_batch <= 1 or s.window_s <= 0:
            return
        deadline = time.monotonic() + s.window_s
        while len(self.queue) < min(s.max_batch, self.active_sessions()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return
            self._wake.clear()

    def _take(self) -> list[_Job]:
        """The oldest block and up to max_batch - 1 more queued over the same layers, in order."""
        first = self.queue[0]
        key = (first.span.start, first.span.end)
        batch = [j for j in self.queue if (j.span.start, j.span.end) == key][:self.settings.max_batch]
        taken = set(map(id, batch))
        self.queue = [j for j in self.queue if id(j) not in taken]
        return batch


def _forward(batch: list[_Job]) -> list[torch.Tensor]:
    """On the compute thread: a lone block through the plain path, several through forward_batch."""
    if len(batch) == 1:
        b = batch[0].block
        return [batch[0].span.forward(b.hidden, b.cache, b.commit_len, b.tree_mask, b.position_ids)]
    return batch[0].span.forward_batch([j.block for j in batch])
