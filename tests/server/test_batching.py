"""The server's continuous batcher (server/batching.py) on a real span of a tiny model."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dsdnode.models.span import Block, Span
from dsdnode.server.batching import Batcher, BatchSettings
from tests.helpers.tiny_models import tiny_model


@pytest.fixture
def span():
    return Span.of_model(tiny_model("llama").to(torch.float32), 0, 4)


def blocks(span, n, length=3):
    g = torch.Generator().manual_seed(0)
    return [Block(torch.randn(1, length + i % 2, span.config.hidden_size, generator=g), span.new_cache(16), 0)
            for i in range(n)]


def run(span, settings, jobs, active):
    async def main():
        batcher = Batcher(ThreadPoolExecutor(1), settings, lambda: active)
        try:
            t0 = time.monotonic()
            out = await asyncio.gather(*(batcher.run(span, b, f"peer{i % 2}") for i, b in enumerate(jobs)),
                                       return_exceptions=True)
            return out, batcher, time.monotonic() - t0
        finally:
            batcher.stop()
    return asyncio.run(main())


def test_blocks_queued_together_run_in_one_forward_and_each_gets_its_own_output(span):
    jobs = blocks(span, 5)
    refs = [span(b.hidden, span.new_cache(16), 0) for b in jobs]
    out, batcher, _ = run(span, BatchSettings(max_batch=16, window_s=0.0), jobs, active=5)
    assert batcher.batches == 1 and batcher.blocks == 5
    for r, o, b in zip(refs, out, jobs):
        assert o.batch_size == 5 and o.hidden.shape == r.shape
        assert torch.allclose(o.hidden, r, atol=1e-5)
        assert b.cache.length == b.length


def test_no_batching_runs_each_block_alone_and_max_batch_bounds_a_forward(span):
    jobs = blocks(span, 5)
    _, batcher, _ = run(span, BatchSettings(max_batch=1, window_s=0.5), jobs, active=5)
    assert batcher.batches == 5  # and never waited for a window: max_batch 1 means no batching
    _, batcher, _ = run(span, BatchSettings(max_batch=2, window_s=0.0), blocks(span, 5), active=5)
    assert batcher.batches == 3


def test_a_lone_session_never_waits_for_the_window(span):
    out, batcher, took = run(span, BatchSettings(max_batch=16, window_s=5.0), blocks(span, 1), active=1)
    assert out[0].batch_size == 1 and took < 2.5  # a wait would have cost the whole 5 s window


def test_a_bad_block_fails_alone(span):
    jobs = blocks(span, 3)
    jobs[1] = Block(jobs[1].hidden, span.new_cache(16), 5)  # commit_len beyond what its cache holds
    out, batcher, _ = run(span, BatchSettings(max_batch=16, window_s=0.0), jobs, active=3)
    assert isinstance(out[1], ValueError) and "outside the cached" in str(out[1])
    assert out[0].batch_size == out[2].batch_size == 2 and batcher.blocks == 2
