"""Per quantization mode (none = bfloat16, int8, int4): bytes per layer, block latency and greedy
agreement with bfloat16 on the real model, on this CPU. Usage:

    python scripts/quant_bench.py [--model qwen2.5-coder-1.5b] [--problems 20] [--new-tokens 32]

Greedy agreement: the share of problems (HumanEval prompts, chat template) whose first
--new-tokens greedy tokens equal the bfloat16 ones, and the mean share of equal tokens up to the
first difference. The whole model runs as one span in this process (no swarm, no draft)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsdnode.bench.datasets import load_dataset
from dsdnode.client.loading import encode_prompt
from dsdnode.models.fetch import resolve_model_dir
from dsdnode.models.head import Head
from dsdnode.models.quantization import QUANT_MODES, quantize_layers, stored_bytes
from dsdnode.models.span import Span
from transformers import AutoTokenizer


def greedy(head, span, ids, n):
    cache = span.new_cache(len(ids) + n + 1)
    logits = head.logits(span(head.embed_tokens(ids), cache, 0))
    out = [int(logits[-1].argmax())]
    while len(out) < n:
        logits = head.logits(span(head.embed_tokens(out[-1:]), cache, len(ids) + len(out) - 1))
        out.append(int(logits[-1].argmax()))
    return out


def block_latency(span, hidden_size, context=256, block=8, repeats=5):
    cache = span.new_cache(context + block)
    span(torch.randn(1, context, hidden_size, dtype=span.dtype), cache, 0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        span(torch.randn(1, block, hidden_size, dtype=span.dtype), cache, context)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--problems", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model_dir = resolve_model_dir(a.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    head = Head.load(model_dir, torch.bfloat16)
    prompts = [encode_prompt(tok, pr.prompt) for pr in load_dataset("humaneval", a.problems)]
    reference = None
    for mode in QUANT_MODES:
        span = Span.load(model_dir, 0, head.config.num_hidden_layers, torch.bfloat16)
        quantize_layers(span.layers, mode, torch.bfloat16)
        layer = stored_bytes(span.layers[0])
        latency = block_latency(span, head.config.hidden_size)
        t0 = time.perf_counter()
        outs = [greedy(head, span, ids, a.new_tokens) for ids in prompts]
        gen_s = time.perf_counter() - t0
        if reference is None:
            reference = outs
        same = sum(o == r for o, r in zip(outs, reference))
        prefix = statistics.mean(next((i for i, (x, y) in enumerate(zip(o, r)) if x != y), len(r)) / len(r)
                                 for o, r in zip(outs, reference))
        print(f"{mode:5} layer {layer / 2**20:7.2f} MiB  block of 8 after 256: {latency * 1000:7.1f} ms  "
              f"greedy == bf16: {same}/{len(prompts)} problems, {prefix:.0%} of tokens before the first "
              f"difference  ({gen_s:.0f} s to generate)", flush=True)


if __name__ == "__main__":
    main()
