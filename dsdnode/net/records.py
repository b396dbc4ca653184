"""Signed, expiring span records: what a server offers, signed with its libp2p key.

A record carries its own `expires` (a storing node's DHT expiry is fixed at 24 h); verify_record
refuses forged, expired, oversized and malformed records and those of another protocol version,
and newest() orders records of one peer by when they were issued. The DHT's value store
(dht.py) and the membership directory (directory.py) both keep only what verify_record accepts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass

import msgpack
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from ..errors import PeerError
from .protocol import PROTOCOL_VERSION

NAMESPACE = "dsdspan"
MAX_RECORD_BYTES = 4096
SIGN_DOMAIN = b"dsdnode/span-record/v1\x00"


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


@dataclass(frozen=True)
class SignedHeader:
    """The fields of a signed record that every protocol version shares: enough for a storing node
    to file and expire a record it cannot parse fully (a reader then says why it cannot use it)."""

    signer: str
    model: str
    issued: float
    expires: float


def verify_header(blob: bytes, now: float | None = None) -> SignedHeader:
    """Check size, envelope, signature, signer == peer_id and expiry, whatever the protocol version."""
    signer, body = _open_envelope(blob)
    try:
        fields = msgpack.unpackb(body, raw=False)
        model, peer_id, issued, expires = fields["model"], fields["peer_id"], fields["issued"], fields["expires"]
        if not (isinstance(model, str) and isinstance(peer_id, str)
                and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
                        for t in (issued, expires))):
            raise ValueError("model, peer_id, issued or expires has the wrong type")
    except Exception as exc:
        raise RecordRejected(f"malformed: {exc!r}") from None
    if signer != peer_id:
        raise RecordRejected(f"signer {signer} is not the announced peer {peer_id}")
    now = time.time() if now is None else now
    if expires <= now:
        raise RecordRejected(f"expired at {expires:.0f} (now {now:.0f})")
    return SignedHeader(signer, model, float(issued), float(expires))


def verify_record(blob: bytes, now: float | None = None) -> SpanRecord:
    """Check size, signature, signer == peer_id and expiry; return the record."""
    signer, body = _open_envelope(blob)
    rec = _parse_record(body)
    if signer != rec.peer_id:
        raise RecordRejected(f"signer {signer} is not the announced peer {rec.peer_id}")
    now = time.time() if now is None else now
    if rec.expires <= now:
        raise RecordRejected(f"expired at {rec.expires:.0f} (now {now:.0f})")
    return rec


def _open_envelope(blob: bytes) -> tuple[str, bytes]:
    """The signer's peer id and the signed body of a record envelope, if the signature checks."""
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
    return ID.from_pubkey(public_key).to_base58(), body


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


def newest(records: list[SpanRecord | None]) -> int:
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
        return newest(parsed)


def valid_for(blob: bytes, peer_id: str, model: str) -> bool:
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
