"""Time to first token of a long prompt over a local swarm with a WAN profile: the prompt prefilled
chunk by chunk (each chunk waits for the one before to come back) against pipelined (chunks back to
back, the hops overlapping them, chunk size chosen from measured costs).

    PYTHONPATH=. python scripts/ttft_prefill.py --model smollm2-135m --servers 4 --wan home-uplink \
        --prompt-tokens 2000 --repeats 2 --out bench-results/ttft.json

Greedy, autoregressive (k=0), 2 new tokens: TTFT is the prefill and one round. Both modes run on
the same swarm, alternating, and must give the same tokens. Prints one JSON line per run and a
summary; --out writes them all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from dsdnode.bench.datasets import load_dataset
from dsdnode.client.loading import load_client_models
from dsdnode.client.local import split_layers
from dsdnode.client.service import ClientService, GenerateOptions, SwarmChains
from dsdnode.client.standing import TrustSettings
from dsdnode.local_swarm import LocalSwarm
from dsdnode.net.p2p import P2PNode
from dsdnode.dtypes import dtype_name
from dsdnode.net.wan import load_profile


def long_prompt(tokenizer, n: int) -> list[int]:
    """HumanEval's problems one after another, cut at n tokens."""
    ids: list[int] = []
    for problem in load_dataset("humaneval", 164):
        ids += tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"HumanEval holds fewer than {n} tokens")


async def measure(swarm: LocalSwarm, client, ids: list[int], repeats: int, servers: int, model: str) -> list[dict]:
    node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs, client=True, identity=swarm.client_identity,
                               latency=swarm.client_links)
    chains = SwarmChains(model, client.head.config, [], client.dtype, weights=client.weights, node=node,
                         trust=TrustSettings(max_records_per_group=servers))
    service = ClientService(client, chains)
    runs = []
    try:
        for attempt in range(30):  # until the DHT shows every span; also opens the connections (not timed)
            try:
                await service.generate(ids[:64], GenerateOptions(max_new_tokens=2, k=0))
                break
            except Exception as e:
                print(f"warm-up: {e}", file=sys.stderr)
                await asyncio.sleep(2)
        for rep in range(repeats):
            for pipeline in (False, True):
                out = await service.generate(ids, GenerateOptions(max_new_tokens=2, k=0, prefill_pipeline=pipeline))
                r = out.result
                run = {"repeat": rep, "prefill": "pipelined" if pipeline else "sequential",
                       "prompt_tokens": len(ids), "ttft_s": round(r.first_token_s, 3), "prefill_s": round(r.prefill_s, 3),
                       "prefill_chunk": r.prefill_chunk, "prefill_bytes_per_link": r.prefill_bytes,
                       "tokens": r.tokens}
                print(json.dumps(run), flush=True)
                runs.append(run)
    finally:
        await node.stop()
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--servers", type=int, default=4)
    ap.add_argument("--wan", default="home-uplink")
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    profile = load_profile(args.wan)
    client = load_client_models(args.model, None, args.dtype, "cpu")
    ids = long_prompt(client.tokenizer, args.prompt_tokens)
    spans = split_layers(client.head.config.num_hidden_layers, args.servers)
    with tempfile.TemporaryDirectory() as work:
        with LocalSwarm(args.model, spans, Path(work), dtype=dtype_name(client.dtype), wan=profile, wan_seed=0) as swarm:
            runs = asyncio.run(measure(swarm, client, ids, args.repeats, args.servers, args.model))
    ttft = {mode: [r["ttft_s"] for r in runs if r["prefill"] == mode] for mode in ("sequential", "pipelined")}
    same = len({tuple(r["tokens"]) for r in runs}) == 1
    summary = {"model": args.model, "dtype": args.dtype, "servers": args.servers, "wan": profile.describe(),
               "prompt_tokens": len(ids), "ttft_s_median": {m: statistics.median(v) for m, v in ttft.items()},
               "ratio_pipelined_over_sequential": statistics.median(ttft["pipelined"]) / statistics.median(ttft["sequential"]),
               "same_tokens": same}
    print(json.dumps(summary), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
