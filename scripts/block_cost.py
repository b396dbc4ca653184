"""Time one span's forward per block size: is a server's cost per position flat on this device?

    python scripts/block_cost.py [--model qwen2.5-coder-1.5b] [--layers 7] [--device cpu] [--threads 1]
                                 [--config-dir DIR]   (random weights from DIR/config.json, see below)

Token trees (#13) send blocks of 20-35 positions where a chain of drafts sends 5-9. Whether that
is nearly free depends on the device: BENCHMARKS.md fits ~8-10 ms per further position over 4 hops
on this project's 2-core CPU. This prints, for blocks of 1..64 positions after 300 cached ones
(the shape of a round mid-answer), the median time of one forward over `--layers` layers (a quarter
of the model is one of the bench's 4 servers) and a least-squares fit: first position + ms per
further position.

--config-dir builds the layers from a config.json with random weights instead of pulling the
model: a device machine with no copy of the weights times the same shapes (the cost of a dense
forward does not depend on the weights' values)."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dsdnode.devices import describe, resolve_device
from dsdnode.models.span import Span, SpanCache
from dsdnode.models.weights import load_config

CACHED = 300
BLOCKS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
REPEATS = 7


def random_span(config_dir: Path, layers: int, dtype: torch.dtype, device: torch.device) -> Span:
    from transformers import AutoModelForCausalLM

    config = load_config(config_dir)
    config.num_hidden_layers = layers
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return Span.of_model(model.eval().requires_grad_(False), 0, layers)


def prefilled_cache(span: Span) -> SpanCache:
    """A cache holding CACHED committed positions, with room for the longest block after them."""
    cache = span.new_cache(CACHED + max(BLOCKS))
    span.forward(torch.randn(1, CACHED, span.config.hidden_size, dtype=span.dtype, device=span.device), cache, 0)
    return cache


def time_block(span: Span, cache: SpanCache, length: int) -> float:
    """Median seconds of one forward of `length` positions after the CACHED committed ones (each
    forward rolls back to CACHED first, so every block size reuses one prefilled cache)."""
    block = torch.randn(1, length, span.config.hidden_size, dtype=span.dtype, device=span.device)
    span.forward(block, cache, CACHED)  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        span.forward(block, cache, CACHED)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (the bench's servers use 1)")
    ap.add_argument("--config-dir", type=Path, help="random weights from this folder's config.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    if args.config_dir:
        span, source = random_span(args.config_dir, args.layers, dtype, device), f"random weights ({args.config_dir})"
    else:
        from dsdnode.models.fetch import pull
        span, source = Span.load(pull(args.model, progress=False), 0, args.layers, dtype, device), args.model
    print(f"{source}: {args.layers} layers, hidden {span.config.hidden_size}, {args.dtype} on {describe(device)}"
          f"{f', {args.threads} thread(s)' if device.type == 'cpu' else ''}; {CACHED} cached positions, "
          f"median of {REPEATS}", flush=True)
    points, cache = [], prefilled_cache(span)
    for length in BLOCKS:
        seconds = time_block(span, cache, length)
        points.append((length, seconds))
        print(f"  block {length:3d}: {seconds * 1e3:8.2f} ms  ({seconds * 1e3 / length:6.2f} ms per position)",
              flush=True)
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    first = my - slope * (mx - 1)
    print(f"fit: {first * 1e3:.2f} ms for the first position + {slope * 1e3:.3f} ms per further position; "
          f"a 32-position block costs {points[BLOCKS.index(32)][1] / points[0][1]:.2f}x a 1-position one", flush=True)


if __name__ == "__main__":
    main()
