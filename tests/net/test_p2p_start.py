"""P2PNode.start refuses what it cannot do well: a busy port, a bad host, a client with no swarm."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from libp2p.peer.id import ID

from dsdnode.net.identity import load_or_create_identity
from dsdnode.net.p2p import BootstrapUnreachable, ListenError, P2PNode, check_listen_address
from tests.helpers.ports import free_port


def closed_bootstrap() -> str:
    """A loopback address nothing listens on, with a valid peer id."""
    peer_id = ID.from_pubkey(load_or_create_identity(None).public_key).to_base58()
    return f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{peer_id}"


def test_port_of_a_running_node_is_refused():
    async def scenario():
        first = await P2PNode.start()
        try:
            port = int(first.addrs[0].split("/tcp/")[1].split("/")[0])
            for host in ("127.0.0.1", "0.0.0.0"):
                with pytest.raises(ListenError, match=f"^port {port} on {host} is already in use$"):
                    await P2PNode.start(port=port, host=host)
            other = await P2PNode.start()  # the first node still serves
            try:
                assert await other.ping(first.info, timeout=10) < 10
            finally:
                await other.stop()
        finally:
            await first.stop()

    asyncio.run(scenario())


def test_reuseport_listener_blocks_the_probe():
    """What py-libp2p does (SO_REUSEPORT) would let a second listener share the port; the probe does not."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(ListenError, match="already in use"):
            check_listen_address("127.0.0.1", port)


def test_port_left_in_time_wait_is_accepted():
    """A node restarting on its port finds only closed connections there (TIME_WAIT): not busy."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn, _ = listener.accept()
        conn.close()  # the listening side closes first, so its end of the connection waits in TIME_WAIT
        time.sleep(0.1)
        client.close()
    check_listen_address("127.0.0.1", port)


@pytest.mark.parametrize("host, port, error", [
    ("localhost", 0, "must be an IPv4 address"),
    ("127.0.0.1", 70000, "must be in 0..65535"),
])
def test_bad_listen_address(host, port, error):
    with pytest.raises(ValueError, match=error):
        check_listen_address(host, port)


def test_address_of_another_machine_is_refused():
    with pytest.raises(ListenError, match="^cannot listen on 192.0.2.1:0: "):
        check_listen_address("192.0.2.1", 0)  # TEST-NET-1: never an address of this machine; nothing is sent


def test_client_without_reachable_bootstrap_fails_a_server_starts_alone():
    async def scenario():
        addr = closed_bootstrap()
        began = time.monotonic()
        with pytest.raises(BootstrapUnreachable, match=r"^cannot reach any bootstrap peer \(.*/tcp/\d+: .+\)$"):
            await P2PNode.start(bootstrap=[addr], require_bootstrap=True)
        assert time.monotonic() - began < 30
        alone = await P2PNode.start(bootstrap=[addr])
        await alone.stop()

    asyncio.run(scenario())
