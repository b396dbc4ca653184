"""Per quantization mode (none = bfloat16, int8, int4): bytes per layer, block latency and greedy
agreement with bfloat16 on the real model, on this CPU. Usage:

    python scripts/quant_bench.py [--model qwen2.5-coder-1.5b] [--modes none,int8,int4] [--blocks 1,8,32]
        [--context 64] [--repeats 3] [--problems 20] [--shard 0/1] [--new-tokens 32] [--threads 1]
        [--out bench-results/quant/qwen2.5-coder-1.5b.json]
    python scripts/quant_bench.py --modes int8 --blocks "" --reference NONE.json --out INT8.json
    python scripts/quant_bench.py --combine PART.json [PART.json ...] --out ALL.json

The whole model runs as one span per mode in this process (no swarm, no draft), one mode loaded at a
time (the 1.5B: about 3 GB in bfloat16, less once quantized), in the order of --modes. For each mode:
its memory per layer (stored bytes of layer 0 and the mean over all layers, bitsandbytes' scales
included); its block latency (median of --repeats forwards of a block of B random hidden states after
--context cached positions; --blocks "" skips it); then its part of the greedy agreement over the
problems of this shard (HumanEval, the bench's own chat prompt; --shard I/N takes problems I, I+N, ...
of the first --problems, so N processes can split them; --problems 0 skips it). bfloat16 ("none",
which must come first, or be read from the --reference JSON another process is writing: then each
problem waits until its bfloat16 tokens are there) decodes its first --new-tokens greedy tokens; each quantized mode gives its
greedy choice at every one of those positions given bfloat16's tokens before it (one forward over
prompt + tokens: teacher forcing). The quantized mode's own greedy text equals bfloat16's up to the
first position where its choice differs, so this gives exactly how far the two greedy texts agree,
at the cost of one block instead of --new-tokens decoding steps. The JSON is rewritten after every
problem, so a run cut short keeps what it finished. --combine merges shards' JSON and reports, per
mode: problems whose --new-tokens greedy tokens equal bfloat16's, the mean share of tokens before the
first difference, and the share of positions whose choice given the same prefix equals bfloat16's.
Parts are merged by problem: bfloat16's tokens from whichever part has them, each mode's choices
from the part that computed them."""

from __future__ import annotations

import argparse
import gc
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


def agreement(rows: list[dict], mode: str) -> dict:
    """How far `mode`'s greedy text agrees with bfloat16's, over the rows (problems) it has choices for."""
    done = [r for r in rows if mode in r["choices"]]
    if not done:
        return {"problems": 0}
    first_diff = [next((i for i, (x, y) in enumerate(zip(r["choices"][mode], r["none_tokens"])) if x != y),
                       len(r["none_tokens"])) for r in done]
    same = sum(sum(x == y for x, y in zip(r["choices"][mode], r["none_tokens"])) for r in done)
    return {"problems": len(done), "identical": sum(d == len(r["none_tokens"]) for d, r in zip(first_diff, done)),
            "mean_prefix_share": statistics.mean(d / len(r["none_tokens"]) for d, r in zip(first_diff, done)),
            "position_share": same / sum(len(r["none_tokens"]) for r in done),
            "first_difference": dict(zip((r["id"] for r in done), first_diff))}


def print_agreement(rows: list[dict]) -> dict[str, dict]:
    result = {}
    for mode in QUANT_MODES[1:]:
        g = result[mode] = agreement(rows, mode)
        if g["problems"]:
            print(f"{mode:5} greedy == bf16: {g['identical']}/{g['problems']} problems, {g['mean_prefix_share']:.0%} "
                  f"of tokens before the first difference, {g['position_share']:.0%} of choices given bf16's prefix",
                  flush=True)
    return result


def combine(shards: list[Path], out: Path) -> None:
    reports = [json.loads(p.read_text()) for p in shards]
    by_id: dict[str, dict] = {}
    for rep in reports:
        for r in rep["problems"]:
            row = by_id.setdefault(r["id"], {"id": r["id"], "prompt_tokens": r["prompt_tokens"], "choices": {},
                                             "seconds": {}})
            row["choices"].update(r["choices"])
            row["seconds"].update(r["seconds"])
            if "none_tokens" in r:
                row["none_tokens"] = r["none_tokens"]
    rows = sorted((r for r in by_id.values() if "none_tokens" in r), key=lambda r: int(r["id"].split("/")[1]))
    merged = {"shards": [{"file": str(p), "command": rep["command"], "machine": rep["machine"],
                          "load_before": rep["load_before"], "load_after": rep.get("load_after")}
                         for p, rep in zip(shards, reports)],
              "problems": rows}
    merged["agreement_with_none"] = print_agreement(rows)
    out.write_text(json.dumps(merged, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--modes", default=",".join(QUANT_MODES))
    p.add_argument("--problems", type=int, default=20)
    p.add_argument("--shard", default="0/1", help="I/N: problems I, I+N, I+2N, ... of the first --problems")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--blocks", default="1,8,32")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reference", type=Path, help="bfloat16's tokens from this JSON (of a --modes none run)")
    p.add_argument("--wait", type=float, default=7200, help="seconds to wait for --reference's tokens of a problem")
    p.add_argument("--combine", type=Path, nargs="+", help="merge these parts' JSON into --out")
    p.add_argument("--out", type=Path, default=Path("bench-results/quant/qwen2.5-coder-1.5b.json"))
    a = p.parse_args()
    if a.combine:
        return combine(a.combine, a.out)
    torch.set_num_threads(a.threads)
    modes = a.modes.split(",")
    if a.problems and modes[0] != "none" and a.reference is None:
        sys.exit("greedy agreement needs bfloat16 (none) first in --modes, or --reference")
    blocks = [int(b) for b in a.blocks.split(",") if b]
    shard, shards = (int(x) for x in a.shard.split("/"))
    model_dir = resolve_model_dir(a.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    head = Head.load(model_dir, torch.bfloat16)
    n_layers, hidden = head.config.num_hidden_layers, head.config.hidden_size
    problems = load_dataset("humaneval", a.problems)[shard::shards] if a.problems else []
    prompts = [encode_chat(tok, chat_messages(pr)) for pr in problems]
    report = {"command": " ".join(["python", "scripts/quant_bench.py", *sys.argv[1:]]), "model": a.model,
              "threads": a.threads, "new_tokens": a.new_tokens, "context": a.context, "machine": machine_info(),
              "load_before": os.getloadavg(), "modes": {},
              "problems": [{"id": pr.id, "prompt_tokens": len(ids), "choices": {}, "seconds": {}}
                           for pr, ids in zip(problems, prompts)]}
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["load_after"] = os.getloadavg()
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(a.out)  # whole files only: another process may be reading it as --reference

    def reference_tokens(row: dict) -> list[int]:
        """bfloat16's tokens for this problem, from this run or, once written there, --reference."""
        deadline = time.monotonic() + a.wait
        while "none_tokens" not in row:
            if a.reference is not None and a.reference.exists():
                theirs = {r["id"]: r for r in json.loads(a.reference.read_text())["problems"]}
                if "none_tokens" in theirs.get(row["id"], {}):
                    row["none_tokens"] = theirs[row["id"]]["none_tokens"]
                    break
            if time.monotonic() > deadline:
                sys.exit(f"no bfloat16 tokens for {row['id']} after {a.wait:.0f} s")
            time.sleep(10)
        return row["none_tokens"]

    with torch.inference_mode():
        for mode in modes:
            span = Span.load(model_dir, 0, n_layers, torch.bfloat16)
            quantize_layers(span.layers, mode, torch.bfloat16)
            gc.collect()
            sizes = [stored_bytes(layer) for layer in span.layers]
            latency = block_latency(span, hidden, a.context, blocks, a.repeats) if blocks else {}
            report["modes"][mode] = {"layer0_bytes": sizes[0], "mean_layer_bytes": statistics.mean(sizes),
                                     "block_latency_s": latency}
            print(f"{mode:5} layer 0 {sizes[0] / 2**20:7.2f} MiB, mean layer {statistics.mean(sizes) / 2**20:7.2f} MiB"
                  + (f"; whole model, block after {a.context}: " if latency else "")
                  + ", ".join(f"{b}: {s * 1000:.0f} ms" for b, s in latency.items()), flush=True)
            save()
            for row, ids in zip(report["problems"], prompts):
                if mode == "none":
                    t0 = time.perf_counter()
                    row["none_tokens"] = greedy(head, span, ids, a.new_tokens)
                else:
                    reference = reference_tokens(row)
                    t0 = time.perf_counter()
                    row["choices"][mode] = forced_choices(head, span, ids, reference)
                row["seconds"][mode] = time.perf_counter() - t0
                report["modes"][mode]["agreement_with_none"] = agreement(report["problems"], mode)
                save()
                print(f"{row['id']} ({len(ids)} prompt tokens) {mode}: {row['seconds'][mode]:.0f} s"
                      + (f", first differs at {report['modes'][mode]['agreement_with_none']['first_difference'][row['id']]}"
                         if mode != "none" else ""), flush=True)
            del span
            gc.collect()
    print_agreement(report["problems"])


if __name__ == "__main__":
    main()
