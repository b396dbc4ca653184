"""The membership directory: which servers hold a model's layers, found among hundreds of peers.

Why not Kademlia provider records: py-libp2p 0.8.1 keeps at most 20 providers per key on each
node, first come, for 48 h, so 20 throw-away ids (or the ordinary turnover of a public swarm) hide
every later server. The directory keeps the servers' own signed span records instead, and decides
on the storing side what it keeps, from what it observed:

- **Sharded keys.** A server's record lives under `shard_key(model, shard_of(peer_id))`, one of
  SHARDS keys per model, at the REPLICAS peers closest to that key (Kademlia distance, found with
  the DHT's iterative lookup). A reader asks the REPLICAS closest peers of every shard at once, so
  one lookup costs SHARDS parallel lookups and no peer holds a whole large model's membership.
- **Confirmed stores, wide enough to overlap.** Two nodes' lookups of one key need not agree (a
  reader's view lags peers that just joined; a lookup under load ends early), and a busy peer may
  store a record and answer too late, or not at all. So a publisher counts a put only when the
  storing peer confirmed it, puts again where no answer came and at the next closest (SPARES) for
  each one that never answers; a repeated put of the same record is confirmed, not refused.
  Measured in a 24-peer swarm of network namespaces on a loaded machine: with 4 replicas and one
  put each, servers whose puts to the 4 closest went unanswered, or whose 4 confirmations came from
  peers that had just joined, were listed by nobody until they announced again.
- **Only verified records.** A storing peer keeps a record only if its signature checks, its signer
  is the peer that sent it (over this very connection: a peer stores no record of anyone else), it
  is not expired and it belongs under the key. Expired entries are dropped when a key is read or
  written and by a periodic sweep; a withdraw replaces the live record, so readers drop the server
  at once.
- **Limits per observed network group.** Each entry is charged to the /24 of the IP the storing
  connection actually came from (a relayed connection to its relay), never to anything the record
  claims. One group holds at most MAX_PER_GROUP_PER_KEY entries of a key (a newcomer replaces that
  group's oldest record) and MAX_ENTRIES_PER_GROUP in all. A full key evicts the oldest entry of
  its largest group, only when that group is larger than the newcomer's. So 50 ids from one
  network displace each other, not the honest servers of other networks.
- **Bounded cost.** Every operation touches one key's entries (at most MAX_ENTRIES_PER_KEY), never
  the whole store; the number of keys and the message sizes are bounded.

Servers re-announce every announce interval (records live `record_ttl_s`), which republishes
their entry to whoever is closest to the key by then. Everything here runs on the host's trio
thread.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from .host import Host, PeerInfo, PeerUnreachable
from .records import MAX_RECORD_BYTES, RecordRejected, SignedHeader, SpanRecord, verify_header
from .relay import connection_is_relayed

log = logging.getLogger(__name__)

DIRECTORY_PROTOCOL = TProtocol("/dsdnode/directory/1.0.0")
SHARDS = 4  # directory keys per model
REPLICAS = 8  # closest peers of a shard key that store each record; a reader asks as many
SPARES = 4  # next closest peers a publisher stores at in place of closest ones that do not answer
PUT_ROUNDS = 3  # a publisher's passes over the closest peers until REPLICAS confirmed
MAX_ENTRIES_PER_KEY = 256
MAX_PER_GROUP_PER_KEY = 8  # entries one /24 may hold under one key
MAX_ENTRIES_PER_GROUP = 128  # entries one /24 may hold in all (made-up model names included)
MAX_KEYS = 4096
MAX_REQUEST_BYTES = MAX_RECORD_BYTES + 256
MAX_ANSWER_BYTES = MAX_ENTRIES_PER_KEY * (MAX_RECORD_BYTES + 16) + 64
QUERY_TIMEOUT_S = 10.0  # 5 s timed out healthy peers on the loaded shared 2-core machine
CLOSEST_CACHE_S = 15.0  # how long a shard key's closest peers are reused
CLOSEST_CACHE_KEYS = 1024


def shard_of(peer_id: str) -> int:
    """The shard a peer's records go to (fixed per peer, spread evenly over peers)."""
    return hashlib.sha256(b"dsdnode/dir-shard\x00" + peer_id.encode()).digest()[0] % SHARDS


def shard_key(model: str, shard: int) -> bytes:
    """The Kademlia key of one shard of a model's directory (32 bytes)."""
    return hashlib.sha256(f"dsdnode/dir\x00{model}\x00{shard}".encode()).digest()


def network_group(ip: str | None, relayed_via: str | None = None, peer: str = "") -> str:
    """The group a storing connection is charged to: its IPv4 /24 (IPv6 /48), or the relay it came
    through. On loopback (a local swarm: every peer on one machine) each peer is a group of its own."""
    if relayed_via is not None:
        return f"relay:{relayed_via}"
    try:
        addr = ipaddress.ip_address(ip or "")
    except ValueError:
        return "unknown"
    if addr.is_loopback:
        return f"loopback:{peer}"
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


@dataclass
class _Entry:
    blob: bytes
    record: SignedHeader
    group: str


class DirectoryStore:
    """The entries this peer stores for others, with the limits described in the module docstring."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._keys: dict[bytes, dict[str, _Entry]] = {}
        self._group_totals: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._keys.values())

    def put(self, key: bytes, blob: bytes, sender: str, group: str) -> str:
        """Store `blob` under `key` for `sender`; returns '' if stored, else why not."""
        now = self._clock()
        try:
            rec = verify_header(blob, now)
        except RecordRejected as exc:
            return exc.reason
        if rec.signer != sender:
            return f"record of {rec.signer} sent by {sender}: a peer stores only its own records"
        if shard_key(rec.model, shard_of(rec.signer)) != key:
            return "record does not belong under this key"
        entries = self._keys.get(key)
        if entries is None:
            if len(self._keys) >= MAX_KEYS:
                self.sweep()
                if len(self._keys) >= MAX_KEYS:
                    return "directory full"
            entries = self._keys[key] = {}
        self._drop_expired(key, entries, now)
        old = entries.get(sender)
        if old is not None:
            if old.blob == blob:
                return ""  # a repeated put (its first answer got lost): stored, as asked
            if (old.record.issued, old.record.expires) >= (rec.issued, rec.expires):
                return "an equal or newer record is stored"
            self._remove(key, entries, sender)
        else:
            reason = self._make_room(key, entries, group)
            if reason:
                if not entries:
                    self._keys.pop(key, None)
                return reason
        entries[sender] = _Entry(bytes(blob), rec, group)
        self._keys[key] = entries  # (dropping expired entries may have removed an emptied key)
        self._group_totals[group] = self._group_totals.get(group, 0) + 1
        return ""

    def get(self, key: bytes) -> list[bytes]:
        """The unexpired records under `key` (withdrawals included: they tell readers to drop a server)."""
        entries = self._keys.get(key)
        if entries is None:
            return []
        self._drop_expired(key, entries, self._clock())
        return [e.blob for e in entries.values()]

    def sweep(self) -> int:
        """Drop every expired entry; returns how many."""
        now, dropped = self._clock(), 0
        for key, entries in list(self._keys.items()):
            dropped += self._drop_expired(key, entries, now)
        return dropped

    def groups(self, key: bytes) -> dict[str, int]:
        """Entries per network group under `key` (for tests and stats)."""
        counts: dict[str, int] = {}
        for e in self._keys.get(key, {}).values():
            counts[e.group] = counts.get(e.group, 0) + 1
        return counts

    def _make_room(self, key: bytes, entries: dict[str, _Entry], group: str) -> str:
        """Evict what a newcomer of `group` displaces under `key`; '' if it may be stored, else why not."""
        in_group = [p for p, e in entries.items() if e.group == group]
        if len(in_group) >= MAX_PER_GROUP_PER_KEY:
            self._remove(key, entries, self._oldest(entries, in_group))
        elif self._group_totals.get(group, 0) >= MAX_ENTRIES_PER_GROUP:
            if not in_group:
                return f"network group {group} holds {MAX_ENTRIES_PER_GROUP} directory entries already"
            self._remove(key, entries, self._oldest(entries, in_group))
        if len(entries) >= MAX_ENTRIES_PER_KEY:
            sizes: dict[str, list[str]] = {}
            for p, e in entries.items():
                sizes.setdefault(e.group, []).append(p)
            largest = max(sizes.values(), key=len)
            if len(largest) <= len(sizes.get(group, [])) + 1:
                return "key full and no larger network group to displace"
            self._remove(key, entries, self._oldest(entries, largest))
        return ""

    @staticmethod
    def _oldest(entries: dict[str, _Entry], peers: list[str]) -> str:
        return min(peers, key=lambda p: entries[p].record.issued)

    def _remove(self, key: bytes, entries: dict[str, _Entry], peer: str) -> None:
        entry = entries.pop(peer)
        left = self._group_totals[entry.group] - 1
        if left:
            self._group_totals[entry.group] = left
        else:
            del self._group_totals[entry.group]

    def _drop_expired(self, key: bytes, entries: dict[str, _Entry], now: float) -> int:
        expired = [p for p, e in entries.items() if e.record.expires <= now]
        for peer in expired:
            self._remove(key, entries, peer)
        if not entries:
            self._keys.pop(key, None)
        return len(expired)


def connection_group(libp2p: Any, raw: Any) -> str:
    """The network group of the connection a raw stream runs on, from what the socket says."""
    peer = raw.muxed_conn.peer_id
    if connection_is_relayed(libp2p, peer):
        conns = libp2p.get_network().connections.get(peer, [])
        relays = [str(a) for c in conns for a in (c.get_transport_addresses() or [])]
        return network_group(None, relays[0].split("/p2p-circuit")[0] if relays else "?")
    try:
        remote = raw.get_remote_address()
    except Exception:
        remote = None
    return network_group(str(remote[0]) if remote else None, peer=peer.to_base58())


class DirectoryService:
    """Serves DIRECTORY_PROTOCOL: one request per stream, a put or a get of one key."""

    def __init__(self, host: Host, store: DirectoryStore) -> None:
        self._host = host
        self.store = store

    async def serve(self, raw: Any) -> None:
        stream = self._host.wrap(raw, MAX_REQUEST_BYTES, max_send_bytes=MAX_ANSWER_BYTES)
        sender = raw.muxed_conn.peer_id.to_base58()
        try:
            body = msgpack.unpackb(await stream.trio_recv(timeout=QUERY_TIMEOUT_S), raw=False)
            op, key = body["op"], body["key"]
            if not isinstance(key, bytes) or len(key) != 32:
                raise ValueError("bad key")
            if op == "put":
                reason = self.store.put(key, body["record"], sender, connection_group(self._host.libp2p, raw))
                answer = {"ok": not reason, "reason": reason}
            elif op == "get":
                answer = {"records": self.store.get(key)}
            else:
                raise ValueError(f"unknown op {op!r:.20}")
            await stream.trio_send(msgpack.packb(answer, use_bin_type=True))
        except Exception as exc:  # whatever the peer sent, only its request ends
            log.debug("directory request from %s failed: %r", sender, exc)
        finally:
            await stream.trio_close()


async def _request(host: Host, peer: ID, body: dict) -> dict:
    """One directory request; a peer we cannot even connect to leaves our routing table (it is gone),
    one that is merely slow stays (evicting slow peers under load empties the table); one that
    answers garbage raises ValueError."""
    try:
        stream = await host.trio_open(PeerInfo(peer.to_base58()), DIRECTORY_PROTOCOL, QUERY_TIMEOUT_S,
                                      max_frame_bytes=MAX_ANSWER_BYTES)
    except PeerUnreachable:
        if host.kad is not None and peer not in host.libp2p.get_connected_peers():
            host.kad.routing_table.remove_peer(peer)
        raise
    try:
        with trio.fail_after(QUERY_TIMEOUT_S):
            await stream.trio_send(msgpack.packb(body, use_bin_type=True))
            answer = msgpack.unpackb(await stream.trio_recv(), raw=False)
    finally:
        await stream.trio_close()
    if not isinstance(answer, dict):
        raise ValueError("directory answer is not a map")
    return answer


async def trio_put_at(host: Host, peer: ID, key: bytes, blob: bytes) -> bool:
    """Ask `peer` to store `blob` under directory key `key`; whether it did."""
    try:
        answer = await _request(host, peer, {"op": "put", "key": key, "record": blob})
    except Exception as exc:
        log.debug("directory put at %s failed: %r", peer, exc)
        return False
    if not answer.get("ok"):
        log.debug("directory put at %s refused: %.200s", peer, answer.get("reason"))
    return bool(answer.get("ok"))


class DirectoryClient:
    """Publishes our records to, and lists models from, the peers closest to the shard keys.

    The closest peers of a shard key are found with an iterative Kademlia lookup and reused for
    CLOSEST_CACHE_S (a client discovers every few seconds while it routes); a shard whose cached
    peers do not answer is looked up afresh at once."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._closest: dict[bytes, tuple[float, list[ID]]] = {}

    async def trio_closest(self, key: bytes, count: int, fresh: bool = False) -> list[ID]:
        """The `count` peers closest to `key` in the whole network."""
        kad = self._host.kad
        assert kad is not None
        cached = self._closest.get(key)
        now = trio.current_time()
        if cached is not None and not fresh and now - cached[0] < CLOSEST_CACHE_S:
            return cached[1]
        found = await kad.peer_routing.find_closest_peers_network(key, count=max(count, REPLICAS + SPARES))
        peers = [p for p in found if p != kad.local_peer_id][:count]
        if len(self._closest) >= CLOSEST_CACHE_KEYS:
            self._closest.clear()
        self._closest[key] = (now, peers)
        return peers

    def _forget(self, key: bytes, peer: ID) -> None:
        """Drop a peer we could not connect to from the cached closest peers of `key`, so the next
        lookups within CLOSEST_CACHE_S do not wait on it again (a departed server: a dial timeout)."""
        cached = self._closest.get(key)
        if cached is not None and peer in cached[1]:
            self._closest[key] = (cached[0], [p for p in cached[1] if p != peer])

    async def trio_publish(self, rec: SpanRecord, blob: bytes, also: list[ID] = ()) -> tuple[int, int]:
        """Store our record at the REPLICAS peers closest to its shard key (and at `also`); returns
        how many of the closest REPLICAS + SPARES confirmed it, and how many of them the lookup found.

        The first pass puts at the REPLICAS closest and at `also`; each later pass puts again where
        no confirmation came and at as many of the SPARES as confirmations are missing."""
        key = shard_key(rec.model, shard_of(rec.peer_id))
        closest = await self.trio_closest(key, REPLICAS + SPARES, fresh=True)
        confirmed: set[ID] = set()

        async def put(peer: ID) -> None:
            if await trio_put_at(self._host, peer, key, blob):
                confirmed.add(peer)

        tried: list[ID] = []
        wave = list(dict.fromkeys([*closest[:REPLICAS], *also]))
        for _ in range(PUT_ROUNDS):
            tried.extend(p for p in wave if p not in tried)
            async with trio.open_nursery() as nursery:
                for peer in wave:
                    nursery.start_soon(put, peer)
            missing = REPLICAS - len(confirmed.intersection(closest))
            if missing <= 0:
                break
            unanswered = [p for p in tried if p in closest and p not in confirmed]
            wave = [*unanswered, *[p for p in closest if p not in tried][:missing]]
            if not wave:
                break
        log.debug("published %s under shard %d at %d of its %d closest peers (%d tried, %d of `also`): %s",
                  rec.peer_id, shard_of(rec.peer_id), len(confirmed.intersection(closest)), len(closest),
                  len(tried), len(confirmed.difference(closest)), [p.to_base58()[-6:] for p in closest])
        return len(confirmed.intersection(closest)), len(closest)

    async def trio_list(self, model: str) -> tuple[list[bytes], bool]:
        """Every record stored under any shard of `model` (unverified: the caller verifies), and
        whether some shard had nobody to ask or nobody answering (the list may miss servers)."""
        blobs: list[bytes] = []
        partial = False

        async def ask(key: bytes, peers: list[ID]) -> int:
            answered = 0

            async def get(peer: ID) -> None:
                nonlocal answered
                try:
                    answer = await _request(self._host, peer, {"op": "get", "key": key})
                except Exception as exc:
                    log.debug("directory get at %s failed: %r", peer, exc)
                    if isinstance(exc, PeerUnreachable):
                        self._forget(key, peer)
                    return
                records = answer.get("records")
                if isinstance(records, list):
                    answered += 1
                    blobs.extend(r for r in records[:MAX_ENTRIES_PER_KEY] if isinstance(r, bytes))

            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(get, peer)
            return answered

        async def one_shard(shard: int) -> None:
            nonlocal partial
            key = shard_key(model, shard)
            peers = await self.trio_closest(key, REPLICAS)
            answered = await ask(key, peers)
            if answered < len(peers) // 2 + 1:  # cached peers gone: look again
                fresh = await self.trio_closest(key, REPLICAS, fresh=True)
                answered += await ask(key, [p for p in fresh if p not in peers])
            if not answered:
                partial = True
            log.debug("listed shard %d of %s: %d of %s answered", shard, model, answered,
                      [p.to_base58()[-6:] for p in peers])

        async with trio.open_nursery() as nursery:
            for shard in range(SHARDS):
                nursery.start_soon(one_shard, shard)
        return blobs, partial
