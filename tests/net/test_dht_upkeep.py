"""DHT upkeep with real processes: a restarted bootstrap peer, which comes back knowing nobody, does
not split the swarm: the peers that knew it dial it again, so a newcomer that joins through it
alone still finds a server that announced before the restart."""

import time

import pytest

from dsdnode.net.dht import UPKEEP_INTERVAL_S
from tests.helpers.p2p_node import NodeProcess
from tests.helpers.ports import free_port

MODEL = "test/model-upkeep"


@pytest.mark.heavy
def test_a_restarted_bootstrap_peer_does_not_split_the_swarm(tmp_path):
    key, port = str(tmp_path / "boot.key"), free_port()
    boot = NodeProcess.start(identity=key, port=port)
    server = newcomer = None
    try:
        server = NodeProcess.start(bootstrap=boot.addrs)
        server.request("announce", record=dict(model=MODEL, start=0, end=4, throughput=5.0, free_cache_tokens=100,
                                               version="t", expires=time.time() + 600))
        boot.kill()  # -9: it comes back with the same id and port and an empty routing table
        boot = NodeProcess.start(identity=key, port=port)
        newcomer = NodeProcess.start(bootstrap=boot.addrs)
        deadline = time.monotonic() + 2 * UPKEEP_INTERVAL_S + 15
        found = []
        while time.monotonic() < deadline and not found:
            found = [r["peer_id"] for r in newcomer.request("discover", model=MODEL)["records"]]
            time.sleep(1.0)
        assert found == [server.peer_id]
    finally:
        for proc in (newcomer, server, boot):
            if proc is not None:
                proc.stop()
