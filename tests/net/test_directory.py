"""The membership directory: the storing side (only verified records, limits per observed network group)
and the publisher (confirmed stores at the closest peers)."""

import asyncio
import contextlib
import time

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID

from dsdnode.net import directory
from dsdnode.net.directory import DirectoryStore, network_group, shard_key, shard_of
from dsdnode.net.p2p import P2PNode
from dsdnode.net.records import SpanRecord, sign_record, verify_record

MODEL = "test/model"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def signed(model: str = MODEL, *, keypair=None, start: int = 0, end: int = 4, issued: float | None = None,
           expires_in: float = 120.0, clock: Clock | None = None):
    """(peer id, directory key, blob) of a fresh record signed by `keypair` (a new one by default)."""
    keypair = keypair or create_new_key_pair()
    peer = ID.from_pubkey(keypair.public_key).to_base58()
    now = clock.now if clock else time.time()
    rec = SpanRecord(model, start, end, peer, ["/ip4/203.0.113.5/tcp/1"], 10.0, 100, "v", now + expires_in,
                     now if issued is None else issued)
    return peer, shard_key(model, shard_of(peer)), sign_record(rec, keypair)


def test_network_group_is_the_observed_24():
    assert network_group("198.51.100.77") == "198.51.100.0/24"
    assert network_group("198.51.100.77") != network_group("198.51.101.77")
    assert network_group(None) == "unknown" and network_group("junk") == "unknown"
    assert network_group("127.0.0.1", peer="A") != network_group("127.0.0.1", peer="B")  # a local swarm
    assert network_group("198.51.100.77", relayed_via="/ip4/203.0.113.9/tcp/4") == "relay:/ip4/203.0.113.9/tcp/4"


def test_stores_only_verified_records_of_their_sender():
    clock = Clock()
    store = DirectoryStore(clock)
    peer, key, blob = signed(clock=clock)
    other, _, _ = signed(clock=clock)
    assert "stores only its own" in store.put(key, blob, other, "a")  # relayed by someone else
    assert store.put(shard_key("other/model", 0), blob, peer, "a") == "record does not belong under this key"
    assert store.put(key, blob[:-1] + bytes([blob[-1] ^ 1]), peer, "a")  # tampered: refused
    expired_peer, key_expired, expired = signed(expires_in=-1, clock=clock)
    assert store.put(key_expired, expired, expired_peer, "a").startswith("expired")
    assert store.put(key, blob, peer, "a") == ""
    assert store.get(key) == [blob]
    clock.now += 121  # it expires: dropped when read, and a sweep finds nothing left
    assert store.get(key) == [] and len(store) == 0


def test_newer_record_of_a_peer_replaces_its_older_one_and_a_withdrawal_replaces_a_live_one():
    clock = Clock()
    store = DirectoryStore(clock)
    keypair = create_new_key_pair()
    peer, key, first = signed(keypair=keypair, issued=clock.now, clock=clock)
    _, _, second = signed(keypair=keypair, issued=clock.now + 1, clock=clock)
    _, _, withdrawn = signed(keypair=keypair, start=0, end=0, issued=clock.now + 2, clock=clock)
    assert store.put(key, second, peer, "a") == ""
    assert store.put(key, first, peer, "a") == "an equal or newer record is stored"
    assert store.put(key, withdrawn, peer, "a") == ""
    assert [verify_record(b).withdrawn for b in store.get(key)] == [True]


def test_fifty_throwaway_ids_from_one_network_hide_no_honest_server():
    clock = Clock()
    store = DirectoryStore(clock)
    honest = []
    for group in ("198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24"):
        for _ in range(3):
            peer, key, blob = signed(clock=clock)
            assert store.put(key, blob, peer, group) == ""
            honest.append((key, blob))
    for _ in range(50):  # the flood: fresh ids, valid signatures, one network
        clock.now += 0.01
        peer, key, blob = signed(clock=clock)
        assert store.put(key, blob, peer, "10.66.0.0/24") == ""  # it displaces its own network's oldest
    for key, blob in honest:
        assert blob in store.get(key)
    for shard in range(directory.SHARDS):
        assert store.groups(shard_key(MODEL, shard)).get("10.66.0.0/24", 0) <= directory.MAX_PER_GROUP_PER_KEY


def test_one_network_signing_made_up_models_is_capped_in_total():
    clock = Clock()
    store = DirectoryStore(clock)
    keypair = create_new_key_pair()
    reasons = []
    for i in range(directory.MAX_ENTRIES_PER_GROUP + 20):
        peer, key, blob = signed(f"made-up/{i}", keypair=keypair, clock=clock)
        reasons.append(store.put(key, blob, peer, "10.66.0.0/24"))
    assert reasons.count("") == directory.MAX_ENTRIES_PER_GROUP
    assert all("holds" in r for r in reasons[directory.MAX_ENTRIES_PER_GROUP:])
    peer, key, blob = signed(clock=clock)  # another network still gets in
    assert store.put(key, blob, peer, "198.51.100.0/24") == ""


def test_a_full_key_displaces_the_largest_network_not_a_small_one(monkeypatch):
    monkeypatch.setattr(directory, "MAX_ENTRIES_PER_KEY", 6)
    clock = Clock()
    store = DirectoryStore(clock)
    keypair_by_shard: dict[int, list] = {}
    while min((len(v) for v in keypair_by_shard.values()), default=0) < 8 or len(keypair_by_shard) < directory.SHARDS:
        kp = create_new_key_pair()
        keypair_by_shard.setdefault(shard_of(ID.from_pubkey(kp.public_key).to_base58()), []).append(kp)
    pairs = keypair_by_shard[0]
    stored = []
    for i, kp in enumerate(pairs[:6]):  # 5 from a big network, 1 from a small one: the key is full
        clock.now += 1
        peer, key, blob = signed(keypair=kp, clock=clock)
        assert store.put(key, blob, peer, "big" if i < 5 else "small") == ""
        stored.append(blob)
    clock.now += 1
    peer, key, blob = signed(keypair=pairs[6], clock=clock)
    assert store.put(key, blob, peer, "other") == ""  # displaces the big network's oldest
    assert stored[0] not in store.get(key) and stored[5] in store.get(key)
    assert store.groups(key) == {"big": 4, "small": 1, "other": 1}


def test_a_repeated_put_of_the_same_record_is_confirmed():
    """A publisher whose first answer got lost puts again; the storing peer says stored, not refused."""
    clock = Clock()
    store = DirectoryStore(clock)
    peer, key, blob = signed(clock=clock)
    assert store.put(key, blob, peer, "a") == "" and store.put(key, blob, peer, "a") == ""
    assert store.get(key) == [blob] and store.groups(key) == {"a": 1}


class FirstPutLost(DirectoryStore):
    """A busy storing peer: the first put of each (key, sender) fails before it is stored or answered
    (as when its handler is reset or times out), later ones are stored."""

    def __init__(self) -> None:
        super().__init__(time.time)
        self.seen: set[tuple[bytes, str]] = set()

    def put(self, key: bytes, blob: bytes, sender: str, group: str) -> str:
        if (key, sender) not in self.seen:
            self.seen.add((key, sender))
            raise RuntimeError("busy: request dropped")
        return super().put(key, blob, sender, group)


@contextlib.asynccontextmanager
async def loopback_dht(peers: int):
    """A bootstrap host and `peers` DHT hosts on loopback, in this process; yields (bootstrap address,
    the hosts): a test appends the hosts it starts, and every one is stopped at the end."""
    boot = await P2PNode.start(relay_service=False)
    nodes = [boot]
    try:
        addr = f"{boot.addrs[0]}/p2p/{boot.peer_id}"
        nodes += await asyncio.gather(*(P2PNode.start(bootstrap=[addr], relay_service=False) for _ in range(peers)))
        yield addr, nodes
    finally:
        for node in nodes:
            await node.stop()


def test_a_put_lost_at_the_closest_peers_is_put_again_where_readers_ask():
    """Readers ask a shard key's closest peers. Measured in a namespaced swarm on a loaded machine: a
    server's puts to exactly those peers went unanswered, its record landed only elsewhere, and no
    reader listed it until it announced again. The publisher must put again until the closest hold
    it. Real libp2p hosts on loopback, in one process."""
    async def body() -> None:
        async with loopback_dht(5) as (addr, nodes):
            for node in nodes:
                node.dht.directory.store = FirstPutLost()
            server = await P2PNode.start(bootstrap=[addr], relay_service=False)
            nodes.append(server)
            rec = SpanRecord(MODEL, 0, 4, server.peer_id, list(server.addrs), 10.0, 100, "v", time.time() + 120)
            await server.dht.announce(rec)
            key = shard_key(MODEL, shard_of(server.peer_id))
            storing = {ID.from_base58(n.peer_id): n for n in nodes[:-1]}
            closest = sort_peer_ids_by_distance(key, list(storing))[:directory.REPLICAS]
            holders = [p for p in closest
                       if any(verify_record(b).peer_id == server.peer_id for b in storing[p].dht.directory.store.get(key))]
            assert holders == closest, f"{len(holders)} of the {len(closest)} closest peers hold the record"
            reader = await P2PNode.start(bootstrap=[addr], client=True)
            nodes.append(reader)
            assert [r.peer_id for r in await reader.dht.discover(MODEL)] == [server.peer_id]

    asyncio.run(body())


def test_a_node_that_lost_every_peer_files_its_record_at_once_after_joining_again():
    """Seen in a namespaced swarm under load: a node that had just joined lost every peer (py-libp2p
    drops a peer from the routing table when a query's stream to it fails, and refuses for 60 s to
    dial a peer whose addresses all failed once), filed its record at nobody, and its re-join failed
    at once, so no reader listed it until its next announce. It must dial its bootstrap peer anyway
    and file the record within seconds. Real libp2p hosts on loopback, in one process."""
    async def body() -> None:
        async with loopback_dht(3) as (addr, nodes):
            server = await P2PNode.start(bootstrap=[addr], relay_service=False)
            nodes.append(server)

            async def lose_everyone() -> None:  # on the server's trio thread
                libp2p, kad = server.host.libp2p, server.host.kad
                for peer in list(libp2p.get_peerstore().peer_ids()):
                    if peer != libp2p.get_id():
                        libp2p.get_network()._negative_peer_cache.mark_failed(str(peer))
                        kad.routing_table.remove_peer(peer)
                        await libp2p.disconnect(peer)

            await server.host.bridge.call(lose_everyone)
            assert server.dht.stats()["routing_table_peers"] == 0
            started = time.monotonic()
            await server.dht.announce(SpanRecord(MODEL, 0, 4, server.peer_id, list(server.addrs), 10.0, 100, "v",
                                                 time.time() + 120))
            key = shard_key(MODEL, shard_of(server.peer_id))
            holders: list[str] = []
            while not holders and time.monotonic() - started < 10:  # peers readers ask, not the server itself
                holders = [n.peer_id for n in nodes[:-1]
                           if any(verify_record(b).peer_id == server.peer_id for b in n.dht.directory.store.get(key))]
                await asyncio.sleep(0.5)
            assert holders, "no peer holds the record 10 s after the announce"

    asyncio.run(body())


def test_a_reader_that_lost_every_peer_joins_again_and_lists_the_servers():
    """Seen in the scale harness under a flood on a loaded machine: the reader's routing table
    emptied and every discover() listed nothing, in milliseconds, for minutes. A discover() with
    nobody to ask joins again first. Real libp2p hosts on loopback, in one process."""
    async def body() -> None:
        async with loopback_dht(3) as (addr, nodes):
            server = nodes[-1]
            await server.dht.announce(SpanRecord(MODEL, 0, 4, server.peer_id, list(server.addrs), 10.0, 100, "v",
                                                 time.time() + 120))
            reader = await P2PNode.start(bootstrap=[addr], client=True)
            nodes.append(reader)

            async def lose_everyone() -> None:  # on the reader's trio thread
                libp2p, kad = reader.host.libp2p, reader.host.kad
                for peer in list(kad.routing_table.get_peer_ids()):
                    kad.routing_table.remove_peer(peer)
                    await libp2p.disconnect(peer)

            await reader.host.bridge.call(lose_everyone)
            assert [r.peer_id for r in await reader.dht.discover(MODEL)] == [server.peer_id]

    asyncio.run(body())


def test_a_key_holding_more_records_than_one_request_fits_is_listed_whole():
    """Seen in the scale harness: once a shard key held more records than a request may be long (a
    few KiB: departed servers' records live until they expire, and a flood adds its own), every
    storing peer failed to send its answer and readers listed no server of that shard. Real libp2p
    hosts on loopback, in one process; 40 servers' records stored at every peer."""
    async def body() -> None:
        async with loopback_dht(3) as (addr, nodes):
            servers = set()
            for i in range(40):
                peer, key, blob = signed()
                servers.add(peer)
                for node in nodes:
                    assert node.dht.directory.store.put(key, blob, peer, f"10.{i}.0.0/24") == ""
            biggest = max(sum(map(len, n.dht.directory.store.get(shard_key(MODEL, s)))) for n in nodes[:1]
                          for s in range(directory.SHARDS))
            assert biggest > directory.MAX_REQUEST_BYTES
            reader = await P2PNode.start(bootstrap=[addr], client=True)
            nodes.append(reader)
            assert {r.peer_id for r in await reader.dht.discover(MODEL)} == servers

    asyncio.run(body())
