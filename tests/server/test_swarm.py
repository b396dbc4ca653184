"""A real swarm on loopback: bootstrap peer + servers in separate processes, the client here.

The client must produce exactly the greedy tokens of the in-process chain, survive a server that
is killed mid-generation, and the servers must reject bad input with clear errors and keep serving."""

import asyncio

import pytest
import torch

from dsdnode.local_swarm import LocalSwarm
from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.local import LocalChain
from dsdnode.client.swarm_chain import RemoteChain
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.models.weights import weights_digest
from dsdnode.net.p2p import P2PNode, PeerInfo
from dsdnode.net.wire import ErrorReply, Forward, OpenSession, SessionOpened, TensorPayload, WireLimits, decode, encode
from dsdnode.net.protocol import SESSION_PROTOCOL as PROTOCOL
from dsdnode.speculative.controller import ControllerSettings
from dsdnode.speculative.draft import Drafter

pytestmark = pytest.mark.heavy
SPANS = [(0, 10), (10, 20), (10, 20), (20, 30)]  # layers 10:20 twice: one may die
PROMPT = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def swarm(smollm2_dir, tmp_path_factory):
    with LocalSwarm("smollm2-135m", SPANS, tmp_path_factory.mktemp("swarm"), dtype="float32") as sw:
        yield sw


@pytest.fixture(scope="module")
def audited_swarm(smollm2_dir, tmp_path_factory):
    """The same spans, each server on a network of its own: the replicas of 10:20 audit each other."""
    with LocalSwarm("smollm2-135m", SPANS, tmp_path_factory.mktemp("audited"), dtype="float32",
                    own_networks=True) as sw:
        yield sw


@pytest.fixture(scope="module")
def client_parts(smollm2_dir):
    from transformers import AutoTokenizer
    head = Head.load(smollm2_dir, torch.float32)
    draft_span = Span.load(smollm2_dir, 0, 22, torch.float32)  # the target minus 8 layers: a weak draft
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT)["input_ids"]
    return head, draft_span, ids


def settings(n=40):
    return GenerationSettings(max_new_tokens=n, controller=ControllerSettings(k_fixed=4))


def run(chain, client_parts, n=40, on_tokens=None):
    head, draft_span, ids = client_parts
    drafter = Drafter(head, [draft_span], 256, settings(n).sampling)
    return Generator(head, chain, drafter, settings(n), eos_ids=set()).generate(ids, on_tokens)


async def remote_chain(swarm, head, wire="exact"):
    node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs, client=True)
    return RemoteChain(node, "smollm2-135m", 30, head.config.hidden_size, weights=swarm.servers[0].info["weights"],
                       dtype=torch.float32, wire=wire)


def test_swarm_generates_the_in_process_tokens(swarm, client_parts, smollm2_dir):
    local = LocalChain([Span.load(smollm2_dir, a, b, torch.float32) for a, b in [(0, 10), (10, 20), (20, 30)]])
    expected = asyncio.run(run(local, client_parts, n=24)).tokens

    async def remote():
        chain = await remote_chain(swarm, client_parts[0])
        try:
            result = await run(chain, client_parts, n=24)
            return result, chain.route
        finally:
            await chain.shutdown()
    result, route = asyncio.run(remote())
    assert result.tokens == expected
    assert [(a, b) for _, a, b in route] == [(0, 10), (10, 20), (20, 30)]
    assert all(len(r.hop_compute_s) == 3 for r in result.rounds)
    assert all(len(r.hop_link_s) == 2 and all(0 <= x < 5 for x in r.hop_link_s) for r in result.rounds)


def test_int8_wire_gives_the_text_of_local_spans_rounded_alike(audited_swarm, client_parts, smollm2_dir):
    """The opt-in int8 wire (lossy): a real session whose hops send hidden states as int8 blocks gives
    exactly the text of in-process spans whose links round them the same way, its blocks are about a
    quarter of float32's bytes, and a server refuses int8 blocks in a session opened lossless (no
    hop can turn a client's session lossy)."""
    spans = [Span.load(smollm2_dir, a, b, torch.float32) for a, b in [(0, 10), (10, 20), (20, 30)]]
    expected = asyncio.run(run(LocalChain(spans, wire="int8"), client_parts, n=24)).tokens
    hidden = client_parts[0].config.hidden_size

    async def remote():
        chain = await remote_chain(audited_swarm, client_parts[0], wire="int8")
        try:
            return await run(chain, client_parts, n=24), chain.failovers, dict(chain.excluded), chain.auditor.stats
        finally:
            await chain.shutdown()
    result, failovers, excluded, audits = asyncio.run(remote())
    assert result.tokens == expected
    # audits compared the hops' rounded outputs with exact recomputations and accused no honest hop
    assert audits.positions > 0 and audits.mismatches == 0, audits
    assert failovers == 0 and not excluded
    block = (1 + 4) * hidden  # k = 4: 5 positions
    assert all(0 < r.block_bytes < block * 4 // 3 for r in result.rounds if r.k == 4), [r.block_bytes for r in result.rounds]

    async def lossless_session_refuses_int8():
        node = await P2PNode.start(bootstrap=audited_swarm.bootstrap_addrs, client=True)
        server = audited_swarm.servers[0]
        try:
            stream = await node.open_stream(PeerInfo(server.peer_id, tuple(server.info["addrs"])), PROTOCOL)
            await stream.send(encode(OpenSession("lossless", "smollm2-135m", 0, 10, 64, None, None, "float32",
                                                 server.info["weights"])))
            opened = decode(await stream.recv(timeout=20), WireLimits())
            await stream.send(encode(Forward("lossless", 1, 0, TensorPayload.int8_blocks(torch.randn(1, 2, hidden)),
                                             None, [])))
            return opened, decode(await stream.recv(timeout=20), WireLimits())
        finally:
            await node.stop()
    opened, refused = asyncio.run(lossless_session_refuses_int8())
    assert isinstance(opened, SessionOpened)
    assert isinstance(refused, ErrorReply) and refused.code == "bad_dtype" and "'exact'" in refused.message


def test_bad_input_gets_clear_errors_and_the_daemon_keeps_serving(swarm, client_parts, smollm2_dir):
    server = swarm.servers[0]
    hidden = client_parts[0].config.hidden_size
    weights = weights_digest(smollm2_dir)  # what a client computes from its own copy
    assert server.info["weights"] == weights

    async def probe():
        node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs, client=True)
        peer = PeerInfo(server.peer_id, tuple(server.info["addrs"]))
        try:
            replies = {}
            cases = {
                "garbage": b"\x00\xffnot msgpack",
                "unknown_session": encode(Forward("nope", 1, 0, TensorPayload.from_torch(torch.zeros(1, 2, hidden)), None, [])),
                "wrong_shape": encode(Forward("nope", 1, 0, TensorPayload.from_torch(torch.zeros(1, 2, hidden + 1)), None, [])),
                "wrong_dtype": encode(Forward("nope", 1, 0, TensorPayload.from_torch(torch.zeros(1, 2, hidden, dtype=torch.int64)), None, [])),
                "wrong_span": encode(OpenSession("s1", "smollm2-135m", 0, 25, 64, None, None, "float32", weights)),
                "too_long": encode(OpenSession("s2", "smollm2-135m", 0, 10, 10**9, None, None, "float32", weights)),
                "wrong_weights": encode(OpenSession("s3", "smollm2-135m", 0, 10, 64, None, None, "float32", "other")),
            }
            for name, frame in cases.items():
                stream = await node.open_stream(peer, PROTOCOL)
                await stream.send(frame)
                replies[name] = decode(await stream.recv(timeout=20), WireLimits())
                await stream.close()
            # an oversized frame: the stream is reset, the node lives on
            stream = await node.open_stream(peer, PROTOCOL)
            try:
                await stream.send(b"x" * (65 * 2**20), timeout=20)
                await stream.recv(timeout=20)
            except Exception:
                pass
            # ... and still opens sessions and computes
            stream = await node.open_stream(peer, PROTOCOL)
            await stream.send(encode(OpenSession("ok", "smollm2-135m", 0, 10, 64, None, None, "float32", weights)))
            opened = decode(await stream.recv(timeout=20), WireLimits())
            await stream.send(encode(Forward("ok", 1, 0, TensorPayload.from_torch(torch.randn(1, 3, hidden)), None, [])))
            result = decode(await stream.recv(timeout=20), WireLimits())
            # a float16 block to this float32 server: computed in float32, answered in float16
            half = TensorPayload.from_torch(torch.randn(1, 1, hidden, dtype=torch.float16))
            await stream.send(encode(Forward("ok", 2, 3, half, None, [])))
            result_half = decode(await stream.recv(timeout=20), WireLimits())
            return replies, opened, (result, result_half)
        finally:
            await node.stop()

    replies, opened, (result, result_half) = asyncio.run(probe())
    assert all(isinstance(r, ErrorReply) for r in replies.values())
    codes = {name: r.code for name, r in replies.items()}
    assert codes == {"garbage": "malformed", "unknown_session": "unknown_session", "wrong_shape": "bad_shape",
                     "wrong_dtype": "bad_dtype", "wrong_span": "wrong_span", "too_long": "too_large",
                     "wrong_weights": "wrong_weights"}
    assert "layers 0:10" in replies["wrong_span"].message
    assert isinstance(opened, SessionOpened)
    assert result.hidden.shape == (1, 3, hidden) and result.timings[0].peer_id == server.peer_id
    assert (result.hidden.dtype, result_half.hidden.dtype) == ("float32", "float16")  # replies in the sender's dtype
    assert server.alive()


# every run kills a server mid-generation elsewhere (tests/client/test_failover.py, test_tree_swarm.py); this
# one, a middle hop of three, with DSDNODE_SOAK=1 (suite time)
@pytest.mark.soak
def test_killed_server_mid_generation_gives_the_same_output(swarm, client_parts, smollm2_dir):
    local = LocalChain([Span.load(smollm2_dir, a, b, torch.float32) for a, b in [(0, 10), (10, 20), (20, 30)]])
    expected = asyncio.run(run(local, client_parts, n=32)).tokens

    async def remote():
        chain = await remote_chain(swarm, client_parts[0])
        seen = []

        def kill_middle_hop(tokens):
            seen.extend(tokens)
            if len(seen) >= 8 and not chain.failovers and chain.legs:
                victim = next(s for s in swarm.servers if s.peer_id == chain.route[1][0])
                swarm.kill(victim)
        try:
            result = await run(chain, client_parts, n=32, on_tokens=kill_middle_hop)
            return result, chain
        finally:
            await chain.shutdown()
    result, chain = asyncio.run(remote())
    assert chain.failovers >= 1
    assert result.tokens == expected
    alive_middle = [s for s in swarm.servers if s.info["start"] == 10 and s.alive()]
    assert len(alive_middle) == 1 and chain.route[1][0] == alive_middle[0].peer_id


def test_pipelined_prefill_over_the_swarm_gives_the_same_tokens(swarm, client_parts):
    """A long prompt sent as chunks back to back (the hops overlap them) gives exactly the tokens of
    the chunk-by-chunk prefill, and the bytes each link carried are reported."""
    head, draft_span, ids = client_parts
    prompt = (ids * 40)[:200]

    async def both():
        chain = await remote_chain(swarm, head)
        try:
            out = {}
            for pipeline, chunk in ((False, None), (True, 24), (True, None)):
                s = GenerationSettings(max_new_tokens=4, prefill_chunk=chunk, prefill_pipeline=pipeline,
                                       controller=ControllerSettings(k_fixed=3))
                drafter = Drafter(head, [draft_span], 512, s.sampling)
                out[pipeline, chunk] = await Generator(head, chain, drafter, s, eos_ids=set()).generate(prompt)
            return out
        finally:
            await chain.shutdown()
    out = asyncio.run(both())
    tokens = {key: r.tokens for key, r in out.items()}
    assert len(set(map(tuple, tokens.values()))) == 1, tokens
    assert out[True, 24].prefill_chunk == 24 and out[False, None].prefill_chunk == 64
    assert 1 <= out[True, None].prefill_chunk <= 64  # chosen from what the chain measured
    hidden_bytes = (len(prompt) - 1) * head.config.hidden_size * 4  # float32 on every link
    for r in out.values():
        assert hidden_bytes < r.prefill_bytes < hidden_bytes * 1.05
        assert all(rd.block_bytes > (rd.nodes + 1) * head.config.hidden_size * 4 for rd in r.rounds)
        assert all(rd.reply_bytes > 3 * rd.block_bytes * 0.9 for rd in r.rounds)  # 3 hops' outputs come back
