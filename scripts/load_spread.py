"""Load spread over replicas, with real servers: do concurrent clients pile onto one replica?

A local swarm (real server processes, real weights) serves the model in `--spans` spans, each by
`--replicas` servers. `--clients` client-mode nodes in this process (each its own peer id and
ClientService, sharing the client's models) start one generation each at the same moment
(autoregressive, `--tokens` new tokens, no audits, so each client opens exactly one session).
The route each session took is counted per server; the result is, per span, the sessions each
replica served and the busiest replica's share (the membership target: at most 65 % with 2
replicas and 8 clients). Prints one JSON line (and writes it to --out).

    PYTHONPATH=. python scripts/load_spread.py --clients 8 --replicas 2 --out bench-results/membership/load-spread.json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from dsdnode.client.loading import load_client_models
from dsdnode.client.local import split_layers
from dsdnode.client.service import ClientService, GenerateOptions, SwarmChains
from dsdnode.local_swarm import LocalSwarm
from dsdnode.net.p2p import P2PNode
from tests.helpers.jsonl_rpc import print_result

PROMPT = "def fibonacci(n):"
ROUTE_WAIT_S = 300.0


class RecordedChains(SwarmChains):
    """SwarmChains that keep every chain they make, to read the route each session took."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chains: list = []

    def new_chain(self, audit: bool = True, require_audit: bool = False, wire: str = "exact"):
        chain = super().new_chain(audit, require_audit, wire)
        self.chains.append(chain)
        return chain


async def wave(swarm: LocalSwarm, models, clients: int, tokens: int) -> list[list[tuple[str, int, int]]]:
    """One generation per client, all started together; the route of each."""
    ids = models.tokenizer(PROMPT)["input_ids"]
    nodes = await asyncio.gather(*(P2PNode.start(bootstrap=swarm.bootstrap_addrs, client=True) for _ in range(clients)))
    try:
        sources = [RecordedChains(swarm.model, models.head.config, [], models.dtype, weights=models.weights, node=n)
                   for n in nodes]
        services = [ClientService(models, s) for s in sources]
        deadline = time.monotonic() + ROUTE_WAIT_S
        while True:  # every client sees a full chain before the wave starts
            try:
                await asyncio.gather(*(s.check_route() for s in services))
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no full chain after {ROUTE_WAIT_S:g} s: {exc}") from None
                await asyncio.sleep(2)
        options = GenerateOptions(max_new_tokens=tokens, k=0, audit=False)
        await asyncio.gather(*(s.generate(ids, options) for s in services))
        return [s.chains[-1].route for s in sources]
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spans", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--waves", type=int, default=3, help="waves of --clients concurrent clients, one after another")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--logs", type=Path, help="keep the servers' logs here (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = load_client_models(args.model, None, "float32")
    spans = split_layers(models.head.config.num_hidden_layers, args.spans)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="load-spread-") as tmp:
        workdir = args.logs or tmp
        with LocalSwarm(args.model, [s for s in spans for _ in range(args.replicas)], Path(workdir),
                        dtype="float32", own_networks=True) as swarm:
            replicas = {span: [p.peer_id for p, s in zip(swarm.servers, [s for s in spans for _ in range(args.replicas)])
                               if s == span] for span in spans}
            servers = list(swarm.servers)
            routes = [asyncio.run(wave(swarm, models, args.clients, args.tokens)) for _ in range(args.waves)]
    throughput = {p.peer_id: p.info.get("throughput") for p in servers}  # each server's own measure at start
    per_wave, totals = [], Counter()
    for wave_routes in routes:
        counts = Counter(peer for route in wave_routes for peer in {p for p, _, _ in route})  # sessions per server
        totals.update(counts)
        per_span = {f"{a}:{b}": [counts.get(p, 0) for p in peers] for (a, b), peers in replicas.items()}
        per_wave.append({"routes": [[f"{p[-6:]}[{a}:{b})" for p, a, b in route] for route in wave_routes],
                         "sessions_per_replica": per_span,
                         "busiest_share": {k: round(max(v) / max(1, sum(v)), 3) for k, v in per_span.items()}})
    all_waves = {f"{a}:{b}": [totals.get(p, 0) for p in peers] for (a, b), peers in replicas.items()}
    result = {"model": args.model, "spans": args.spans, "replicas": args.replicas, "clients": args.clients,
              "tokens": args.tokens, "waves": per_wave,
              "announced_throughput": {f"{a}:{b}": [throughput[p] for p in peers] for (a, b), peers in replicas.items()},
              "busiest_share_max": max(s for w in per_wave for s in w["busiest_share"].values()),
              "busiest_share_mean": round(sum(s for w in per_wave for s in w["busiest_share"].values())
                                          / sum(len(w["busiest_share"]) for w in per_wave), 3),
              "sessions_per_replica_all_waves": all_waves,
              "busiest_share_all_waves": {k: round(max(v) / max(1, sum(v)), 3) for k, v in all_waves.items()},
              "wall_s": round(time.monotonic() - started, 1)}
    print_result(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
