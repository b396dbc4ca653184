"""A node's side of the DHT: span announcements, discovery, record lookups and routing-table upkeep.

Membership: each server files its signed SpanRecord in the membership directory (directory.py:
sharded keys, storing-side limits per observed network group), and discover() lists it from
there. Kademlia provider records are not used: py-libp2p keeps 20 per key, first come, for 48 h.
Metadata lookups: each server also stores its record under `value_key(model, peer_id)` in the
Kademlia value store, so a server can resolve its next hop's record from the peer itself or its
replicas (lookup()). A validator registered with KadDHT refuses forged, expired and oversized
values and prefers the most recently issued record for a key; the value store is bounded per
signer and evicts in O(1) (BoundedValueStore).

Upkeep (trio_upkeep, for as long as the node runs): bootstrap peers we lost are dialed again (a
restarted bootstrap peer learns the swarm back and new joiners find everyone through it), our own
id and a random key are looked up (bucket refresh, every REFRESH_INTERVAL_S), routing-table peers
we cannot reach are evicted, and expired directory entries are swept. A peer that fails a directory request leaves
the routing table at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import msgpack
import trio
from libp2p.kad_dht.value_store import ValueStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as LibPeerInfo

from . import directory
from .directory import DirectoryClient, DirectoryService, DirectoryStore
from .host import BootstrapUnreachable, Host, root_cause
from .records import (NAMESPACE, RecordRejected, SpanRecord, SpanValidator, newest, sign_record, valid_for,
                      value_key, verify_record)

log = logging.getLogger(__name__)

WITHDRAW_TTL_S = 600.0  # how long the "no longer serving" marker outlives the withdraw
PEER_QUERY_TIMEOUT_S = 5.0
VALUE_REPLICAS_ASKED = 3  # routing-table neighbours asked for a value besides its provider
LOOKUP_CACHE_SIZE = 1024  # records kept by DHT.lookup (each until it expires)
BOOTSTRAP_TIMEOUT = 10.0
UPKEEP_INTERVAL_S = 20.0  # bootstrap re-dial, dead-peer eviction, sweep
# self lookup and a random bucket's refresh: iterative lookups of every node every round were half of
# a 63-peer swarm's CPU at rest (go-libp2p-kad-dht refreshes every 10 min); a node that re-dials a lost
# bootstrap peer still looks itself up at once
REFRESH_INTERVAL_S = 120.0
EVICTION_DIALS_PER_ROUND = 16  # unconnected routing-table peers dialed per upkeep round
EVICTION_DIAL_TIMEOUT_S = 3.0
REFILE_DELAYS_S = (1.0, 2.0, 4.0, 8.0)  # pauses before filing a record again whose filing fell short
MAX_VALUES = 50_000  # values this node stores for others
MAX_VALUES_PER_SIGNER = 64  # of which one signing key may hold (made-up model names included)


class DHT:
    """Span announcements for one node's Host. Public coroutines are asyncio ones."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._last: dict[str, SpanRecord] = {}
        self._last_issued = 0.0
        self._found: dict[tuple[str, str], SpanRecord] = {}  # lookup() results, until they expire
        # peers whose records this node cannot use (another protocol version), and why: for error
        # messages that say why a server was left out; bounded like the lookup cache
        self.incompatible: dict[str, str] = {}
        self._warned: set[tuple[str, str]] = set()
        # whether the last discover() may have missed servers: some directory shard had nobody to ask
        # (a node that just joined, before its routing table has any) or nobody answering
        self.last_discovery_partial = False
        self._spreading = False  # a background Kademlia put of our record is running
        self._refiling: set[str] = set()  # models whose record a background task files again
        self._filed: dict[str, tuple[SpanRecord, bytes]] = {}  # model -> the record we filed last, signed
        self._boot: list[LibPeerInfo] = []  # our bootstrap peers (set when we join)
        self.directory = DirectoryService(host, DirectoryStore(time.time))
        self._directory_client = DirectoryClient(host)

    def register(self) -> None:
        """Called on the trio thread once the host's KadDHT exists: our validator, a bounded value
        store in place of py-libp2p's, and the directory service."""
        kad = self._host.kad
        assert kad is not None
        kad.register_validator(NAMESPACE, SpanValidator())
        kad.value_store = BoundedValueStore(self._host.libp2p, kad.local_peer_id)
        self._host.libp2p.set_stream_handler(directory.DIRECTORY_PROTOCOL, self.directory.serve)

    def announced(self) -> dict[str, tuple[int, int]]:
        """The spans this node announces now: its last announcement per model, unless withdrawn or
        expired (any thread: nothing has to register what it serves a second time)."""
        now = time.time()
        last = list(self._last.items())  # one atomic copy: the asyncio thread may announce meanwhile
        return {m: (r.start, r.end) for m, r in last if not r.withdrawn and r.expires > now}

    async def announce(self, rec: SpanRecord) -> None:
        """Publish (or refresh) our record in the directory and the value store; re-announce before `expires`."""
        if rec.peer_id != self._host.peer_id:
            raise ValueError(f"record peer_id {rec.peer_id} is not this node ({self._host.peer_id})")
        self._last_issued = max(time.time(), self._last_issued + 1e-6)
        rec = dataclasses.replace(rec, issued=self._last_issued, addrs=list(rec.addrs))
        blob = sign_record(rec, self._host.keypair)
        verify_record(blob)  # fail here, not on every storing node, if e.g. already expired
        self._last[rec.model] = rec
        await self._host.bridge.call(self._t_publish, rec, blob, True)

    async def withdraw(self, model: str) -> None:
        """Best effort: overwrite our record with a zero-span one so readers drop us at once."""
        last = self._last.get(model)
        base = last or SpanRecord(model, 0, 0, self._host.peer_id, list(self._host.addrs), 0.0, 0, "", 0.0)
        self._last_issued = max(time.time(), self._last_issued + 1e-6)
        rec = dataclasses.replace(base, start=0, end=0, throughput=0.0, free_cache_tokens=0,
                                  expires=time.time() + WITHDRAW_TTL_S, issued=self._last_issued)
        self._last[model] = rec
        try:
            await self._host.bridge.call(self._t_publish, rec, sign_record(rec, self._host.keypair), False)
        except Exception as exc:
            log.warning("withdrawing %s from the DHT failed: %r", model, exc)

    def stats(self) -> dict[str, int]:
        """Health of this node's DHT (read from any thread: plain sizes, no locking needed): peers in
        the routing table, values and directory entries stored here."""
        kad = self._host.kad
        if kad is None:
            return {"routing_table_peers": 0, "stored_values": 0, "directory_entries": 0}
        return {"routing_table_peers": kad.routing_table.size(), "stored_values": len(kad.value_store.store),
                "directory_entries": len(self.directory.store)}

    async def discover(self, model: str) -> list[SpanRecord]:
        """Live, verified records of every server of `model` in the directory (withdrawn/expired/forged dropped)."""
        return await self._host.bridge.call(self._t_discover, model)

    async def lookup(self, model: str, peer_id: str) -> SpanRecord | None:
        """The newest valid (signed by peer_id, unexpired, not withdrawn) record of `peer_id` for
        `model`, or None. A record found is reused until it expires, so a server opening many
        sessions towards the same next hop asks the DHT once, not per session; misses are not kept
        (a server that just joined is found at once)."""
        key, now = (model, peer_id), time.time()
        rec = self._found.get(key)
        if rec is not None and rec.expires > now:
            return rec
        self._found.pop(key, None)
        try:
            peer = ID.from_base58(peer_id)
        except Exception:
            return None  # not a peer id: nobody can have a record under it
        rec = await self._host.bridge.call(self._t_fetch_value, model, peer)
        if rec is None or rec.withdrawn:
            return None
        if len(self._found) >= LOOKUP_CACHE_SIZE:
            self._found = {k: r for k, r in self._found.items() if r.expires > now}
            while len(self._found) >= LOOKUP_CACHE_SIZE:
                del self._found[next(iter(self._found))]  # the oldest entry
        self._found[key] = rec
        return rec

    # ---- trio side ---------------------------------------------------------------------
    async def trio_join(self, boot: list[LibPeerInfo], required: bool) -> BootstrapUnreachable | None:
        """Connect to every bootstrap peer at once and look ourselves up so they (and we) fill routing
        tables.

        If `required` and no bootstrap peer answers, returns why (the caller raises it, so it is
        not logged too); otherwise unreachable peers are logged and None is returned."""
        kad, libp2p = self._host.kad, self._host.libp2p
        assert kad is not None
        self._boot = list(boot)
        reasons = await self._t_dial_bootstrap(boot, logging.DEBUG if required else logging.WARNING)
        if len(reasons) < len(boot) or not boot:
            if boot:
                with trio.move_on_after(BOOTSTRAP_TIMEOUT):
                    # twice: py-libp2p adds the peer of an inbound query to its routing table only if
                    # it has addresses for it already, and takes them from the query's signed record
                    # after that check; so the first lookup tells our bootstrap peers where we are,
                    # the second puts us in their tables (else nobody finds us until our next upkeep)
                    for _ in range(2):
                        await kad.peer_routing.find_closest_peers_network(libp2p.get_id().to_bytes())
            return None
        if required:
            return BootstrapUnreachable(f"cannot reach any bootstrap peer ({'; '.join(reasons)})")
        log.warning("no bootstrap peer reachable; starting alone")
        return None

    async def _t_dial_bootstrap(self, boot: list[LibPeerInfo], level: int) -> list[str]:
        """Dial every peer of `boot` at once and put those that answer in the routing table; returns
        why each of the others did not answer."""
        kad, libp2p = self._host.kad, self._host.libp2p
        assert kad is not None
        reasons: list[str] = []

        async def dial(info: LibPeerInfo) -> None:
            where = f"{info.peer_id} at {', '.join(str(a) for a in info.addrs)}"
            reason = f"no answer within {BOOTSTRAP_TIMEOUT:g} s"
            with trio.move_on_after(BOOTSTRAP_TIMEOUT):
                try:
                    await libp2p.connect(info)
                    await kad.add_peer(info.peer_id, skip_server_mode_check=True)
                    return
                except Exception as exc:
                    reason = root_cause(exc)
            log.log(level, "bootstrap peer %s unreachable: %s", where, reason)
            reasons.append(f"{where}: {reason}")

        async with trio.open_nursery() as nursery:
            for info in boot:
                nursery.start_soon(dial, info)
        return reasons

    async def trio_upkeep(self) -> None:
        """Keep the routing table fresh for as long as the node runs (see the module docstring)."""
        kad = self._host.kad
        assert kad is not None
        alone_pause = 1.0
        refreshed = trio.current_time()
        while True:
            # A node that reached none of its bootstrap peers (all busy: measured with 60 peers joining
            # three at once on a loaded machine, where every dial timed out) tries again soon, not
            # only at the next round: until it joins it files its record nowhere.
            alone = bool(self._boot) and len(self._lost_bootstrap()) == len(self._boot)
            await trio.sleep(min(alone_pause, UPKEEP_INTERVAL_S) if alone else UPKEEP_INTERVAL_S)
            alone_pause = alone_pause * 2 if alone else 1.0
            try:
                refresh = trio.current_time() - refreshed >= REFRESH_INTERVAL_S
                if await self._t_rejoin(look_up_self=refresh):
                    refreshed = trio.current_time()
                    with trio.move_on_after(BOOTSTRAP_TIMEOUT):  # refresh a random bucket
                        await kad.peer_routing.find_closest_peers_network(os.urandom(32))
                if alone and len(self._lost_bootstrap()) < len(self._boot):  # joined at last: file at once
                    for rec, blob in list(self._filed.values()):
                        if self._last.get(rec.model) is rec:
                            await self._t_file(rec, blob, self._connected_servers())
                await self._t_evict_unreachable()
                self.directory.store.sweep()
            except Exception as exc:  # upkeep must outlive any one failure
                log.debug("DHT upkeep round failed: %r", exc)

    def _lost_bootstrap(self) -> list[LibPeerInfo]:
        """Bootstrap peers we hold no connection to, or that left our routing table."""
        kad = self._host.kad
        assert kad is not None
        connected = set(self._host.libp2p.get_connected_peers())
        return [info for info in self._boot if info.peer_id not in connected
                or not kad.routing_table.peer_in_table(info.peer_id)]

    async def _t_rejoin(self, look_up_self: bool = True) -> bool:
        """Dial the bootstrap peers we lost (a restarted one knows nobody: tell it we exist, and learn
        from it), then look ourselves up (if we lost one, or `look_up_self`); whether we looked.

        py-libp2p refuses for 60 s to dial a peer whose addresses all failed once (its negative
        cache), and drops a peer from the routing table when a query's stream to it fails: under load
        a node that had just joined lost its bootstrap peers that way, and every re-dial within the
        minute failed at once, so it knew nobody and filed its record nowhere. A bootstrap peer is
        dialed anyway."""
        kad, network = self._host.kad, self._host.libp2p.get_network()
        assert kad is not None
        lost = self._lost_bootstrap()
        if lost:
            for info in lost:
                network.unblock_peer(info.peer_id)
            await self._t_dial_bootstrap(lost, logging.DEBUG)
        elif not look_up_self:
            return False
        with trio.move_on_after(BOOTSTRAP_TIMEOUT):
            await kad.peer_routing.find_closest_peers_network(self._host.libp2p.get_id().to_bytes())
        return True

    async def _t_file(self, rec: SpanRecord, blob: bytes, also: list[ID]) -> None:
        """File our record in the directory, and file it again soon (REFILE_DELAYS_S) while the
        filing fell short: fewer than REPLICAS closest peers confirmed it although the lookup found
        more that did not, or nobody confirmed it at all. Seen under load: a node that had just
        joined published to nobody (failed queries had emptied its routing table), or its puts to the
        closest peers went unanswered, and no reader listed it until its next announce 30 s later.
        Each new try joins again first (bootstrap peers we lost, a self lookup). The retries run in
        the background, and stop once a newer record of ours for the model replaced this one."""
        self._filed[rec.model] = (rec, blob)
        stored, found = await self._directory_client.trio_publish(rec, blob, also)
        if not _short(stored, found):
            return
        nursery = self._host.bridge.nursery
        if rec.model in self._refiling or nursery is None:
            return
        self._refiling.add(rec.model)
        nursery.start_soon(self._t_refile, rec, blob, stored, found)

    async def _t_refile(self, rec: SpanRecord, blob: bytes, stored: int, found: int) -> None:
        try:
            for delay in REFILE_DELAYS_S:
                await trio.sleep(delay)
                if self._last.get(rec.model) is not rec:  # announced anew (or withdrawn) meanwhile
                    return
                await self._t_rejoin()
                stored, found = await self._directory_client.trio_publish(rec, blob, self._connected_servers())
                log.debug("filed %s again after %.0f s: %d of %d closest peers", rec.model, delay, stored, found)
                if not _short(stored, found):
                    return
        except Exception as exc:  # the next announce files it anyway
            log.debug("filing %s again failed: %r", rec.model, exc)
        finally:
            self._refiling.discard(rec.model)

    async def _t_evict_unreachable(self) -> None:
        """Dial up to EVICTION_DIALS_PER_ROUND routing-table peers we hold no connection to; drop
        those that do not answer (py-libp2p alone checks only peers unseen for an hour, 5 per 5 min)."""
        kad, libp2p = self._host.kad, self._host.libp2p
        assert kad is not None
        connected = set(libp2p.get_connected_peers())
        idle = [p for p in kad.routing_table.get_peer_ids() if p not in connected][:EVICTION_DIALS_PER_ROUND]

        async def check(peer: ID) -> None:
            with trio.move_on_after(EVICTION_DIAL_TIMEOUT_S):
                try:
                    await libp2p.connect(LibPeerInfo(peer, libp2p.get_peerstore().addrs(peer)))
                    return
                except Exception as exc:
                    log.debug("routing-table peer %s unreachable: %s", peer, root_cause(exc))
            kad.routing_table.remove_peer(peer)

        async with trio.open_nursery() as nursery:
            for peer in idle:
                nursery.start_soon(check, peer)

    async def _t_publish(self, rec: SpanRecord, blob: bytes, provide: bool) -> None:
        """File the record in the directory and store it as our value (withdrawing: the same, so the
        withdrawal replaces the live record everywhere).

        The directory put goes to the shard key's closest peers (found by an iterative lookup) and
        returns once they answered. The Kademlia put of the value goes to the key's closest peers in
        the background: that can take 20 s and more when the closest include nodes behind a NAT whose
        private addresses the DHT still lists (a next hop asks the peer itself first anyway).

        A record that says something new (our first, or new layers or addresses) also goes at once
        to every routing-table peer we are connected to (a bootstrap peer, relays), in both stores,
        while the lookups may still miss peers. A re-announce of the same offer does not: storing at
        every connected peer every announce interval was a third of a server's CPU at rest in a
        63-peer swarm (profiled), and readers ask the key's closest peers only."""
        kad = self._host.kad
        assert kad is not None
        vkey = value_key(rec.model, rec.peer_id)
        vkey_bytes = vkey.encode()
        self.directory.store.put(directory.shard_key(rec.model, directory.shard_of(rec.peer_id)), blob,
                                 self._host.peer_id, "self")
        filed = self._filed.get(rec.model)
        news = filed is None or (filed[0].start, filed[0].end, filed[0].addrs) != (rec.start, rec.end, rec.addrs)
        near = self._connected_servers() if news else []
        if not provide:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kad.put_value, vkey, blob)
                nursery.start_soon(self._t_file, rec, blob, near)
            return
        kad.value_store.put(vkey_bytes, blob)

        async def store_near(peer: ID) -> None:
            with trio.move_on_after(PEER_QUERY_TIMEOUT_S):
                try:
                    await kad.value_store._store_at_peer(peer, vkey_bytes, blob)
                except Exception as exc:
                    log.debug("storing our record at %s failed: %r", peer, exc)

        async with trio.open_nursery() as nursery:
            for peer in near:
                nursery.start_soon(store_near, peer)
            nursery.start_soon(self._t_file, rec, blob, near)
        nursery = self._host.bridge.nursery
        if not self._spreading and nursery is not None:
            self._spreading = True
            nursery.start_soon(self._t_spread, vkey, blob)

    def _connected_servers(self) -> list[ID]:
        kad = self._host.kad
        assert kad is not None
        connected = set(self._host.libp2p.get_connected_peers())
        return [p for p in kad.routing_table.get_peer_ids() if p in connected]

    async def _t_spread(self, vkey: str, blob: bytes) -> None:
        """The Kademlia put of one announce (one at a time: a later announce skips it while one runs)."""
        kad = self._host.kad
        assert kad is not None
        try:
            await kad.put_value(vkey, blob)
        except Exception as exc:  # e.g. a newer record of ours stored meanwhile; the next announce spreads that
            log.debug("spreading our record failed: %r", exc)
        finally:
            self._spreading = False

    async def _t_discover(self, model: str) -> list[SpanRecord]:
        blobs, partial = await self._directory_client.trio_list(model)
        kad = self._host.kad
        if partial and kad is not None and kad.routing_table.size() == 0 and self._boot:
            # we know nobody (seen: a reader whose routing table failed queries emptied while 50 new
            # ids flooded a loaded swarm listed nothing for minutes): join again, then ask again
            await self._t_rejoin()
            blobs, partial = await self._directory_client.trio_list(model)
        for shard in range(directory.SHARDS):  # what we store ourselves (we may be a shard's closest peer)
            blobs.extend(self.directory.store.get(directory.shard_key(model, shard)))
        by_peer: dict[str, list[SpanRecord | None]] = {}
        for blob in blobs:
            try:
                rec = verify_record(blob)
            except RecordRejected as exc:
                signer = _signer_hint(blob)
                if signer:
                    self._dropped(signer, model, "directory", exc.reason)
                continue
            if rec.model == model:
                by_peer.setdefault(rec.peer_id, []).append(rec)
        records = []
        for peer, recs in by_peer.items():
            rec = recs[newest(recs)]
            if rec is not None and not rec.withdrawn:
                self.incompatible.pop(peer, None)
                records.append(rec)
        self.last_discovery_partial = partial
        return sorted(records, key=lambda r: (r.start, r.end, r.peer_id))

    async def _t_fetch_value(self, model: str, peer: ID) -> SpanRecord | None:
        """Newest valid record of `peer` for `model`: from the peer itself and its replicas."""
        kad = self._host.kad
        assert kad is not None
        peer_b58 = peer.to_base58()
        key = value_key(model, peer_b58).encode()
        blobs: list[tuple[str, bytes]] = []
        local = kad.value_store.get(key)
        if local is not None:
            blobs.append(("local store", local.value))
        sources = [peer, *kad.routing_table.find_local_closest_peers(key, VALUE_REPLICAS_ASKED)]

        async def ask(source: ID) -> None:
            with trio.move_on_after(PEER_QUERY_TIMEOUT_S):
                try:
                    found = await kad.value_store._get_from_peer(source, key, return_record=True)
                except Exception as exc:
                    log.debug("value query to %s failed: %r", source, exc)
                    return
                if found is not None:
                    blobs.append((source.to_base58(), found.value))

        # The peer's own signed record is its newest: ask it first, and replicas only when it is
        # silent or has none. (Asking all at once and cancelling the rest once the peer answered
        # broke later queries: a libp2p read is not cancel-safe. Waiting for all cost a query
        # timeout whenever one replica hung.)
        if peer != kad.local_peer_id:
            await ask(peer)
        if not any(valid_for(blob, peer_b58, model) for source, blob in blobs if source == peer_b58):
            async with trio.open_nursery() as nursery:
                for source in dict.fromkeys(sources):
                    if source not in (kad.local_peer_id, peer):
                        nursery.start_soon(ask, source)
        valid: list[SpanRecord | None] = []
        for source, blob in blobs:
            try:
                rec = verify_record(blob)
                if rec.peer_id != peer_b58 or rec.model != model:
                    raise RecordRejected(f"record of {rec.peer_id}/{rec.model} stored under {peer_b58}/{model}")
                valid.append(rec)
            except RecordRejected as exc:
                self._dropped(peer_b58, model, source, exc.reason)
        if not valid:
            if not blobs:
                log.info("server %s of %s has no reachable span record", peer_b58, model)
            return None
        self.incompatible.pop(peer_b58, None)
        return valid[newest(valid)]

    def _dropped(self, peer: str, model: str, source: str, reason: str) -> None:
        """Log a record we cannot use: a warning the first time a peer's record fails for a reason
        (lookups repeat every minute), debug after that."""
        if reason.startswith("incompatible"):
            if len(self.incompatible) >= LOOKUP_CACHE_SIZE:
                self.incompatible.clear()
            self.incompatible[peer] = reason
        if (peer, reason) in self._warned:
            log.debug("dropping span record of %s for %s (from %s): %s", peer, model, source, reason)
            return
        if len(self._warned) >= LOOKUP_CACHE_SIZE:
            self._warned.clear()
        self._warned.add((peer, reason))
        log.warning("dropping span record of %s for %s (from %s): %s", peer, model, source, reason)


def _short(stored: int, found: int) -> bool:
    """Whether a filing fell short: nobody confirmed it, or fewer than REPLICAS of the closest peers
    did while the lookup found more (a swarm smaller than REPLICAS is not short)."""
    return stored == 0 or stored < min(directory.REPLICAS, found)


def _signer_hint(blob: bytes) -> str:
    """The peer id a record claims (unverified, for saying whose record was dropped), or ''."""
    try:
        peer = msgpack.unpackb(msgpack.unpackb(blob, raw=False)["record"], raw=False)["peer_id"]
    except Exception:
        return ""
    return peer if isinstance(peer, str) else ""


class BoundedValueStore(ValueStore):
    """py-libp2p's value store with O(1) eviction and a limit per signer.

    The original scans all 50,000 values for the oldest on every put, on the thread that carries
    every stream. Here the dict's insertion order is the arrival order (a re-stored key moves to
    the end), so the oldest is the first. Each signer (the peer whose signed span record a value
    holds) may keep MAX_VALUES_PER_SIGNER values; beyond that its own oldest goes, so one key
    signing records for made-up model names displaces only itself."""

    def __init__(self, host: object, local_peer_id: ID) -> None:
        super().__init__(host, local_peer_id)  # type: ignore[arg-type]
        self._by_signer: dict[str, dict[bytes, None]] = {}

    def put(self, key: bytes, value: bytes, validity: float = 0.0) -> None:
        self.store.pop(key, None)
        super().put(key, value, validity)
        self._charge(key, value)

    def put_record(self, key: bytes, record: object) -> None:
        self.store.pop(key, None)
        super().put_record(key, record)  # type: ignore[arg-type]
        self._charge(key, record.value)  # type: ignore[attr-defined]

    def _evict_if_full(self) -> None:
        while len(self.store) >= MAX_VALUES:
            del self.store[next(iter(self.store))]

    def _charge(self, key: bytes, value: bytes) -> None:
        signer = _signer_hint(value)
        keys = self._by_signer.setdefault(signer, {})
        keys.pop(key, None)
        keys[key] = None
        for old in [k for k in keys if k not in self.store]:  # evicted or expired since
            del keys[old]
        while len(keys) > MAX_VALUES_PER_SIGNER:
            old = next(iter(keys))
            del keys[old]
            self.store.pop(old, None)
