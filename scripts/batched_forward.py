"""Time one span's forward over B sessions' blocks: one after another vs one batched forward.

    python scripts/batched_forward.py [MODEL START END DTYPE BLOCK]   (default: qwen2.5-coder-1.5b 0 7 bfloat16 5)

Each session has 300 cached positions and sends a block of BLOCK positions; 1 torch thread;
medians of 4 repeats. This is the figure behind batching in docs/ARCHITECTURE.md ("Many clients")."""

import statistics
import sys
import time

import torch

from dsdnode.models.fetch import pull
from dsdnode.models.span import Block, Span

CACHED = 300


def main(model="qwen2.5-coder-1.5b", start="0", end="7", dtype="bfloat16", block="5"):
    torch.set_num_threads(1)
    dt, length = getattr(torch, dtype), int(block)
    span = Span.load(pull(model, progress=False), int(start), int(end), dtype=dt)
    hidden_size = span.config.hidden_size
    for b in (1, 2, 4, 8):
        caches = [span.new_cache(CACHED + 2 * length) for _ in range(b)]
        for cache in caches:
            span.forward(torch.randn(1, CACHED, hidden_size, dtype=dt), cache, 0)
        blocks = [torch.randn(1, length, hidden_size, dtype=dt) for _ in range(b)]
        one_by_one, batched = [], []
        for _ in range(4):
            t0 = time.perf_counter()
            for h, cache in zip(blocks, caches):
                span.forward(h, cache, CACHED)
            one_by_one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            span.forward_batch([Block(h, cache, CACHED) for h, cache in zip(blocks, caches)])
            batched.append(time.perf_counter() - t0)
        print(f"B={b} T={length} one by one {statistics.median(one_by_one) * 1e3:.1f} ms  "
              f"batched {statistics.median(batched) * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
