"""A quick membership check in one process on loopback: a bootstrap peer, N DHT peers, 4 servers
that announce model "m", and a client-mode reader that discovers it 4 times (count, partial, seconds).

    PYTHONPATH=. python scripts/membership_inprocess.py 6
"""

import asyncio
import logging
import sys
import time

from dsdnode.net.p2p import P2PNode
from dsdnode.net.records import SpanRecord


async def main(n: int) -> None:
    t = time.time()
    boot = await P2PNode.start(relay_service=False)
    peers = await asyncio.gather(*(P2PNode.start(bootstrap=boot.addrs, relay_service=False) for _ in range(n)))
    servers = await asyncio.gather(*(P2PNode.start(bootstrap=boot.addrs, relay_service=False) for _ in range(4)))
    reader = await P2PNode.start(bootstrap=boot.addrs, client=True)
    print("up", round(time.time() - t, 1), flush=True)
    for s in servers:
        await s.dht.announce(SpanRecord("m", 0, 4, s.peer_id, s.addrs, 1.0, 10, "v", time.time() + 120))
    print("announced", round(time.time() - t, 1), flush=True)
    for _ in range(4):
        t0 = time.time()
        recs = await reader.dht.discover("m")
        print("found", len(recs), "partial", reader.dht.last_discovery_partial, round(time.time() - t0, 2), flush=True)
    for node in [boot, *peers, *servers, reader]:
        await node.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    asyncio.run(main(int(sys.argv[1])))
