"""What `--private-layers N` costs the client (client/private.py): memory per layer, time per round
and per generation, against N = 0, over one real server on loopback.

One server process holds every layer of MODEL (float32, 1 torch thread; sessions use the sub-span
from N on). Each N runs in a fresh client process (so its RSS is its own): it connects with
private_layers=N, then generates NEW greedy tokens REPEATS times each plainly (k=0: one position a
round) and speculatively (k=4, MODEL drafting for itself: 5 positions a round). Prints one JSON line
per N, then each layer's weight bytes and KV bytes per 1k positions for MODEL and for the default
target (qwen2.5-coder-1.5b in bfloat16), computed from the loaded tensors.

    flock /work/measure.lock timeout 1800 python scripts/privacy_cost.py --private 0,4,8,15
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "def fibonacci(n):\n    "


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def one(model: str, bootstrap: str, private: int, new: int, repeats: int) -> dict:
    import torch

    import dsdnode

    torch.set_num_threads(1)
    before = rss_mb()
    with dsdnode.connect(model, bootstrap=[bootstrap], private_layers=private, draft=model, dtype="float32") as c:
        loaded = rss_mb()
        c.generate(PROMPT, chat=False, max_new_tokens=4, k=0)  # warm-up: routing, first session
        out = {"private_layers": private, "client_rss_mb": round(loaded, 1), "rss_before_connect_mb": round(before, 1)}
        for k in (0, 4):
            runs = [c.generate(PROMPT, chat=False, max_new_tokens=new, k=k) for _ in range(repeats)]
            rounds = [r.round_s for g in runs for r in g.result.rounds]
            # the client's own layers: the first hop's compute of each round (on separate machines, what
            # the client adds to a round; here client and server share the cores, so a round's time moves
            # between them rather than grows)
            local = [r.hop_compute_s[0] for g in runs for r in g.result.rounds] if private else [0.0]
            out[f"k{k}"] = {"generation_s": round(statistics.median(g.result.decode_s for g in runs), 3),
                            "round_ms": round(1e3 * statistics.median(rounds), 2),
                            "private_layers_ms_per_round": round(1e3 * statistics.median(local), 2),
                            "route": [list(h) for h in runs[0].route][:1],
                            "tokens_equal": len({tuple(g.tokens) for g in runs}) == 1}
        out["client_peak_rss_mb"] = round(rss_mb(), 1)
    return out


def layer_costs(model: str, dtype_name: str) -> dict:
    import torch

    from dsdnode.models.families import kv_bytes
    from dsdnode.models.fetch import resolve_model_dir
    from dsdnode.models.span import Span

    dtype = getattr(torch, dtype_name)
    span = Span.load(resolve_model_dir(model), 0, 1, dtype)
    weights = sum(p.numel() * p.element_size() for p in span.layers.parameters())
    return {"model": model, "dtype": dtype_name, "weights_mb_per_layer": round(weights / 2**20, 2),
            "kv_mb_per_layer_per_1k_positions": round(kv_bytes(span.config, 1, 1024, dtype) / 2**20, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--private", default="0,4,8,15")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one N
    ap.add_argument("--bootstrap", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.model, a.bootstrap, a.one, a.new, a.repeats)), flush=True)
        return
    from dsdnode.local_swarm import LocalSwarm
    from dsdnode.models.weights import load_config
    from dsdnode.models.fetch import resolve_model_dir

    layers = load_config(resolve_model_dir(a.model)).num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp, \
            LocalSwarm(a.model, [(0, layers)], Path(tmp), dtype="float32", threads=1) as swarm:
        time.sleep(3)  # the server's record reaches the bootstrap peer
        for n in [int(x) for x in a.private.split(",")]:
            done = subprocess.run([sys.executable, __file__, "--model", a.model, "--one", str(n), "--new", str(a.new),
                                   "--repeats", str(a.repeats), "--bootstrap", swarm.bootstrap_addrs[0]],
                                  capture_output=True, text=True, timeout=900)
            if done.returncode:
                sys.exit(f"private_layers={n} failed: {done.stderr[-2000:]}")
            print(done.stdout.strip().splitlines()[-1], flush=True)
    for model, dtype in ((a.model, "float32"), ("qwen2.5-coder-1.5b", "bfloat16")):
        print(json.dumps(layer_costs(model, dtype)), flush=True)


if __name__ == "__main__":
    main()
