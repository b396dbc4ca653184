"""A relay's limits with real processes on loopback (net/relay.py, RelayLimits): a relay R that is no
local swarm (so all of loopback is one network group, as on a machine serving the public), two
servers A and B that act private and want a reservation there, and a client C.

- R holds one reservation per network: A gets it, B (same network) is refused.
- R carries at most 1 MiB/s per circuit: C fetches 6 MiB from A in >= 5 s (one second's burst).
- R carries one circuit per dialers' network: while C's circuit to A is busy, B's is refused.
- R cuts a circuit that carries (next to) nothing for 10 s: C's connection to A goes away.

With DSDNODE_SOAK=1 and root, the same in network namespaces, with an attacker's /24, a NATed home
server and a client of a third /24 (the numbers in BENCHMARKS.md).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers.netns import Internet, missing_requirements
from tests.helpers.p2p_node import NodeProcess

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(300)]
RATE = 1 << 20
IDLE_S = 10.0  # long enough that a loaded machine does not idle C's circuit out between two steps
LIMITS = {"max_reservations_per_group": 1, "max_circuits_per_group": 1, "circuit_bytes_per_s": RATE,
          "circuit_idle_s": IDLE_S}


def test_relay_limits_per_network_rate_and_idle_cut():
    with NodeProcess.start(relay_limits=LIMITS) as relay:
        boot = [f"{relay.addrs[0]}/p2p/{relay.peer_id}"]
        with NodeProcess.start(bootstrap=boot, assume_private=True) as a, \
                NodeProcess.start(bootstrap=boot, assume_private=True) as b, \
                NodeProcess.start(bootstrap=boot, client=True) as c:  # listens nowhere: A cannot dial it directly
            assert a.ready["relays"] == [relay.peer_id]
            assert b.ready["relays"] == []  # refused: A, of the same network, holds its one reservation
            assert all("/p2p-circuit" in addr for addr in a.addrs)
            c.request("ping", peer_id=a.peer_id, addrs=a.addrs)  # opens C's circuit to A
            with ThreadPoolExecutor(1) as pool:  # the circuit is busy (never idle) while B tries
                fetch = pool.submit(c.request, "blob", peer_id=a.peer_id, addrs=a.addrs, n=6 * RATE, timeout=120)
                with pytest.raises(RuntimeError, match="circuits"):  # B's network (loopback) holds its one circuit
                    b.request("blob", peer_id=a.peer_id, addrs=a.addrs, n=1)
                got = fetch.result()
            assert got["bytes"] == 6 * RATE
            assert got["seconds"] >= 4.8, got  # 6 MiB at 1 MiB/s after a burst of one second's worth
            assert any("/p2p-circuit" in addr for addr in c.request("connections", peer_id=a.peer_id)["addrs"])
            t_idle = time.monotonic()
            while c.request("connections", peer_id=a.peer_id)["addrs"]:
                assert time.monotonic() - t_idle < IDLE_S + 40, "the relay did not cut the idle circuit"
                time.sleep(0.5)
    print(f"6 MiB through the relay in {got['seconds']:.2f} s; idle circuit gone after "
          f"{time.monotonic() - t_idle:.1f} s (limit {IDLE_S:g} s)")


@pytest.mark.soak  # numbers for BENCHMARKS.md (8 processes in namespaces); the test above checks the limits every run
@pytest.mark.skipif(bool(missing_requirements()), reason=missing_requirements())
def test_one_network_cannot_take_a_relay_from_another(tmp_path):
    """Throw-away peers of one /24 take the reservations and circuits one network may hold at a public
    relay; a NATed server at home still reserves there and a client of a third network fetches from it
    through the relay at the circuit rate. The relay's RSS is printed before and after."""
    limits = {"max_reservations_per_group": 2, "max_circuits_per_group": 2, "circuit_bytes_per_s": RATE}
    with Internet() as net:
        relay_host, attacker_host = net.public("relay"), net.public("attacker", net="198.51.100")
        home, client_host = net.home("honest"), net.public("client", net="192.0.2")
        nodes: list[NodeProcess] = []

        def start(host, **config) -> NodeProcess:
            node = NodeProcess.start(netns=host.ns, host=host.ip, **config)
            host.processes.append(node.proc)
            nodes.append(node)
            return node

        try:
            relay = start(relay_host, relay_limits=limits)
            boot = [f"{relay.addrs[0]}/p2p/{relay.peer_id}"]
            rss_idle = rss_mb(relay.proc.pid)
            squatters = [start(attacker_host, bootstrap=boot, assume_private=True) for _ in range(3)]
            assert sorted(len(s.ready["relays"]) for s in squatters) == [0, 1, 1]  # 2 per network
            held = [s for s in squatters if s.ready["relays"]]
            dialers = [start(attacker_host, bootstrap=boot, client=True) for _ in range(2)]  # reach them only via R
            for target in held:
                dialers[0].request("ping", peer_id=target.peer_id, addrs=target.addrs)
            with pytest.raises(RuntimeError, match="circuits"):  # the network's 2 circuits are taken
                dialers[1].request("ping", peer_id=held[0].peer_id, addrs=held[0].addrs)
            honest = start(home, bootstrap=boot, assume_private=True)
            assert honest.ready["relays"] == [relay.peer_id]
            client = start(client_host, bootstrap=boot, client=True)
            got = client.request("blob", peer_id=honest.peer_id, addrs=honest.addrs, n=3 * RATE, timeout=60)
            rss_after = rss_mb(relay.proc.pid)
        finally:
            for node in nodes:
                node.stop()
    assert got["bytes"] == 3 * RATE and got["seconds"] >= 1.8
    print(f"relay RSS {rss_idle:.0f} -> {rss_after:.0f} MB; 3 squatters of one /24: 2 reservations, 3rd refused; "
          f"its 3rd circuit refused; honest NATed server reserved; client of another /24 fetched 3 MiB through "
          f"the relay in {got['seconds']:.2f} s (1 MiB/s limit)")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
