"""DHT.lookup: one peer's record by peer id, as a server checks the next hop a client names."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from tests.helpers.p2p_node import NodeProcess

from dsdnode.net.p2p import P2PNode

MODEL = "test/model-lookup"


def test_lookup_finds_only_live_records_and_keeps_them_until_they_expire():
    live, withdrawn, short_lived = NodeProcess.start(), None, None
    try:
        bootstrap = [live.addrs[0]]
        with ThreadPoolExecutor(2) as pool:  # each start imports libp2p (~1 s)
            withdrawn, short_lived = pool.map(lambda _: NodeProcess.start(bootstrap=bootstrap), range(2))
        common = dict(model=MODEL, throughput=5.0, free_cache_tokens=100, version="t")
        live.request("announce", record=dict(common, start=0, end=12, expires=time.time() + 300))
        withdrawn.request("announce", record=dict(common, start=12, end=24, expires=time.time() + 300))
        withdrawn.request("withdraw", model=MODEL)
        # 8 s: the record outlives the lookups before it on a loaded machine, and expires in the test
        short_lived.request("announce", record=dict(common, start=12, end=24, expires=time.time() + 8))

        async def scenario():
            node = await P2PNode.start(bootstrap=bootstrap)
            try:
                found = await node.dht.lookup(MODEL, live.peer_id)
                other_model = await node.dht.lookup("test/other-model", live.peer_id)
                gone = await node.dht.lookup(MODEL, withdrawn.peer_id)
                not_an_id = await node.dht.lookup(MODEL, "not a peer id")
                brief = await node.dht.lookup(MODEL, short_lived.peer_id)
                live.stop()  # the record stays trusted until it expires: no query needed
                t0 = time.monotonic()
                cached = await node.dht.lookup(MODEL, live.peer_id)
                cached_s = time.monotonic() - t0
                if brief is None:  # asserted below
                    return found, other_model, gone, not_an_id, brief, None, 0.0, None
                await asyncio.sleep(max(0.0, brief.expires - time.time()) + 0.5)
                expired = await node.dht.lookup(MODEL, short_lived.peer_id)
                return found, other_model, gone, not_an_id, brief, cached, cached_s, expired
            finally:
                await node.stop()

        found, other_model, gone, not_an_id, brief, cached, cached_s, expired = asyncio.run(scenario())
        assert (found.peer_id, found.start, found.end, found.addrs) == (live.peer_id, 0, 12, live.addrs)
        assert other_model is None and gone is None and not_an_id is None
        assert brief is not None and brief.end == 24
        assert cached == found and cached_s < 0.05
        assert expired is None
    finally:
        for proc in (live, withdrawn, short_lived):
            if proc is not None:
                proc.stop()
