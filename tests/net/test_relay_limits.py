"""A relay's limits with real processes on loopback (net/relay.py, RelayLimits): a relay R that is no
local swarm (so all of loopback is one network group, as on a machine serving the public), two
servers A and B that act private and want a reservation there, and a client C.

- R holds one reservation per network: A gets it, B (same network) is refused.
- R carries one circuit per dialers' network: C's circuit to A is open, so B's is refused.
- R carries at most 1 MiB/s per circuit: C fetches 3 MiB from A in >= 2 s (one second's burst).
- R cuts a circuit that carries (next to nothing) for 3 s: C's connection to A goes away.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers.p2p_node import NodeProcess

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(300)]
RATE = 1 << 20
IDLE_S = 3.0
LIMITS = {"max_reservations_per_group": 1, "max_circuits_per_group": 1, "circuit_bytes_per_s": RATE,
          "circuit_idle_s": IDLE_S}


def test_relay_limits_per_network_rate_and_idle_cut():
    with NodeProcess.start(relay_limits=LIMITS) as relay:
        boot = [f"{relay.addrs[0]}/p2p/{relay.peer_id}"]
        with NodeProcess.start(bootstrap=boot, assume_private=True) as a, \
                NodeProcess.start(bootstrap=boot, assume_private=True) as b, NodeProcess.start(bootstrap=boot) as c:
            assert a.ready["relays"] == [relay.peer_id]
            assert b.ready["relays"] == []  # refused: A, of the same network, holds its one reservation
            assert all("/p2p-circuit" in addr for addr in a.addrs)
            c.request("ping", peer_id=a.peer_id, addrs=a.addrs)  # opens C's circuit to A
            with pytest.raises(RuntimeError, match="circuits"):  # B's network (loopback) holds its one circuit
                b.request("blob", peer_id=a.peer_id, addrs=a.addrs, n=1)
            got = c.request("blob", peer_id=a.peer_id, addrs=a.addrs, n=3 * RATE, timeout=60)
            assert got["bytes"] == 3 * RATE
            assert got["seconds"] >= 1.8, got  # 3 MiB at 1 MiB/s after a burst of one second's worth
            assert any("/p2p-circuit" in addr for addr in c.request("connections", peer_id=a.peer_id)["addrs"])
            t_idle = time.monotonic()
            while c.request("connections", peer_id=a.peer_id)["addrs"]:
                assert time.monotonic() - t_idle < IDLE_S + 20, "the relay did not cut the idle circuit"
                time.sleep(0.5)
    print(f"3 MiB through the relay in {got['seconds']:.2f} s; idle circuit gone after "
          f"{time.monotonic() - t_idle:.1f} s (limit {IDLE_S:g} s)")
