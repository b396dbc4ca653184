"""LinkLatency: configuration, and that delays apply per frame without blocking other streams."""

import asyncio
import time

import pytest
from tests.helpers.p2p_node import ECHO, NodeProcess

from dsdnode.net.latency import LinkLatency
from dsdnode.net.p2p import P2PNode

DELAY_MS = 100.0


def test_delay_lookup_and_validation():
    lat = LinkLatency(30.0, {"peerA": 5.0})
    assert lat.delay_s("peerA") == pytest.approx(0.005)
    assert lat.delay_s("peerB") == pytest.approx(0.030)
    assert LinkLatency().delay_s("x") == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            LinkLatency(bad)
    with pytest.raises(TypeError):
        LinkLatency("30")


def test_emulated_latency_applies_and_overlaps():
    with NodeProcess.start() as remote:
        async def main():
            node = await P2PNode.start(latency=LinkLatency(DELAY_MS))
            try:
                streams = [await node.open_stream(remote.peer_info, ECHO) for _ in range(2)]

                async def echo(stream, payload):
                    start = time.perf_counter()
                    await stream.send(payload)
                    assert await stream.recv(timeout=10) == payload
                    return time.perf_counter() - start

                single = await echo(streams[0], b"x" * 1024)
                start = time.perf_counter()
                both = await asyncio.gather(echo(streams[0], b"a"), echo(streams[1], b"b"))
                together = time.perf_counter() - start
                return single, both, together
            finally:
                await node.stop()

        single, both, together = asyncio.run(main())
    delay = DELAY_MS / 1000
    assert single >= delay
    assert min(both) >= delay
    # Serialized delays would take >= 2 * delay; overlapping ones about one delay.
    assert together < 1.7 * delay, (single, both, together)
