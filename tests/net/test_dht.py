"""Span records: signing and verification, and discovery across real node processes."""

import dataclasses
import threading
import time

import msgpack
import pytest
from tests.helpers.p2p_node import NodeProcess

from dsdnode.net.records import (
    MAX_RECORD_BYTES,
    RecordRejected,
    SpanRecord,
    SpanValidator,
    sign_record,
    value_key,
    verify_record,
)
from dsdnode.net.identity import load_or_create_identity
from libp2p.peer.id import ID

MODEL = "test/model-a"


def make_record(keypair, **changes):
    peer_id = ID.from_pubkey(keypair.public_key).to_base58()
    rec = SpanRecord(MODEL, 0, 12, peer_id, ["/ip4/127.0.0.1/tcp/4001"], 42.5, 4096, "0.1.0",
                     time.time() + 300, time.time())
    return dataclasses.replace(rec, **changes)


def test_sign_verify_round_trip():
    kp = load_or_create_identity(None)
    rec = make_record(kp)
    assert verify_record(sign_record(rec, kp)) == rec


def test_rejections_have_reasons():
    kp, other = load_or_create_identity(None), load_or_create_identity(None)
    rec = make_record(kp)
    forged = make_record(kp, peer_id=ID.from_pubkey(other.public_key).to_base58())
    with pytest.raises(RecordRejected, match="signer"):
        verify_record(sign_record(forged, kp))
    with pytest.raises(RecordRejected, match="expired"):
        verify_record(sign_record(make_record(kp, expires=time.time() - 1), kp))
    assert verify_record(sign_record(rec, kp), now=rec.expires - 1) == rec
    with pytest.raises(RecordRejected, match="expired"):
        verify_record(sign_record(rec, kp), now=rec.expires + 1)

    envelope = msgpack.unpackb(sign_record(rec, kp))
    tampered = msgpack.unpackb(envelope["record"])
    tampered["end"] = 99
    envelope["record"] = msgpack.packb(tampered)
    with pytest.raises(RecordRejected, match="bad signature"):
        verify_record(msgpack.packb(envelope))

    with pytest.raises(RecordRejected, match="oversized"):
        sign_record(make_record(kp, addrs=["/ip4/1.2.3.4/tcp/1"] * 300), kp)
    with pytest.raises(RecordRejected, match="oversized"):
        verify_record(b"\x00" * (MAX_RECORD_BYTES + 1))
    for garbage in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"record": 1})):
        with pytest.raises(RecordRejected, match="malformed"):
            verify_record(garbage)


def test_validator_checks_key_and_prefers_newest():
    kp = load_or_create_identity(None)
    old = sign_record(make_record(kp, issued=100.0), kp)
    new = sign_record(make_record(kp, issued=200.0), kp)
    validator = SpanValidator()
    key = value_key(MODEL, make_record(kp).peer_id)
    validator.validate(key, new)
    with pytest.raises(RecordRejected):
        validator.validate(value_key("other-model", make_record(kp).peer_id), new)
    assert validator.select(key, [old, new]) == 1
    assert validator.select(key, [new, old]) == 0
    assert validator.select(key, [b"junk", old]) == 1
    assert validator.select(key, [old, old]) == 1  # tie: the later arrival wins
    assert len(key.encode()) <= 50


def start_many(**configs):
    """Start node processes in parallel (each takes ~1 s to import libp2p)."""
    procs = {}

    def start(name, config):
        procs[name] = NodeProcess.start(**config)

    threads = [threading.Thread(target=start, args=item) for item in configs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return procs


def test_discovery_across_processes_drops_forged_records():
    boot = NodeProcess.start()
    procs = {}
    try:
        bootstrap = [boot.addrs[0]]
        procs = start_many(a=dict(bootstrap=bootstrap), b=dict(bootstrap=bootstrap),
                           evil=dict(bootstrap=bootstrap), reader=dict(bootstrap=bootstrap))
        a, b, evil, reader = procs["a"], procs["b"], procs["evil"], procs["reader"]
        expires = time.time() + 300
        common = dict(model=MODEL, throughput=50.0, free_cache_tokens=8192, version="0.1.0", expires=expires)
        a.request("announce", record=dict(common, start=0, end=12))
        b.request("announce", record=dict(common, start=12, end=24))
        assert evil.request("forge", model=MODEL, kind="wrong_signer")["remote_accepted"] == 0
        assert evil.request("forge", model="test/model-expired", kind="expired")["remote_accepted"] == 0

        found = reader.request("discover", model=MODEL)
        records = found["records"]
        assert sorted((r["peer_id"], r["start"], r["end"]) for r in records) == sorted(
            [(a.peer_id, 0, 12), (b.peer_id, 12, 24)])
        assert all(r["addrs"] and r["expires"] == expires for r in records)
        assert found["partial"] is False  # every provider's record was fetched
        assert reader.request("discover", model="test/model-expired")["records"] == []
        unknown = reader.request("discover", model="test/unknown")
        # a definite "nobody serves it" (peers were asked), not a look that may have missed servers
        assert (unknown["records"], unknown["partial"]) == ([], False)
        alone = NodeProcess.start()  # knows no peer: its empty answer says nothing about the swarm
        try:
            lonely = alone.request("discover", model=MODEL)
            assert (lonely["records"], lonely["partial"]) == ([], True)
        finally:
            alone.stop()

        # Updates are seen (no stale cache), and a withdrawn span disappears.
        a.request("announce", record=dict(common, start=0, end=6))
        b.request("withdraw", model=MODEL)
        records = reader.request("discover", model=MODEL)["records"]
        assert [(r["peer_id"], r["start"], r["end"]) for r in records] == [(a.peer_id, 0, 6)]
    finally:
        for proc in (*procs.values(), boot):
            proc.stop()


def test_record_device_kind_is_signed_and_checked():
    from dsdnode.net.records import RecordRejected, sign_record, verify_record

    key = load_or_create_identity(None)
    peer = ID.from_pubkey(key.public_key).to_base58()
    rec = SpanRecord(MODEL, 0, 4, peer, [], 1.0, 10, "v", time.time() + 60, device="cuda")
    assert verify_record(sign_record(rec, key)).device == "cuda"
    with pytest.raises(RecordRejected, match="device"):
        verify_record(sign_record(dataclasses.replace(rec, device="tpu"), key))
