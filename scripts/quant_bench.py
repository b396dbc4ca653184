"""Per quantization mode (none = bfloat16, int8, int4): bytes per layer, block latency and greedy
agreement with bfloat16 on the real model, on this CPU. Usage:

    python scripts/quant_bench.py [--model qwen2.5-coder-1.5b] [--problems 20] [--new-tokens 32]
        [--blocks 1,8,32] [--context 64] [--latency-modes none,int8,int4] [--threads 1] [--out bench-results/quant/qwen2.5-coder-1.5b.json]

The whole model runs as one span per mode in this process (no swarm, no draft); the three spans are
loaded side by side (about 3 + 1.7 + 1.1 GB for the 1.5B). First each mode's memory per layer
(stored bytes of layer 0 and the mean over all layers, bitsandbytes' scales included) and block
latency (median of --repeats forwards of a block of B random hidden states after --context cached
positions; --blocks "" skips it, --latency-modes limits it to some modes). Then, problem by problem (HumanEval, the bench's own chat prompt),
bfloat16's first --new-tokens greedy tokens, and each quantized mode's greedy choice at every one of
those positions given bfloat16's tokens before it (one forward over prompt + tokens: teacher
forcing). The quantized mode's own greedy text equals bfloat16's up to the first position where its
choice differs, so this gives exactly how far the two greedy texts agree, at the cost of one block
instead of --new-tokens decoding steps. The JSON is rewritten after every problem, so a run cut short
keeps what it finished. Reported per mode: problems whose --new-tokens greedy tokens equal bfloat16's,
the mean share of tokens before the first difference, and the share of positions whose choice
given the same prefix equals bfloat16's."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from dsdnode.bench.datasets import chat_messages, load_dataset
from dsdnode.bench.machine import machine_info
from dsdnode.client.loading import encode_chat
from dsdnode.models.fetch import resolve_model_dir
from dsdnode.models.head import Head
from dsdnode.models.quantization import QUANT_MODES, quantize_layers, stored_bytes
from dsdnode.models.span import Span


def greedy(head: Head, span: Span, ids: list[int], n: int) -> list[int]:
    cache = span.new_cache(len(ids) + n + 1)
    logits = head.logits(span(head.embed_tokens(ids), cache, 0))
    out = [int(logits[-1].argmax())]
    while len(out) < n:
        logits = head.logits(span(head.embed_tokens(out[-1:]), cache, len(ids) + len(out) - 1))
        out.append(int(logits[-1].argmax()))
    return out


def block_latency(span: Span, hidden_size: int, context: int, blocks: list[int], repeats: int) -> dict[int, float]:
    """Median seconds of one forward of each block size after `context` cached positions (every
    block is written at the same positions, as a rolled-back draft block is)."""
    cache = span.new_cache(context + max(blocks))
    span(torch.randn(1, context, hidden_size, dtype=span.dtype), cache, 0)
    latency = {}
    for block in blocks:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            span(torch.randn(1, block, hidden_size, dtype=span.dtype), cache, context)
            times.append(time.perf_counter() - t0)
        latency[block] = statistics.median(times)
    return latency


def forced_choices(head: Head, span: Span, ids: list[int], reference: list[int]) -> list[int]:
    """The greedy choice at each reference position, given the prompt and the reference before it."""
    cache = span.new_cache(len(ids) + len(reference))
    logits = head.logits(span(head.embed_tokens(ids + reference[:-1]), cache, 0))
    return logits[len(ids) - 1:].argmax(dim=-1).tolist()


def agreement(choices: list[list[int]], reference: list[list[int]]) -> dict:
    first_diff = [next((i for i, (x, y) in enumerate(zip(c, r)) if x != y), len(r)) for c, r in zip(choices, reference)]
    same = [sum(x == y for x, y in zip(c, r)) for c, r in zip(choices, reference)]
    return {"problems": len(choices), "identical": sum(d == len(r) for d, r in zip(first_diff, reference)),
            "mean_prefix_share": statistics.mean(d / len(r) for d, r in zip(first_diff, reference)),
            "position_share": sum(same) / sum(len(r) for r in reference), "first_difference": first_diff}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--problems", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--blocks", default="1,8,32")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latency-modes", default=",".join(QUANT_MODES), help="modes whose block latency is measured")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench-results/quant/qwen2.5-coder-1.5b.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    blocks = [int(b) for b in a.blocks.split(",") if b]
    model_dir = resolve_model_dir(a.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    head = Head.load(model_dir, torch.bfloat16)
    n_layers, hidden = head.config.num_hidden_layers, head.config.hidden_size
    problems = load_dataset("humaneval", a.problems)
    prompts = [encode_chat(tok, chat_messages(pr)) for pr in problems]
    report = {"command": " ".join(["python", "scripts/quant_bench.py", *sys.argv[1:]]), "model": a.model,
              "threads": a.threads, "new_tokens": a.new_tokens, "context": a.context, "machine": machine_info(),
              "load_before": os.getloadavg(), "modes": {}, "problems": []}
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        a.out.write_text(json.dumps(report, indent=1))

    spans = {}
    with torch.inference_mode():
        for mode in QUANT_MODES:
            span = Span.load(model_dir, 0, n_layers, torch.bfloat16)
            quantize_layers(span.layers, mode, torch.bfloat16)
            spans[mode] = span
            sizes = [stored_bytes(layer) for layer in span.layers]
            timed = blocks and mode in a.latency_modes.split(",")
            latency = block_latency(span, hidden, a.context, blocks, a.repeats) if timed else {}
            report["modes"][mode] = {"layer0_bytes": sizes[0], "mean_layer_bytes": statistics.mean(sizes),
                                     "block_latency_s": latency}
            print(f"{mode:5} layer 0 {sizes[0] / 2**20:7.2f} MiB, mean layer {statistics.mean(sizes) / 2**20:7.2f} MiB"
                  + (f"; whole model, block after {a.context}: " if latency else "")
                  + ", ".join(f"{b}: {s * 1000:.0f} ms" for b, s in latency.items()), flush=True)
            save()
        reference: list[list[int]] = []
        choices: dict[str, list[list[int]]] = {mode: [] for mode in QUANT_MODES[1:]}
        for problem, ids in zip(problems, prompts):
            t0 = time.perf_counter()
            reference.append(greedy(head, spans["none"], ids, a.new_tokens))
            row = {"id": problem.id, "prompt_tokens": len(ids), "none_tokens": reference[-1], "choices": {},
                   "seconds": {"none": time.perf_counter() - t0}}
            for mode in choices:
                t0 = time.perf_counter()
                choices[mode].append(forced_choices(head, spans[mode], ids, reference[-1]))
                row["choices"][mode], row["seconds"][mode] = choices[mode][-1], time.perf_counter() - t0
                report["modes"][mode]["agreement_with_none"] = agreement(choices[mode], reference)
            report["problems"].append(row)
            report["load_after"] = os.getloadavg()
            save()
            print(f"{problem.id} ({len(ids)} prompt tokens): " + ", ".join(
                f"{m} first differs at {report['modes'][m]['agreement_with_none']['first_difference'][-1]} "
                f"({row['seconds'][m]:.0f} s)" for m in choices) + f", none {row['seconds']['none']:.0f} s", flush=True)
    for mode in choices:
        g = report["modes"][mode]["agreement_with_none"]
        print(f"{mode:5} greedy == bf16: {g['identical']}/{g['problems']} problems, {g['mean_prefix_share']:.0%} of "
              f"tokens before the first difference, {g['position_share']:.0%} of choices given bf16's prefix", flush=True)


if __name__ == "__main__":
    main()
