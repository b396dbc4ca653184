"""Signed, expiring span records on libp2p's Kademlia DHT.

Membership: every server providing layers of a model is a provider of `provider_key(model)`.
Metadata: each server stores its SpanRecord under `value_key(model, peer_id)`, signed with
its libp2p key, so a storing node (and every reader) can check that the record really comes
from the peer it describes. The storing node fixes the DHT's own expiry at 24 h, so records
carry their own `expires`; a validator registered with KadDHT refuses forged, expired and
oversized values, and prefers the most recently issued record for a key.

libp2p's get_value/find_providers answer from the local cache once anything is cached,
which would hide new servers and updates; discover() therefore always asks the network:
providers from the peers closest to the key, values from the provider itself plus the
closest peers in the routing table.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as LibPeerInfo

from .host import BootstrapUnreachable, root_cause
from .records import (NAMESPACE, RecordRejected, SpanRecord, SpanValidator, newest, provider_key, sign_record,
                      valid_for, value_key, verify_record)

if TYPE_CHECKING:
    from .host import Host

log = logging.getLogger(__name__)

WITHDRAW_TTL_S = 600.0  # how long the "no longer serving" marker outlives the withdraw
PEER_QUERY_TIMEOUT_S = 5.0
VALUE_REPLICAS_ASKED = 3  # routing-table neighbours asked for a value besides its provider
LOOKUP_CACHE_SIZE = 1024  # records kept by DHT.lookup (each until it expires)
BOOTSTRAP_TIMEOUT = 10.0


class DHT:
    """Span announcements for one node's Host. Public coroutines are asyncio ones."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._last: dict[str, SpanRecord] = {}
        self._last_issued = 0.0
        self._found: dict[tuple[str, str], SpanRecord] = {}  # lookup() results, until they expire
        # peers whose records this node cannot use (another protocol version), and why: for error
        # messages that say why a provider was left out; bounded like the lookup cache
        self.incompatible: dict[str, str] = {}
        self._warned: set[tuple[str, str]] = set()
        # whether the last discover() may have missed servers: it asked no peer (a node that just
        # joined, before its routing table has any), or nobody answered with a provider's record
        self.last_discovery_partial = False
        self._spreading = False  # a background Kademlia put of our record is running

    def register_validator(self) -> None:
        """Called on the trio thread once the host's KadDHT exists."""
        assert self._host.kad is not None
        self._host.kad.register_validator(NAMESPACE, SpanValidator())

    def announced(self) -> dict[str, tuple[int, int]]:
        """The spans this node announces now: its last announcement per model, unless withdrawn or
        expired (any thread: nothing has to register what it serves a second time)."""
        now = time.time()
        last = list(self._last.items())  # one atomic copy: the asyncio thread may announce meanwhile
        return {m: (r.start, r.end) for m, r in last if not r.withdrawn and r.expires > now}

    async def announce(self, rec: SpanRecord) -> None:
        """Publish (or refresh) our record and provider entry; re-announce before `expires`."""
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
        the routing table, values and provider keys stored here."""
        kad = self._host.kad
        if kad is None:
            return {"routing_table_peers": 0, "stored_values": 0, "provider_keys": 0}
        return {"routing_table_peers": kad.routing_table.size(), "stored_values": len(kad.value_store.store),
                "provider_keys": len(kad.provider_store.providers)}

    async def discover(self, model: str) -> list[SpanRecord]:
        """Live, verified records of every provider of `model` (withdrawn/expired/forged dropped)."""
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
        """Connect to bootstrap peers and look ourselves up so they (and we) fill routing tables.

        If `required` and no bootstrap peer answers, returns why (the caller raises it, so it is
        not logged too); otherwise unreachable peers are logged and None is returned."""
        kad, libp2p = self._host.kad, self._host.libp2p
        assert kad is not None
        joined = 0
        reasons: list[str] = []
        for info in boot:
            where = f"{info.peer_id} at {', '.join(str(a) for a in info.addrs)}"
            reason = f"no answer within {BOOTSTRAP_TIMEOUT:g} s"
            with trio.move_on_after(BOOTSTRAP_TIMEOUT):
                try:
                    await libp2p.connect(info)
                    await kad.add_peer(info.peer_id, skip_server_mode_check=True)
                    joined += 1
                    continue
                except Exception as exc:
                    reason = root_cause(exc)
            log.log(logging.DEBUG if required else logging.WARNING, "bootstrap peer %s unreachable: %s", where, reason)
            reasons.append(f"{where}: {reason}")
        if joined:
            with trio.move_on_after(BOOTSTRAP_TIMEOUT):
                await kad.peer_routing.find_closest_peers_network(libp2p.get_id().to_bytes())
            return None
        if boot and required:
            return BootstrapUnreachable(f"cannot reach any bootstrap peer ({'; '.join(reasons)})")
        if boot:
            log.warning("no bootstrap peer reachable; starting alone")
        return None

    async def _t_publish(self, rec: SpanRecord, blob: bytes, provide: bool) -> None:
        """Store the record and our provider entry (withdrawing: the record, and drop the entry).

        Announcing first stores both at the peers we are connected to (a bootstrap peer, relays), so
        readers find us within a moment, and returns; the Kademlia puts to the key's closest peers
        in the whole network go on in the background. They can take 20 s and more: the closest
        peers may include nodes behind a NAT whose private addresses the DHT still lists, and each
        dial to one waits for its timeout."""
        kad = self._host.kad
        assert kad is not None
        key, vkey = provider_key(rec.model), value_key(rec.model, rec.peer_id)
        vkey_bytes = vkey.encode()
        if not provide:
            await kad.put_value(vkey, blob)
            kad.provider_store.providing_keys.discard(key)
            kad.provider_store.providers.get(key, {}).pop(self._host.peer_id, None)
            return
        kad.value_store.put(vkey_bytes, blob)
        connected = set(self._host.libp2p.get_connected_peers())
        near = [p for p in kad.routing_table.get_peer_ids() if p in connected]

        async def store_near(peer: ID) -> None:
            with trio.move_on_after(PEER_QUERY_TIMEOUT_S):
                try:
                    await kad.value_store._store_at_peer(peer, vkey_bytes, blob)
                    await kad.provider_store._send_add_provider(peer, key)
                except Exception as exc:
                    log.debug("storing our record at %s failed: %r", peer, exc)

        async with trio.open_nursery() as nursery:
            for peer in near:
                nursery.start_soon(store_near, peer)
        nursery = self._host.bridge.nursery
        if not self._spreading and nursery is not None:
            self._spreading = True
            nursery.start_soon(self._t_spread, vkey, blob, key)

    async def _t_spread(self, vkey: str, blob: bytes, key: bytes) -> None:
        """The Kademlia puts of one announce (one at a time: a later announce skips it while one runs)."""
        kad = self._host.kad
        assert kad is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kad.put_value, vkey, blob)
                nursery.start_soon(kad.provider_store.provide, key)
        except Exception as exc:  # e.g. a newer record of ours stored meanwhile; the next announce spreads that
            log.debug("spreading our record failed: %r", exc)
        finally:
            self._spreading = False

    async def _t_discover(self, model: str) -> list[SpanRecord]:
        kad = self._host.kad
        assert kad is not None
        key = provider_key(model)
        providers: dict[ID, list[Any]] = {p.peer_id: list(p.addrs) for p in kad.provider_store.get_providers(key)}
        closest = await kad.peer_routing.find_closest_peers_network(key)

        async def ask_providers(peer: ID) -> None:
            with trio.move_on_after(PEER_QUERY_TIMEOUT_S):
                found, _closer = await kad.provider_store._get_providers_from_peer_with_closers(peer, key)
                for info in found:
                    providers.setdefault(info.peer_id, []).extend(info.addrs)

        asked = [peer for peer in closest if peer != kad.local_peer_id]
        async with trio.open_nursery() as nursery:
            for peer in asked:
                nursery.start_soon(ask_providers, peer)

        records: dict[str, SpanRecord] = {}

        unanswered: set[ID] = set()

        async def fetch(peer: ID, addrs: list[Any]) -> None:
            if addrs:
                self._host.libp2p.get_peerstore().add_addrs(peer, addrs, 3600)
            rec = await self._t_fetch_value(model, peer, unanswered)
            if rec is not None and not rec.withdrawn:
                records[rec.peer_id] = rec

        async with trio.open_nursery() as nursery:
            for peer, addrs in providers.items():
                nursery.start_soon(fetch, peer, addrs)
        self.last_discovery_partial = not asked or bool(unanswered)
        return sorted(records.values(), key=lambda r: (r.start, r.end, r.peer_id))

    async def _t_fetch_value(self, model: str, peer: ID, unanswered: set[ID] | None = None) -> SpanRecord | None:
        """Newest valid record of `peer` for `model`: from the peer itself and its replicas. A peer
        for which nobody answered with any record is added to `unanswered`."""
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
                log.info("provider %s of %s has no reachable span record", peer_b58, model)
                if unanswered is not None:
                    unanswered.add(peer)
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
