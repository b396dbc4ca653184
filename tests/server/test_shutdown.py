"""SIGTERM: the server withdraws its record, tells open sessions, and exits cleanly."""

import asyncio
import signal
import subprocess
import time

import pytest

from dsdnode.local_swarm import LocalSwarm, start_node
from dsdnode.net.p2p import P2PNode, PeerInfo
from dsdnode.net.wire import ErrorReply, OpenSession, SessionOpened, WireLimits, decode, encode
from dsdnode.net.protocol import SESSION_PROTOCOL as PROTOCOL
from dsdnode.server.node import PARENT_POLL_S

pytestmark = pytest.mark.heavy


def test_sigterm_fails_sessions_cleanly_and_withdraws(smollm2_dir, tmp_path):
    with LocalSwarm("smollm2-135m", [(0, 30)], tmp_path) as swarm:
        server = swarm.servers[0]

        async def scenario():
            node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs)
            try:
                for _ in range(20):  # the first announce may still be on its way
                    if [r.peer_id for r in await node.dht.discover("smollm2-135m")] == [server.peer_id]:
                        break
                    await asyncio.sleep(0.5)
                else:
                    raise AssertionError("the server never showed up on the DHT")
                stream = await node.open_stream(PeerInfo(server.peer_id, tuple(server.info["addrs"])), PROTOCOL)
                await stream.send(encode(OpenSession("s", "smollm2-135m", 0, 30, 32, None, None, "float32", server.info["weights"])))
                assert isinstance(decode(await stream.recv(timeout=20), WireLimits()), SessionOpened)
                server.proc.send_signal(signal.SIGTERM)
                reply = decode(await stream.recv(timeout=30), WireLimits())
                exit_code = await asyncio.to_thread(server.proc.wait, 30)
                records = await node.dht.discover("smollm2-135m")
                return reply, exit_code, records
            finally:
                await node.stop()

        reply, exit_code, records = asyncio.run(scenario())
    assert isinstance(reply, ErrorReply) and reply.code == "shutting_down" and reply.session_id == "s"
    assert exit_code == 0
    assert records == []  # withdrawn, not just left to expire


def test_node_stops_when_its_parent_is_gone(tmp_path):
    """A launcher that is SIGKILLed cannot SIGTERM its nodes: --parent-pid makes them notice."""
    parent = subprocess.Popen(["sleep", "600"])
    node = start_node(["--layers", "none"], tmp_path / "bootstrap.log", parent_pid=parent.pid)
    try:
        time.sleep(2 * PARENT_POLL_S)
        assert node.alive()  # the parent is still there
        parent.kill()
        parent.wait()
        assert node.proc.wait(30) == 0  # the normal, clean shutdown path
        assert "parent process" in (tmp_path / "bootstrap.log").read_text()
    finally:
        if node.alive():
            node.proc.kill()
