"""Measure frame echo RTT between two processes and the asyncio<->trio bridge overhead.

Run from the repository root: .venv/bin/python -m tests.net.bench_p2p   (not a test: timings belong in
benchmarks)
"""

import statistics
import time

import uvloop

from dsdnode.net.p2p import P2PNode
from tests.helpers.p2p_node import ECHO, NodeProcess

REPEATS = 50


async def echo_rtts(stream, size: int) -> list[float]:
    payload = b"x" * size
    out = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        await stream.send(payload)
        await stream.recv(timeout=10)
        out.append(time.perf_counter() - start)
    return out


async def trio_side_rtts(stream, size: int) -> list[float]:
    """Same echo, but send+recv done inside one trio call (no asyncio crossing per frame)."""
    payload = b"x" * size

    async def one() -> float:
        start = time.perf_counter()
        await stream.trio_send(payload)
        await stream.trio_recv(10)
        return time.perf_counter() - start

    return [await stream._bridge.call(one) for _ in range(REPEATS)]


async def main() -> None:
    with NodeProcess.start() as remote:
        node = await P2PNode.start()
        try:
            stream = await node.open_stream(remote.peer_info, ECHO)
            await echo_rtts(stream, 1024)  # warm up (window growth, caches)

            async def noop() -> None:
                return None

            crossings = []
            for _ in range(2000):
                start = time.perf_counter()
                await node.host.bridge.call(noop)
                crossings.append(time.perf_counter() - start)
            print(f"bridge round trip (asyncio->trio->asyncio, no-op): median "
                  f"{statistics.median(crossings) * 1e3:.3f} ms, p90 "
                  f"{sorted(crossings)[int(0.9 * len(crossings))] * 1e3:.3f} ms")
            for size in (1, 1024, 65536, 2**20):
                via_asyncio = await echo_rtts(stream, size)
                in_trio = await trio_side_rtts(stream, size)
                print(f"echo {size:>8} B: asyncio API median {statistics.median(via_asyncio) * 1e3:7.2f} ms "
                      f"(min {min(via_asyncio) * 1e3:6.2f}); trio-side median "
                      f"{statistics.median(in_trio) * 1e3:7.2f} ms")
            rtts = [await node.ping(remote.peer_info) for _ in range(20)]
            print(f"ping: median {statistics.median(rtts) * 1e3:.2f} ms")
        finally:
            await node.stop()


if __name__ == "__main__":
    uvloop.run(main())
