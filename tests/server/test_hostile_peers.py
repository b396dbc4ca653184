"""Hostile peers against one real `dsdnode start` process (SmolLM2, float32, layers 0:10).

No frame, peer or stream may stop the daemon or grow it: a bounded fuzz (random bytes, mutated valid
frames, deep nesting, huge declared counts, big bad fields, truncated and partial frames) must leave
it alive, serving correct output and within 50 MB of its memory before; an expired session's KV
cache must be freed while its client's stream stays open; a second peer cannot touch someone else's
session; a next hop is dialled only through a valid span record; a partial frame is dropped after
the body timeout. The soak variant (DSDNODE_SOAK=1) runs the fuzz with 100k+ frames."""

from __future__ import annotations

import asyncio
import functools
import os
import random
import subprocess
import time
from dataclasses import dataclass, field

import msgpack
import pytest
import torch

from libp2p.peer.id import ID

from dsdnode import local_swarm
from dsdnode.local_swarm import start_node
from dsdnode.models.fetch import pull
from dsdnode.models.span import Span
from dsdnode.models.weights import weights_digest
from dsdnode.net.records import SpanRecord
from dsdnode.net.identity import load_or_create_identity
from dsdnode.net.p2p import P2PNode, PeerInfo, StreamClosed
from dsdnode.net.wire import (CloseSession, ErrorReply, Forward, ForwardResult, HopTiming, OpenSession,
                              SessionOpened, TensorPayload, WireError, WireLimits, decode, encode,
                              frame_ceiling)
from dsdnode.net.protocol import SESSION_PROTOCOL as PROTOCOL

pytestmark = pytest.mark.heavy
MODEL = "smollm2-135m"
HIDDEN = 576  # SmolLM2-135M
SPAN = (0, 10)
IDLE_S = 2.0
BODY_TIMEOUT_S = 2.0
MAX_LENGTH = 8192  # a session of this length holds 2 x 63 MB of float32 KV cache on layers 0:10
WRITTEN = 1536  # positions the expiry test writes: its cache grows to 2048 positions, 2 x 15.7 MB
REPLY_LIMITS = WireLimits()
REPLY_TIMEOUT_S = 20.0
CEILING = frame_ceiling(HIDDEN, 64)  # the server's frame ceiling (max_block 64): about 0.5 MiB, not 64 MiB


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    config = work / "node.toml"
    config.write_text(f"[node]\nsession_idle_s = {IDLE_S}\nframe_body_timeout_s = {BODY_TIMEOUT_S}\n"
                      f"cache_budget_mb = 320\nmax_session_length = {MAX_LENGTH}\n")
    # a fresh process, not a fork of the test fork server (tests/helpers/forkserver.py): these tests
    # bound the server's RSS, and a fork's RSS can also grow as it maps pages it shares with the fork
    # server (a forked server grew 67 MB in one 100k-frame soak fuzz; which of the two it was is not
    # measured yet)
    spawn, local_swarm.spawn = local_swarm.spawn, subprocess.Popen
    try:
        node = start_node(["--model", MODEL, "--layers", f"{SPAN[0]}:{SPAN[1]}", "--dtype", "float32",
                           "--config", str(config)], work / "server.log")
    finally:
        local_swarm.spawn = spawn
    try:
        yield node
    finally:
        node.proc.terminate()
        try:
            node.proc.wait(20)
        except Exception:
            node.proc.kill()
            node.proc.wait(10)


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    return Span.load(smollm2_dir, *SPAN, torch.float32)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def settle_rss(pid: int, below_mb: float, wait_s: float = 10.0) -> float:
    """RSS once it is below `below_mb`, or after wait_s (frees propagate over a few event loop turns)."""
    deadline = time.monotonic() + wait_s
    rss = rss_mb(pid)
    while rss >= below_mb and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        rss = rss_mb(pid)
    return rss


def peer(server) -> PeerInfo:
    return PeerInfo(server.peer_id, tuple(server.info["addrs"]))


async def client_node(server) -> P2PNode:
    return await P2PNode.start(bootstrap=[server.addr], identity=load_or_create_identity(None))


async def send_raw(stream, data: bytes) -> None:
    """Bytes straight onto the stream, bypassing framing: how a hostile peer writes partial frames."""
    await stream._bridge.call(stream._raw.write, data)


async def ask(stream, frame: bytes | object, timeout: float = REPLY_TIMEOUT_S):
    await stream.send(frame if isinstance(frame, bytes) else encode(frame))
    return decode(await stream.recv(timeout=timeout), REPLY_LIMITS)


def block(seed: int, t: int) -> torch.Tensor:
    return torch.randn(1, t, HIDDEN, generator=torch.Generator().manual_seed(seed))


def expected(reference: Span, blocks: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The reference span's output for the last of `blocks` ((hidden, commit_len) in order)."""
    cache = reference.new_cache(64)
    out = None
    for hidden, commit_len in blocks:
        out = reference.forward(hidden, cache, commit_len)
    return out


def forward(sid: str, step: int, hidden: torch.Tensor, commit_len: int) -> Forward:
    return Forward(sid, step, commit_len, TensorPayload.from_torch(hidden), None, [])


@functools.cache
def served_weights() -> str:
    """The digest a client computes from its own copy of the model: the server must agree."""
    return weights_digest(pull(MODEL, progress=False))


def opening(sid: str, max_length: int = 64, next_peer=None, prev_peer=None) -> OpenSession:
    return OpenSession(sid, MODEL, SPAN[0], SPAN[1], max_length, next_peer, prev_peer, "float32", served_weights())


async def check_normal_session(server, reference, node: P2PNode, sid: str) -> None:
    """A client opens a session and gets exactly the reference output, prefill then one more block."""
    stream = await node.open_stream(peer(server), PROTOCOL)
    try:
        assert isinstance(await ask(stream, opening(sid)), SessionOpened)
        b1, b2 = block(1, 5), block(2, 2)
        r1 = await ask(stream, forward(sid, 1, b1, 0))
        r2 = await ask(stream, forward(sid, 2, b2, 5))
        assert isinstance(r1, ForwardResult) and isinstance(r2, ForwardResult), (r1, r2)
        torch.testing.assert_close(r1.hidden.to_torch(), expected(reference, [(b1, 0)]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r2.hidden.to_torch(), expected(reference, [(b1, 0), (b2, 5)]),
                                   atol=1e-4, rtol=1e-4)
        await stream.send(encode(CloseSession(sid)))
    finally:
        await stream.close()


# ---- the fuzz --------------------------------------------------------------------------------------------------

def templates(rng: random.Random) -> list[bytes]:
    sid = f"fz{rng.randrange(1000)}"
    return [
        encode(opening(sid)),
        encode(forward(sid, rng.randrange(5), block(rng.randrange(99), rng.randint(1, 4)), 0)),
        encode(Forward(sid, 1, 0, TensorPayload.from_torch(block(0, 2)),
                       TensorPayload.from_torch(torch.ones(2, 2, dtype=torch.bool)), [HopTiming("p", 1.0, 0.1, 1.1, b"digest!!")])),
        encode(CloseSession(sid)),
        encode(SessionOpened(sid, "p", "float32")),
        encode(ErrorReply("busy", "x", sid, 1)),
    ]


def nested(depth: int, inner: bytes = b"\x90") -> bytes:
    return b"\x91" * depth + inner


def with_field(field_name: str, value: bytes) -> bytes:
    """A forward frame whose `field_name` holds the raw msgpack `value`."""
    body = msgpack.unpackb(encode(forward("fz", 1, block(0, 1), 0)))
    del body[field_name]
    return bytes([0x80 | (len(body) + 1)]) + msgpack.packb(body)[1:] + msgpack.packb(field_name) + value


def hostile_frame(rng: random.Random, big: bool) -> bytes:
    """One frame of a random hostile kind; big: 8 MiB of empty lists (what froze the daemon for seconds)."""
    if big:
        n = 8 << 20
        return rng.choice([with_field("timings", b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n),
                           b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n])
    kind = rng.random()
    if kind < 0.2:
        return rng.randbytes(rng.choice([0, 1, 2, 7, 30, 200, 3000]))
    if kind < 0.55:
        frame = bytearray(rng.choice(templates(rng)))
        for _ in range(rng.randint(1, 4)):
            if not frame:
                break
            op, at = rng.random(), rng.randrange(len(frame))
            if op < 0.5:
                frame[at] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                frame[at] = rng.choice([0xC1, 0xDC, 0xDD, 0xDE, 0xDF, 0xDB, 0xC6, 0xD6, 0xFF, 0x00])
            elif op < 0.85:
                del frame[at:]
            else:
                frame[at:at] = rng.randbytes(rng.randint(1, 8))
        return bytes(frame)
    if kind < 0.65:
        return rng.choice([nested(rng.choice([4, 50, 1000, 20_000])),
                           with_field("timings", nested(rng.choice([3, 100, 5000]))),
                           with_field("hidden", b"\x81\xa1k" * rng.choice([3, 300]) + b"\xc0")])
    if kind < 0.8:
        header = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff",
                             b"\xc6\xff\xff\xff\xff", b"\xdc\xff\xff"])
        return with_field(rng.choice(["timings", "hidden", "session_id", "attention_mask"]), header)
    if kind < 0.95:
        n = rng.choice([1000, 100_000, 1 << 20])
        return rng.choice([with_field("timings", b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n),
                           with_field("timings", b"\xdc\x01\x00" + (b"\xdc\x01\x00" + b"\x90" * 256) * 256),
                           b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n])
    n = rng.choice([300, 5000, 1 << 20])  # a big bad field: over the string cap, or an unknown field's name
    if rng.random() < 0.5:
        return with_field("session_id", msgpack.packb("s" * n))
    return msgpack.packb({"type": "open_session", "x" * n: 1, "model": "m" * min(n, 300)})


@dataclass
class FuzzStats:
    frames: int = 0
    replies: dict[str, int] = field(default_factory=dict)
    resets: int = 0
    oversize_resets: int = 0  # frames over the server's ceiling: refused at the length prefix, stream reset
    partial_resets: list[float] = field(default_factory=list)
    max_reply_bytes: int = 0
    max_small_latency_s: float = 0.0
    max_latency_s: float = 0.0
    elapsed_s: float = 0.0


async def fuzz(server, node: P2PNode, frames: int, seed: int, workers: int = 4) -> FuzzStats:
    """`frames` hostile frames over `workers` concurrent streams, each answered (or its stream reset) in time;
    a few streams get partial frames and must be reset after the body timeout."""
    stats = FuzzStats()
    t_start = time.monotonic()
    per_worker = frames // workers
    big_every = max(per_worker // 2, 1)  # two 8 MiB frames per worker

    async def worker(w: int, count: int) -> None:
        rng = random.Random(seed * 100 + w)
        stream = await node.open_stream(peer(server), PROTOCOL)
        try:
            for i in range(count):
                frame = hostile_frame(rng, big=(i % big_every == big_every - 1))
                t0 = time.monotonic()
                try:
                    await stream.send(frame, timeout=REPLY_TIMEOUT_S)
                    raw = await stream.recv(timeout=REPLY_TIMEOUT_S)
                except StreamClosed:  # a CloseSession of its own session ends the stream: take a new one
                    if len(frame) > CEILING:
                        stats.oversize_resets += 1
                    else:
                        stats.resets += 1
                    stream = await node.open_stream(peer(server), PROTOCOL)
                    continue
                latency = time.monotonic() - t0
                stats.frames += 1
                stats.max_latency_s = max(stats.max_latency_s, latency)
                if len(frame) < 4096:
                    stats.max_small_latency_s = max(stats.max_small_latency_s, latency)
                stats.max_reply_bytes = max(stats.max_reply_bytes, len(raw))
                reply = decode(raw, REPLY_LIMITS)
                key = reply.code if isinstance(reply, ErrorReply) else type(reply).__name__
                stats.replies[key] = stats.replies.get(key, 0) + 1
        finally:
            await stream.close()

    async def partial(data: bytes) -> None:
        stream = await node.open_stream(peer(server), PROTOCOL)
        t0 = time.monotonic()
        await send_raw(stream, data)
        try:
            await stream.recv(timeout=BODY_TIMEOUT_S + 30)
        except StreamClosed:
            stats.partial_resets.append(time.monotonic() - t0)
        finally:
            await stream.close()

    partials = [partial((1000).to_bytes(4, "big") + b"x" * 10),  # a body that stops
                partial((1 << 20).to_bytes(4, "big") + b"\x81" * 100),  # a big one that stops (+1 s per MiB)
                partial(b"\x00\x00"),  # half a length header
                partial((60).to_bytes(4, "big") + b"\x80")]
    await asyncio.gather(*(worker(w, per_worker) for w in range(workers)), *partials)
    stats.elapsed_s = time.monotonic() - t_start
    return stats


def run_fuzz_and_check(server, reference, frames: int, seed: int) -> FuzzStats:
    async def scenario():
        node = await client_node(server)
        try:
            await check_normal_session(server, reference, node, "warm-up")
            rss_before = rss_mb(server.proc.pid)
            stats = await fuzz(server, node, frames, seed)
            assert server.alive()
            await check_normal_session(server, reference, node, "after-fuzz")
            rss_after = await settle_rss(server.proc.pid, rss_before + 50)
            return stats, rss_before, rss_after
        finally:
            await node.stop()

    stats, rss_before, rss_after = asyncio.run(scenario())
    print(f"fuzz: {stats.frames} frames in {stats.elapsed_s:.1f} s ({stats.frames / stats.elapsed_s:.0f} frames/s), "
          f"replies {stats.replies}, resets {stats.resets} (+ {stats.oversize_resets} over the ceiling), partial resets after {stats.partial_resets}, "
          f"max reply {stats.max_reply_bytes} B, max latency {stats.max_latency_s:.2f} s "
          f"(small frames {stats.max_small_latency_s:.2f} s), RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    assert stats.frames + stats.oversize_resets >= frames * 0.95
    assert set(stats.replies) <= {"malformed", "too_large", "bad_dtype", "bad_shape", "unknown_session", "wrong_span",
                                  "wrong_weights", "bad_next_hop", "SessionOpened", "ForwardResult"}, stats.replies
    assert stats.max_reply_bytes < 1024  # every error message is capped
    assert stats.max_small_latency_s < 3.0  # no frame stalls the event loop for seconds...
    assert stats.max_latency_s < 5.0  # ...and 8 MiB of empty lists is refused as fast as it arrives
    assert len(stats.partial_resets) == 4 and all(t < BODY_TIMEOUT_S + 5 for t in stats.partial_resets)
    assert rss_after - rss_before < 50, f"RSS grew {rss_after - rss_before:.0f} MB"
    return stats


def test_fuzz_leaves_the_daemon_alive_small_and_serving(server, reference):
    run_fuzz_and_check(server, reference, frames=2400, seed=1)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_fuzz(server, reference):
    run_fuzz_and_check(server, reference, frames=int(os.environ.get("DSDNODE_SOAK_FRAMES", "100000")), seed=2)


# ---- targeted cases ----------------------------------------------------------------------------------------------

def test_oversized_frames_on_fresh_streams_leave_no_buffered_bodies_behind(server, reference):
    """A 1 MiB frame per stream, each refused at its length prefix: the server resets the stream and
    must forget the body bytes already in flight at once. yamux kept them (a window, 256 KiB, per
    stream) for 60 s: 300 such streams grew the server from 550 to 709 MB before `drop_muxer_buffer`."""
    n = 1 << 20
    big = b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n

    async def scenario():
        node = await client_node(server)
        try:
            await check_normal_session(server, reference, node, "before-oversize")
            rss_before = rss_mb(server.proc.pid)
            resets = 0
            for _ in range(300):
                stream = await node.open_stream(peer(server), PROTOCOL)
                try:
                    await stream.send(big, timeout=REPLY_TIMEOUT_S)
                    await stream.recv(timeout=REPLY_TIMEOUT_S)
                except StreamClosed:
                    resets += 1
                finally:
                    await stream.close()
            rss_after = await settle_rss(server.proc.pid, rss_before + 20)
            await check_normal_session(server, reference, node, "after-oversize")
            return resets, rss_before, rss_after
        finally:
            await node.stop()

    resets, rss_before, rss_after = asyncio.run(scenario())
    assert resets == 300  # every one refused at the prefix, none answered
    assert rss_after - rss_before < 20, f"RSS {rss_before:.0f} -> {rss_after:.0f} MB after 300 oversized frames"


def test_an_expired_session_frees_its_memory_while_its_stream_stays_open(server):
    async def scenario():
        node = await client_node(server)
        stream = await node.open_stream(peer(server), PROTOCOL)
        try:
            rss_before = await settle_rss(server.proc.pid, 0, wait_s=0)
            assert isinstance(await ask(stream, opening("big", MAX_LENGTH)), SessionOpened)
            for i in range(WRITTEN // 64):  # the cache grows as positions are written: to 2048 of them
                assert isinstance(await ask(stream, forward("big", i, block(3, 64), 64 * i)), ForwardResult)
            rss_open = rss_mb(server.proc.pid)
            expiry = decode(await stream.recv(timeout=IDLE_S + 15), REPLY_LIMITS)  # pushed by the reaper
            rss_expired = await settle_rss(server.proc.pid, rss_before + 20)
            after = await ask(stream, forward("big", 99, block(4, 1), WRITTEN))  # same stream, still open
            return rss_before, rss_open, expiry, rss_expired, after
        finally:
            await stream.close()
            await node.stop()

    rss_before, rss_open, expiry, rss_expired, after = asyncio.run(scenario())
    assert rss_open - rss_before > 25  # 2 x 15.7 MB of cache really were allocated
    assert isinstance(expiry, ErrorReply) and expiry.code == "unknown_session" and "expired" in expiry.message
    assert rss_expired - rss_before < 20, f"RSS {rss_before:.0f} -> {rss_open:.0f} -> {rss_expired:.0f} MB"
    assert isinstance(after, ErrorReply) and after.code == "unknown_session"


def test_a_second_peer_cannot_touch_someone_elses_session(server, reference):
    async def scenario():
        owner, intruder = await client_node(server), await client_node(server)
        mine = await owner.open_stream(peer(server), PROTOCOL)
        other = await intruder.open_stream(peer(server), PROTOCOL)
        try:
            b1, b2 = block(5, 3), block(6, 2)
            squatted = await ask(other, opening("mine"))  # the intruder takes the id first: a session of its own
            assert isinstance(await ask(mine, opening("mine")), SessionOpened)
            r1 = await ask(mine, forward("mine", 1, b1, 0))
            await other.close()
            other = await intruder.open_stream(peer(server), PROTOCOL)
            intrusions = [await ask(other, forward("mine", 2, block(7, 2), 3)),  # would overwrite positions 3, 4
                          await ask(other, forward("mine", 2, block(7, 2), 0)),
                          await ask(other, CloseSession("mine"))]
            second_stream_same_peer = await owner.open_stream(peer(server), PROTOCOL)
            intrusions.append(await ask(second_stream_same_peer, forward("mine", 2, block(7, 2), 3)))
            await second_stream_same_peer.close()
            r2 = await ask(mine, forward("mine", 2, b2, 3))
            # a session whose blocks come from an upstream peer: only that peer may push them
            opener = await owner.open_stream(peer(server), PROTOCOL)  # one session per client stream
            assert isinstance(await ask(opener, opening("pushed", prev_peer=intruder.peer_id)), SessionOpened)
            refused = await ask(opener, forward("pushed", 1, b1, 0))
            await other.send(encode(forward("pushed", 1, b1, 0)))
            pushed = decode(await opener.recv(timeout=REPLY_TIMEOUT_S), REPLY_LIMITS)  # the result goes to the opener
            await opener.close()
            return r1, intrusions, r2, refused, pushed, squatted
        finally:
            await mine.close()
            await other.close()
            await owner.stop()
            await intruder.stop()

    r1, intrusions, r2, refused, pushed, squatted = asyncio.run(scenario())
    assert isinstance(squatted, SessionOpened)  # and the owner's open of the same id still succeeded
    assert [(type(r).__name__, r.code) for r in intrusions] == [("ErrorReply", "unknown_session")] * 4
    assert all(r.message == "no open session 'mine' on this server" for r in intrusions)  # as if it did not exist
    assert isinstance(refused, ErrorReply) and refused.code == "unknown_session"
    torch.testing.assert_close(r2.hidden.to_torch(), expected(reference, [(block(5, 3), 0), (block(6, 2), 3)]),
                               atol=1e-4, rtol=1e-4)  # the intruder's blocks never reached the cache
    assert isinstance(pushed, ForwardResult) and pushed.session_id == "pushed"
    torch.testing.assert_close(pushed.hidden.to_torch(), r1.hidden.to_torch(), atol=1e-4, rtol=1e-4)


def test_the_next_hop_is_dialled_only_through_its_own_valid_span_record(server):
    async def scenario():
        client, good, wrong_span, other_weights = [await client_node(server) for _ in range(4)]
        got: asyncio.Queue = asyncio.Queue()

        async def next_hop_handler(stream):  # the fake next hop records what the server pushes
            while True:
                try:
                    await got.put(decode(await stream.recv(timeout=30), REPLY_LIMITS))
                except (StreamClosed, TimeoutError, WireError):
                    return

        good.set_stream_handler(PROTOCOL, next_hop_handler)
        try:
            expires = time.time() + 300
            for node, start, weights in [(good, 10, served_weights()), (wrong_span, 20, served_weights()),
                                         (other_weights, 10, "another checkpoint")]:
                await node.dht.announce(SpanRecord(MODEL, start, 30, node.peer_id, list(node.addrs), 10.0, 100, "t",
                                                   expires, weights=weights))
            absent = ID.from_pubkey(load_or_create_identity(None).public_key).to_base58()  # never announced
            replies = {}
            for name, next_peer in [("not a peer id", "not-a-peer-id"), ("no record", absent),
                                    ("wrong span", wrong_span.peer_id), ("other weights", other_weights.peer_id),
                                    ("good", good.peer_id)]:
                stream = await client.open_stream(peer(server), PROTOCOL)
                t0 = time.monotonic()
                replies[name] = (await ask(stream, opening(f"n-{len(replies)}", next_peer=next_peer)),
                                 time.monotonic() - t0)
                if name == "good":
                    await stream.send(encode(forward("n-4", 1, block(8, 2), 0)))
                    pushed = await asyncio.wait_for(got.get(), REPLY_TIMEOUT_S)
                await stream.close()
            return replies, pushed
        finally:
            for node in (client, good, wrong_span, other_weights):
                await node.stop()

    replies, pushed = asyncio.run(scenario())
    print({name: (reply.code if isinstance(reply, ErrorReply) else type(reply).__name__, round(s, 2))
           for name, (reply, s) in replies.items()})
    for name in ("not a peer id", "no record", "wrong span", "other weights"):
        reply, seconds = replies[name]
        assert isinstance(reply, ErrorReply) and reply.code == "bad_next_hop", (name, reply)
        assert seconds < 12
    assert "serves layers 20:30" in replies["wrong span"][0].message
    assert "no valid, live span record" in replies["no record"][0].message
    assert "serves other weights" in replies["other weights"][0].message
    assert isinstance(replies["good"][0], SessionOpened)
    assert isinstance(pushed, Forward) and pushed.session_id == "n-4"
    assert [t.peer_id for t in pushed.timings] == [server.peer_id]  # computed there, pushed to the record's address


def test_a_partial_frame_is_dropped_after_the_body_timeout(server, reference):
    async def scenario():
        node = await client_node(server)
        try:
            stream = await node.open_stream(peer(server), PROTOCOL)
            good = encode(opening("p1"))
            t0 = time.monotonic()
            await send_raw(stream, len(good).to_bytes(4, "big") + good[:-3])  # all but the last 3 bytes
            try:
                await stream.recv(timeout=BODY_TIMEOUT_S + 30)
                outcome = "answered"
            except StreamClosed:
                outcome = "reset"
            waited = time.monotonic() - t0
            await stream.close()
            await check_normal_session(server, reference, node, "after-partial")
            return outcome, waited
        finally:
            await node.stop()

    outcome, waited = asyncio.run(scenario())
    assert outcome == "reset" and BODY_TIMEOUT_S - 0.5 < waited < BODY_TIMEOUT_S + 5
    assert server.alive()


def test_throw_away_ids_opening_max_length_sessions_hold_no_memory(server, reference):
    """Each OpenSession used to reserve a whole max-length cache (2 x 63 MB here): two ids filled the
    320 MB budget. Now a cache is charged as it is written, so 8 ids x 4 sessions of 8192 positions
    hold nothing, and an honest client is served at once."""
    async def scenario():
        throwaway = [await client_node(server) for _ in range(8)]
        honest = await client_node(server)
        streams = []
        try:
            rss_before = await settle_rss(server.proc.pid, 0, wait_s=0)
            replies = []
            for i, node in enumerate(throwaway):
                for j in range(4):
                    stream = await node.open_stream(peer(server), PROTOCOL)
                    streams.append(stream)
                    replies.append(await ask(stream, opening(f"squat-{i}-{j}", MAX_LENGTH)))
            rss_open = rss_mb(server.proc.pid)
            t0 = time.monotonic()
            await check_normal_session(server, reference, honest, "honest")
            return replies, rss_before, rss_open, time.monotonic() - t0
        finally:
            for stream in streams:
                await stream.close()
            for node in (*throwaway, honest):
                await node.stop()

    replies, rss_before, rss_open, served_s = asyncio.run(scenario())
    print(f"32 max-length opens: RSS {rss_before:.0f} -> {rss_open:.0f} MB; honest client served in {served_s:.2f} s")
    assert all(isinstance(r, SessionOpened) for r in replies), replies
    assert rss_open - rss_before < 20  # was 32 x 126 MB asked for, 320 MB (the budget) held


def test_a_failed_next_hop_dial_says_the_same_after_the_same_time(server):
    """A next hop whose (self-signed) record lists a port with no libp2p behind it: a closed port, and
    an open one that accepts TCP and says nothing. Both used to be told apart (error text; 0.74 s
    vs 15 s); now both get one text, DIAL_S after the dial began. (This server serves a local
    swarm, so it may dial loopback at all: see tests/net/test_groups.py for the address rules.)"""
    import socket

    from dsdnode.server.next_hops import DIAL_S

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    ports = {"open": listener.getsockname()[1], "closed": closed.getsockname()[1]}

    async def scenario():
        client = await client_node(server)
        fakes = {name: load_or_create_identity(None) for name in ports}
        announcers = []
        try:
            for name, key in fakes.items():
                node = await P2PNode.start(bootstrap=[server.addr], identity=key)
                announcers.append(node)
                record = SpanRecord(MODEL, 10, 30, node.peer_id, [f"/ip4/127.0.0.1/tcp/{ports[name]}"], 10.0, 100,
                                    "t", time.time() + 300, weights=served_weights())
                await node.dht.announce(record)

            async def attempt(name: str, node: P2PNode):
                stream = await client.open_stream(peer(server), PROTOCOL)
                t0 = time.monotonic()
                reply = await ask(stream, opening(f"dial-{name}-{time.monotonic()}", next_peer=node.peer_id))
                while isinstance(reply, ErrorReply) and "expired" in reply.message:  # this server's IDLE_S < DIAL_S
                    reply = decode(await stream.recv(timeout=REPLY_TIMEOUT_S), REPLY_LIMITS)
                await stream.close()
                return name, reply, time.monotonic() - t0

            # the server looks their records up (and keeps them) while they live: it reaches them over
            # the connections they made; then they leave, and it must dial the records' addresses
            await asyncio.gather(*(attempt(n, a) for n, a in zip(fakes, announcers)))
            for node in announcers:
                await node.stop()
            await asyncio.sleep(1)
            return await asyncio.gather(*(attempt(n, a) for n, a in zip(fakes, announcers)))
        finally:
            await client.stop()

    try:
        results = asyncio.run(scenario())
    finally:
        listener.close()
        closed.close()
    print({name: (reply.code, reply.message[:40], round(s, 2)) for name, reply, s in results})
    texts = {reply.message.split(" 12D3")[0] for _, reply, _ in results}
    assert all(isinstance(r, ErrorReply) and r.code == "bad_next_hop" for _, r, _ in results), results
    assert texts == {"cannot reach next hop"}
    assert all(DIAL_S - 0.2 < s < DIAL_S + 3 for _, _, s in results), results
