"""Client-mode nodes and the info protocol, on real libp2p hosts on loopback (one process, fast;
tests/net/test_p2p_clients.py checks the same with real CLI processes against a real swarm).

A client-mode node must still find providers and fetch span records, yet stay out of every
routing table (py-libp2p adds the peer of each inbound DHT query to the table when it has an
address for it: a client listens nowhere, so it has none)."""

import asyncio
import time

import msgpack
import pytest

from dsdnode.net.records import SpanRecord
from dsdnode.net.p2p import INFO_MAX_BYTES, INFO_PROTOCOL, NodeInfo, P2PNode, PeerInfo


def record(node: P2PNode, model: str, start: int, end: int) -> SpanRecord:
    return SpanRecord(model, start, end, node.peer_id, list(node.addrs), 10.0, 1000, "test", time.time() + 60)


async def with_swarm(body, servers: int = 2):
    """A bootstrap peer and `servers` server-mode nodes joined through it; body(boot, servers)."""
    boot = await P2PNode.start()
    nodes = [boot]
    try:
        addr = f"{boot.addrs[0]}/p2p/{boot.peer_id}"
        for _ in range(servers):
            nodes.append(await P2PNode.start(bootstrap=[addr]))
        return await body(boot, nodes[1:])
    finally:
        for node in nodes:
            await node.stop()


def boot_addr(boot: P2PNode) -> str:
    return f"{boot.addrs[0]}/p2p/{boot.peer_id}"


def test_client_mode_discovers_and_leaves_no_routing_table_entry():
    async def body(boot, servers):
        for i, s in enumerate(servers):
            await s.dht.announce(record(s, "m", 10 * i, 10 * i + 10))
        clients = []
        for _ in range(3):
            client = await P2PNode.start(bootstrap=[boot_addr(boot)], require_bootstrap=True, client=True)
            try:
                assert client.addrs == []
                found = await client.dht.discover("m")
                assert [(r.peer_id, r.start) for r in found] == [(s.peer_id, 10 * i) for i, s in enumerate(servers)]
                await client.ping(PeerInfo(servers[0].peer_id, tuple(servers[0].addrs)))
                clients.append(client.peer_id)
            finally:
                await client.stop()
        members = {boot.peer_id, *(s.peer_id for s in servers)}
        for node in (boot, *servers):
            table = {p.peer_id for p in await node.known_peers()}
            assert table and table <= members, f"clients in the routing table: {table - members}"
        # a server-mode "client" (what every client was before) is in the tables: the check above can fail
        server_mode = await P2PNode.start(bootstrap=[boot_addr(boot)], require_bootstrap=True)
        try:
            await server_mode.dht.discover("m")
            assert server_mode.peer_id in {p.peer_id for p in await boot.known_peers()}
        finally:
            await server_mode.stop()

    asyncio.run(with_swarm(body))


def test_info_says_what_a_node_serves_and_whom_it_knows():
    async def body(boot, servers):
        a, b = servers
        await a.dht.announce(record(a, "model-a", 0, 12))
        await b.dht.announce(record(b, "model-b", 3, 9))
        client = await P2PNode.start(bootstrap=[boot_addr(boot)], require_bootstrap=True, client=True)
        try:
            info = await client.ask_info(PeerInfo(a.peer_id, tuple(a.addrs)))
            assert info.models == {"model-a": (0, 12)}
            assert {p.peer_id for p in info.peers} == {boot.peer_id, b.peer_id}
            assert all(p.addrs for p in info.peers)
            assert (await client.ask_info(PeerInfo(boot.peer_id, tuple(boot.addrs)))).models == {}
            await b.dht.withdraw("model-b")
            assert (await client.ask_info(PeerInfo(b.peer_id, tuple(b.addrs)))).models == {}
        finally:
            await client.stop()

    asyncio.run(with_swarm(body))


@pytest.mark.parametrize("answer,match", [
    (b"\x01not msgpack", "malformed info answer"),
    (msgpack.packb({"models": [1, 2]}), "malformed info answer"),
    (msgpack.packb({"models": {f"m{i}": [0, 1] for i in range(300)}, "peers": []}), "too many"),
    (b"x" * (INFO_MAX_BYTES + 1), "> max_frame_bytes"),
])
def test_a_bad_info_answer_is_a_value_error(answer, match):
    async def body(boot, servers):
        liar = servers[0]

        async def lie(stream):
            await stream.recv(timeout=5)
            await stream.send(answer)

        liar.set_stream_handler(INFO_PROTOCOL, lie)
        client = await P2PNode.start(bootstrap=[boot_addr(boot)], require_bootstrap=True, client=True)
        try:
            with pytest.raises(ValueError, match=match):
                await client.ask_info(PeerInfo(liar.peer_id, tuple(liar.addrs)), timeout=5)
        finally:
            await client.stop()

    asyncio.run(with_swarm(body, servers=1))


def test_node_info_round_trips():
    info = NodeInfo("12D3KooWtest", {"a": (0, 4)}, (PeerInfo("12D3KooWother", ("/ip4/127.0.0.1/tcp/1",)),))
    assert NodeInfo.decode("12D3KooWtest", info.encode()) == info
