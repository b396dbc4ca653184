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
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import trio
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from .protocol import PROTOCOL_VERSION
from ..errors import PeerError

if TYPE_CHECKING:
    from libp2p.kad_dht.kad_dht import KadDHT

    from dsdnode.net.p2p import P2PNode

log = logging.getLogger(__name__)

NAMESPACE = "dsdspan"
MAX_RECORD_BYTES = 4096
SIGN_DOMAIN = b"dsdnode/span-record/v1\x00"
WITHDRAW_TTL_S = 600.0  # how long the "no longer serving" marker outlives the withdraw
PEER_QUERY_TIMEOUT_S = 5.0
VALUE_REPLICAS_ASKED = 3  # routing-table neighbours asked for a value besides its provider
LOOKUP_CACHE_SIZE = 1024  # records kept by DHT.lookup (each until it expires)


class RecordRejected(PeerError, ValueError):
    """A span record failed verification; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class SpanRecord:
    """A server's offer: decoder layers [start, end) of `model`, reachable at `addrs`.

    start == end marks a withdrawn span. `issued` (unix time, set by DHT.announce) orders
    records for the same key; `expires` is when readers must stop trusting this record.
    """

    model: str
    start: int
    end: int
    peer_id: str
    addrs: list[str]
    throughput: float
    free_cache_tokens: int
    version: str
    expires: float
    issued: float = 0.0
    device: str = "cpu"  # the kind of device the span computes on: cpu, cuda or mps
    weights: str = ""  # digest of the model weights served (models.weights.weights_digest)
    protocol: int = PROTOCOL_VERSION  # wire protocol the peer speaks (net.protocol)
    # load when issued (routing prefers less loaded servers, --layers auto goes where load is high):
    active_sessions: int = 0  # sessions that sent a block in the last few seconds
    queued_positions: int = 0  # positions waiting for compute

    @property
    def withdrawn(self) -> bool:
        return self.end <= self.start


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(SpanRecord)}
DEVICE_KINDS = frozenset({"cpu", "cuda", "mps"})
WEIGHTS_DIGEST_MAX = 64


def value_key(model: str, peer_id: str) -> str:
    """Namespaced DHT key (49 bytes, under the 50-byte limit) for one peer's record of a model."""
    digest = hashlib.blake2b(f"{model}\x00{peer_id}".encode(), digest_size=20).hexdigest()
    return f"/{NAMESPACE}/{digest}"


def provider_key(model: str) -> bytes:
    """Provider (membership) key for a model: a sha2-256 multihash of the model name."""
    return b"\x12\x20" + hashlib.sha256(b"dsdnode/model\x00" + model.encode()).digest()


def sign_record(rec: SpanRecord, keypair: KeyPair) -> bytes:
    """msgpack {record, public_key, signature}; raises RecordRejected if over 4 KB."""
    body = msgpack.packb(dataclasses.asdict(rec), use_bin_type=True)
    blob = msgpack.packb(
        {"record": body, "public_key": keypair.public_key.serialize(),
         "signature": keypair.private_key.sign(SIGN_DOMAIN + body)},
        use_bin_type=True,
    )
    if len(blob) > MAX_RECORD_BYTES:
        raise RecordRejected(f"oversized: signed record is {len(blob)} bytes > {MAX_RECORD_BYTES}")
    return blob


def verify_record(blob: bytes, now: float | None = None) -> SpanRecord:
    """Check size, signature, signer == peer_id and expiry; return the record."""
    if not isinstance(blob, (bytes, bytearray)):
        raise RecordRejected(f"malformed: expected bytes, got {type(blob).__name__}")
    if len(blob) > MAX_RECORD_BYTES:
        raise RecordRejected(f"oversized: {len(blob)} bytes > {MAX_RECORD_BYTES}")
    try:
        outer = msgpack.unpackb(blob, raw=False)
        body, public_key_bytes, signature = outer["record"], outer["public_key"], outer["signature"]
        if set(outer) != {"record", "public_key", "signature"} or not all(
            isinstance(b, bytes) for b in (body, public_key_bytes, signature)
        ):
            raise ValueError("envelope must hold exactly record/public_key/signature bytes")
        public_key = deserialize_public_key(public_key_bytes)
    except Exception as exc:
        raise RecordRejected(f"malformed: {exc!r}") from None
    if not public_key.verify(SIGN_DOMAIN + body, signature):
        raise RecordRejected("bad signature")
    rec = _parse_record(body)
    signer = ID.from_pubkey(public_key).to_base58()
    if signer != rec.peer_id:
        raise RecordRejected(f"signer {signer} is not the announced peer {rec.peer_id}")
    now = time.time() if now is None else now
    if rec.expires <= now:
        raise RecordRejected(f"expired at {rec.expires:.0f} (now {now:.0f})")
    return rec


def _parse_record(body: bytes) -> SpanRecord:
    try:
        fields = msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise RecordRejected(f"malformed: record is not msgpack: {exc!r}") from None
    if not isinstance(fields, dict):
        raise RecordRejected("malformed: record is not a map")
    if fields.get("protocol") != PROTOCOL_VERSION:  # checked first: another version has other fields
        spoken = fields.get("protocol")
        spoken = f"dsdnode protocol {spoken!r:.12}" if spoken is not None else "an older dsdnode protocol"
        raise RecordRejected(f"incompatible: the peer speaks {spoken}, this node speaks {PROTOCOL_VERSION} "
                             "(one of the two needs an upgrade)")
    if set(fields) != set(_FIELD_TYPES):
        raise RecordRejected("malformed: record fields do not match SpanRecord")
    for name, value in fields.items():
        kind = _FIELD_TYPES[name]
        ok = {
            "str": isinstance(value, str),
            "int": type(value) is int,
            "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            "list[str]": isinstance(value, list) and all(isinstance(a, str) for a in value),
        }[kind]
        if not ok:
            raise RecordRejected(f"malformed: field {name} must be {kind}, got {value!r:.60}")
    rec = SpanRecord(**fields)
    if (rec.start < 0 or rec.end < rec.start or rec.free_cache_tokens < 0 or rec.throughput < 0
            or rec.active_sessions < 0 or rec.queued_positions < 0):
        raise RecordRejected(f"malformed: bad span [{rec.start}, {rec.end}) or negative counters")
    if rec.device not in DEVICE_KINDS:
        raise RecordRejected(f"malformed: device {rec.device!r:.20} is not one of {sorted(DEVICE_KINDS)}")
    if len(rec.weights) > WEIGHTS_DIGEST_MAX:
        raise RecordRejected(f"malformed: weights digest longer than {WEIGHTS_DIGEST_MAX} characters")
    return rec


def _newest(records: list[SpanRecord | None]) -> int:
    """Index of the most recently issued record; on ties the later one (the newer arrival)."""
    best, best_key = 0, (-math.inf, -math.inf)
    for i, rec in enumerate(records):
        key = (rec.issued, rec.expires) if rec is not None else (-math.inf, -math.inf)
        if key >= best_key:
            best, best_key = i, key
    return best


class SpanValidator(Validator):
    """KadDHT validator for /dsdspan/ keys: storing nodes refuse anything verify_record rejects."""

    def validate(self, key: str, value: bytes) -> None:
        rec = verify_record(value)
        if key != value_key(rec.model, rec.peer_id):
            raise RecordRejected(f"key {key} does not belong to {rec.peer_id}'s record of {rec.model}")

    def select(self, key: str, values: list[bytes]) -> int:
        parsed: list[SpanRecord | None] = []
        for value in values:
            try:
                parsed.append(verify_record(value))
            except RecordRejected:
                parsed.append(None)
        return _newest(parsed)


class DHT:
    """Span announcements for one P2PNode. Methods are asyncio coroutines."""

    def __init__(self, node: P2PNode) -> None:
        self._node = node
        self._kad: KadDHT | None = None
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

    def _attach(self, kad: KadDHT) -> None:
        """Called on the trio thread once the KadDHT exists."""
        kad.register_validator(NAMESPACE, SpanValidator())
        self._kad = kad

    async def announce(self, rec: SpanRecord) -> None:
        """Publish (or refresh) our record and provider entry; re-announce before `expires`."""
        if rec.peer_id != self._node.peer_id:
            raise ValueError(f"record peer_id {rec.peer_id} is not this node ({self._node.peer_id})")
        self._last_issued = max(time.time(), self._last_issued + 1e-6)
        rec = dataclasses.replace(rec, issued=self._last_issued, addrs=list(rec.addrs))
        blob = sign_record(rec, self._node.keypair)
        verify_record(blob)  # fail here, not on every storing node, if e.g. already expired
        self._last[rec.model] = rec
        await self._node._bridge.call(self._t_publish, rec, blob, True)

    async def withdraw(self, model: str) -> None:
        """Best effort: overwrite our record with a zero-span one so readers drop us at once."""
        last = self._last.get(model)
        base = last or SpanRecord(model, 0, 0, self._node.peer_id, list(self._node.addrs), 0.0, 0, "", 0.0)
        self._last_issued = max(time.time(), self._last_issued + 1e-6)
        rec = dataclasses.replace(base, start=0, end=0, throughput=0.0, free_cache_tokens=0,
                                  expires=time.time() + WITHDRAW_TTL_S, issued=self._last_issued)
        self._last[model] = rec
        try:
            await self._node._bridge.call(self._t_publish, rec, sign_record(rec, self._node.keypair), False)
        except Exception as exc:
            log.warning("withdrawing %s from the DHT failed: %r", model, exc)

    def stats(self) -> dict[str, int]:
        """Health of this node's DHT (read from any thread: plain sizes, no locking needed): peers in
        the routing table, values and provider keys stored here."""
        kad = self._kad
        if kad is None:
            return {"routing_table_peers": 0, "stored_values": 0, "provider_keys": 0}
        return {"routing_table_peers": kad.routing_table.size(), "stored_values": len(kad.value_store.store),
                "provider_keys": len(kad.provider_store.providers)}

    async def discover(self, model: str) -> list[SpanRecord]:
        """Live, verified records of every provider of `model` (withdrawn/expired/forged dropped)."""
        return await self._node._bridge.call(self._t_discover, model)

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
        rec = await self._node._bridge.call(self._t_fetch_value, model, peer)
        if rec is None or rec.withdrawn:
            return None
        if len(self._found) >= LOOKUP_CACHE_SIZE:
            self._found = {k: r for k, r in self._found.items() if r.expires > now}
            while len(self._found) >= LOOKUP_CACHE_SIZE:
                del self._found[next(iter(self._found))]  # the oldest entry
        self._found[key] = rec
        return rec

    # ---- trio side ---------------------------------------------------------------------
    async def _t_publish(self, rec: SpanRecord, blob: bytes, provide: bool) -> None:
        """Store the record and our provider entry (withdrawing: the record, and drop the entry).

        Announcing first stores both at the peers we are connected to (a bootstrap peer, relays), so
        readers find us within a moment, and returns; the Kademlia puts to the key's closest peers
        in the whole network go on in the background. They can take 20 s and more: the closest
        peers may include nodes behind a NAT whose private addresses the DHT still lists, and each
        dial to one waits for its timeout."""
        kad = self._kad
        assert kad is not None
        key, vkey = provider_key(rec.model), value_key(rec.model, rec.peer_id)
        vkey_bytes = vkey.encode()
        if not provide:
            await kad.put_value(vkey, blob)
            kad.provider_store.providing_keys.discard(key)
            kad.provider_store.providers.get(key, {}).pop(self._node.peer_id, None)
            return
        kad.value_store.put(vkey_bytes, blob)
        connected = set(self._node._host.get_connected_peers())
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
        nursery = self._node._bridge.nursery
        if not self._spreading and nursery is not None:
            self._spreading = True
            nursery.start_soon(self._t_spread, vkey, blob, key)

    async def _t_spread(self, vkey: str, blob: bytes, key: bytes) -> None:
        """The Kademlia puts of one announce (one at a time: a later announce skips it while one runs)."""
        kad = self._kad
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
        kad = self._kad
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
                self._node._host.get_peerstore().add_addrs(peer, addrs, 3600)
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
        kad = self._kad
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
        if not any(_valid_for(blob, peer_b58, model) for source, blob in blobs if source == peer_b58):
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
        return valid[_newest(valid)]

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


def _valid_for(blob: bytes, peer_id: str, model: str) -> bool:
    try:
        rec = verify_record(blob)
    except RecordRejected:
        return False
    return rec.peer_id == peer_id and rec.model == model


def coverage(records: list[SpanRecord], num_layers: int) -> list[int]:
    """How many of `records` hold each layer of a model with num_layers layers."""
    counts = [0] * num_layers
    for r in records:
        for i in range(max(0, r.start), min(num_layers, r.end)):
            counts[i] += 1
    return counts
