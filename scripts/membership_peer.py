"""One OS process of the membership scale harness (scripts/membership_scale.py): lean DHT peers.

Runs `nodes` P2PNodes (no torch: a DHT peer, a server's network side, or a throw-away id) on one
address, prints `READY {"nodes": [{"peer_id", "addrs"}, ...]}` and serves JSON-lines requests on
stdin (tests/helpers/jsonl_rpc.py; run with the repository root on PYTHONPATH):
  {"op": "announce", "model": M, "start": a, "end": b, "ttl": s}  every node announces a span record
      (optional "version", "weights", "addrs": what the records claim, as a flood copies them)
  {"op": "discover", "model": M}  the first node lists M's servers: {"peers": [...], "seconds": t,
      "records": [{"version", "weights", "addrs", "start", "end"}, ...]}
  {"op": "stop"}
Several nodes per process keep the harness inside a shared machine's memory (each Python process
with libp2p is ~60 MB); `kill -9` of the process ends all of them at once, as a crash would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

from tests.helpers.jsonl_rpc import READY, serve_requests


async def main(config: dict) -> None:
    from dsdnode.net.identity import load_or_create_identity
    from dsdnode.net.p2p import P2PNode
    from dsdnode.net.records import SpanRecord

    client = bool(config.get("client"))
    nodes = await asyncio.gather(*(
        P2PNode.start(identity=load_or_create_identity(None), host=config.get("host", "127.0.0.1"),
                      port=0, bootstrap=config.get("bootstrap", []), client=client, relay_service=False)
        for _ in range(int(config.get("nodes", 1)))))
    print(READY + json.dumps({"nodes": [{"peer_id": n.peer_id, "addrs": n.addrs, "reachability": n.reachability.status,
                                       "routing_table_peers": n.dht.stats()["routing_table_peers"]}
                                      for n in nodes]}), flush=True)
    announcers: list[asyncio.Task] = []

    async def keep_announcing(node: P2PNode, req: dict, first: asyncio.Event) -> None:
        while True:  # like a server: re-announce before the record expires
            # a flood copies what an honest record says (version, weights digest) and any addresses
            rec = SpanRecord(req["model"], req["start"], req["end"], node.peer_id, req.get("addrs") or list(node.addrs),
                             10.0, 4096, req.get("version", "scale"), time.time() + req["ttl"],
                             weights=req.get("weights", ""))
            try:
                await node.dht.announce(rec)
            except Exception as exc:
                logging.warning("announce failed: %r", exc)
            first.set()
            await asyncio.sleep(req["ttl"] / 4)

    async def handle(req: dict) -> dict:
        if req["op"] == "announce":
            events = [asyncio.Event() for _ in nodes]
            announcers.extend(asyncio.create_task(keep_announcing(n, req, e)) for n, e in zip(nodes, events))
            await asyncio.gather(*(e.wait() for e in events))
            return {}
        if req["op"] == "discover":
            start = time.monotonic()
            records = await nodes[0].dht.discover(req["model"])
            return {"peers": [r.peer_id for r in records], "seconds": time.monotonic() - start,
                    "records": [{"version": r.version, "weights": r.weights, "addrs": r.addrs, "start": r.start,
                                 "end": r.end} for r in records],
                    "partial": nodes[0].dht.last_discovery_partial}
        if req["op"] == "stats":
            return {"stats": [n.dht.stats() for n in nodes]}
        if req["op"] != "stop":
            raise ValueError(f"unknown op {req['op']!r}")
        return {}

    await serve_requests(handle)
    for task in announcers:
        task.cancel()
    await asyncio.gather(*(n.stop() for n in nodes))


if __name__ == "__main__":
    import uvloop

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s peer %(levelname)s %(name)s: %(message)s")
    config = json.loads(sys.argv[1])
    if config.get("debug"):  # what each node published where, and which peers a reader asked
        logging.getLogger("dsdnode.net.directory").setLevel(logging.DEBUG)
        logging.getLogger("dsdnode.net.p2p").setLevel(logging.INFO)  # each node's reachability verdict
    uvloop.run(main(config))
