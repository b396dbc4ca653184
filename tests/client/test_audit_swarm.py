"""Audits with real server processes: every faulty flavour is caught, banned and repaired, and no
honest run is flagged.

One bootstrap peer and three honest servers live for the module (SmolLM2, float32): layers 0:15,
and two for 15:30 made slower with an emulated link latency, so routing prefers a faulty 15:30
server that a test starts (tests/helpers/faulty_server.py). The two honest 15:30 servers are the
two independent auditors. Every server listens on a loopback network of its own (127.0.N.1), so the
client observes each in its own network group, as it would servers of different operators. The
expected text is the in-process chain's greedy output."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from dsdnode.client.bans import BanList
from dsdnode.client.standing import Standing, TrustSettings
from dsdnode.client.swarm_chain import RemoteChain
from dsdnode.local_swarm import LocalSwarm
from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.local import LocalChain
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.speculative.controller import ControllerSettings
from dsdnode.speculative.draft import Drafter
from tests.client.test_failover import (MODEL, SOAK, client_chain, generate, parts,  # noqa: F401 (fixtures)
                                       servers, swarm)
from dsdnode.local_swarm import own_network_args
from tests.helpers.faulty_server import LAUNCHER
from tests.helpers.ports import free_port

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(900)]  # real processes on a shared machine
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def honest(swarm):
    slower = ["--link-latency-ms", "150"]  # far slower than the faulty server, whatever the machine's load
    with servers(swarm, (0, 15, on_net(1)), (15, 30, [*slower, *on_net(2)]), (15, 30, [*slower, *on_net(3)])) as nodes:
        yield nodes


def on_net(n: int) -> list[str]:
    """Be reached at 127.0.n.1 (a network group of its own, as the client observes it): announce only
    that address. The server listens on every interface, because a peer that checks its reachability
    dials it back at the address it saw it come from, and on loopback that is 127.0.0.1."""
    return own_network_args(n, free_port())


@pytest.fixture(scope="module")
def expected_long(parts, smollm2_dir):
    local = LocalChain([Span.load(smollm2_dir, a, b, torch.float32) for a, b in [(0, 15), (15, 30)]])
    return asyncio.run(generate(local, parts, n=NEW_TOKENS)).tokens


@pytest.fixture()
def bans(tmp_path, monkeypatch):
    path = tmp_path / "bans.json"
    monkeypatch.setenv("DSDNODE_BANS", str(path))
    return BanList(path)


def run(swarm, parts, peers, slow: set[str], trust: TrustSettings, k_fixed=2, n=NEW_TOKENS, avoid: set[str] = set()):
    """Generate over a client that measured the `slow` peers slow and avoids the `avoid` ones."""
    async def main():
        base = await client_chain(swarm, parts[0], peers)
        # routing would avoid the honest alternates anyway (slower links), but under a heavy machine load a
        # fresh server's first ping can be slow too: say the client measured them slow, so the faulty
        # server is the one routed, whatever the load. 10 s, not 1 s: unmeasured claims are capped at twice
        # the measured median, so at 1 s an unmeasured honest replica with 150 ms links and a session
        # or two announced cost about as much as a "slow" one (the shadow-session test once routed wrong)
        standing = Standing(trust)
        for rec in await base.node.dht.discover(MODEL):
            if rec.peer_id in slow:
                standing.measured(rec, rec.end - rec.start, 10.0)
        chain = RemoteChain(base.node, MODEL, 30, parts[0].config.hidden_size, weights=base.weights, dtype=base.dtype,
                            trust=trust,
                            standing=standing)
        chain.router.seed = ""  # the cheapest route, not a spread over replicas: the faulty server first
        for peer in avoid:
            chain.router.exclude(peer, "avoided by the test", f"{peer} avoided by the test")
        try:
            streamed = []
            result = await generate(chain, parts, streamed.extend, k_fixed, n)
            return result, chain, streamed
        finally:
            await chain.shutdown()
    return asyncio.run(main())


# one flavour in every run (each costs a swarm and a generation); all of them with DSDNODE_SOAK=1
@pytest.mark.parametrize("fault", ["noise", *(pytest.param(f, marks=pytest.mark.soak)
                                              for f in ("sometimes", "scaled", "weights"))])
def test_a_faulty_server_is_caught_banned_and_repaired(swarm, honest, parts, expected_long, bans, fault):
    with servers(swarm, (15, 30, on_net(4), [*LAUNCHER, fault])) as (bad,):
        result, chain, streamed = run(swarm, parts, [*honest, bad], {n.peer_id for n in honest[1:]}, TrustSettings())
    stats = chain.auditor.stats
    print(f"\n{fault}: rounds to detection {stats.rounds_to_detection}, {len(result.rounds)} rounds, "
          f"{stats.audits} hop audits over {stats.positions} positions, {stats.unaudited} unaudited; "
          f"bans {[(p == bad.peer_id, b.reason[:40]) for p, b in bans.active().items()]}")
    assert result.tokens == expected_long
    assert streamed == expected_long  # nothing wrong was ever handed out
    assert set(bans.active()) == {bad.peer_id}
    assert "wrong outputs" in bans.active()[bad.peer_id].reason
    # an audit starts after round 1 and then every audit_every rounds, and runs alongside generation
    # (catch-up, then a third opinion from position 0): its verdict lands some rounds later (measured 2
    # for the always-wrong flavours, 13 for 1 block in 20 with audit_every 10, on a loaded machine)
    assert stats.rounds_to_detection and max(stats.rounds_to_detection) <= chain.audit_every + 5
    assert all(peer != bad.peer_id for peer, _, _ in chain.route)


@pytest.mark.timeout(3600 if SOAK else 900)  # the soak run: 128 tokens, every round audited, on 2 shared cores
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.soak)])
def test_honest_servers_are_never_flagged(parts, bans, dtype, expected_long, smollm2_dir, tmp_path):
    """Every round audited, in both dtypes: no mismatch (the tolerance holds honest differences). A
    swarm of its own: only servers of this dtype. With DSDNODE_SOAK=1: 128 tokens, over 200 hop audits
    in each dtype, and still no mismatch and no ban."""
    with LocalSwarm(MODEL, [], tmp_path, dtype=dtype) as swarm, \
            servers(swarm, *((a, b, on_net(n)) for n, (a, b) in enumerate([(0, 15), (0, 15), (15, 30), (15, 30)], 1))) as nodes:
        async def main():
            base = await client_chain(swarm, parts[0], nodes)
            chain = RemoteChain(base.node, MODEL, 30, parts[0].config.hidden_size, weights=base.weights,
                                dtype=getattr(torch, dtype),
                                trust=TrustSettings(audit_rate=1.0))  # the same client node, in this dtype
            head, draft_span, ids = parts
            # every position audited: half the faulty runs' tokens are enough (greedy: a prefix of their text)
            settings = GenerationSettings(max_new_tokens=128 if SOAK else NEW_TOKENS // 2,
                                          controller=ControllerSettings(k_fixed=4))
            target_head = Head.load(smollm2_dir, getattr(torch, dtype))
            generator = Generator(target_head, chain, Drafter(head, [draft_span], 256, settings.sampling), settings,
                                  set())
            try:
                return await generator.generate(ids), chain
            finally:
                await chain.shutdown()
        result, chain = asyncio.run(main())
    stats = chain.auditor.stats
    print(f"\n{dtype}: {stats.audits} hop audits over {stats.positions} positions, {stats.mismatches} mismatches")
    assert stats.mismatches == 0 and not bans.active()
    assert stats.audits >= 200 or not SOAK
    checked = len(parts[2]) + len(result.tokens) - 1  # positions whose outputs made the text
    assert stats.positions >= 2 * checked and stats.unaudited == 0  # both hops, every position
    if dtype == "float32" and not SOAK:
        assert result.tokens == expected_long[:NEW_TOKENS // 2]


def observed(node, since: float, until: float) -> list[dict]:
    """What an `observe` server (tests/helpers/faulty_server.py) logged between two times."""
    lines = [json.loads(line.split("OBSERVED ", 1)[1]) for line in node.log_path.read_text().splitlines()
             if "OBSERVED " in line]
    return [o for o in lines if since <= o["t"] <= until]


def sessions(seen: list[dict]) -> list[tuple[dict, list[tuple]]]:
    """Each OpenSession seen, with the shapes of the blocks it was sent (as a tuple per block)."""
    opens = [o for o in seen if o["kind"] == "open"]
    return [(o, [(b["step"], b["commit_len"], tuple(b["size"]), b["tree"], b["positions"], b["kept"])
                 for b in seen if b["kind"] == "block" and b["session_id"] == o["session_id"]]) for o in opens]


def paced(seen: list[dict], session_id: str) -> list[bool]:
    """For each block of a session after its first: whether it came only once the server was done with
    the block before it (a client that waits for each pass) rather than while it was at work on it."""
    blocks = [o for o in seen if o["kind"] == "block" and o["session_id"] == session_id]
    done = {o["step"]: o["t"] for o in seen if o["kind"] == "done" and o["session_id"] == session_id}
    return [b["t"] >= done[a["step"]] for a, b in zip(blocks, blocks[1:])]


def test_a_shadow_session_is_sent_what_a_real_session_is_sent(swarm, honest, parts, expected_long, bans):
    """What a server sees of an audit's shadow session and of a real session. Two observing servers
    (tests/helpers/faulty_server.py `observe`), O1 (0:15) and O2 (15:30), are first the route of a
    generation, then the only auditors of a generation by another client routed over h0 and h1 (h2
    avoided): its shadow route is O1 -> O2. At each observer, the shadow session and the real one open
    the same layers with the same parameters; name a previous hop and a next hop alike (O2's previous
    hop is O1 in both, O1's next hop is O2 in both); are sent the same blocks in the same order (step
    ids, commit_len, sizes, token trees, kept paths, from the route's first block); get them the same
    way (O2: pushed by O1, stamped with O1's timing; O1: from the opener); and get each block only once
    done with the one before (a client waiting for each pass, not a back-to-back catch-up). What still
    differs is the opener's id (a fresh one per shadow route): docs/ARCHITECTURE.md, "Shadow sessions"."""
    h0, h1, h2 = honest
    with servers(swarm, (0, 15, on_net(11), [*LAUNCHER, "observe"]),
                 (15, 30, on_net(12), [*LAUNCHER, "observe"])) as observers:
        o1, o2 = observers
        peers = [*honest, *observers]
        t0 = time.time()
        real_result, real_chain, _ = run(swarm, parts, peers, {h0.peer_id, h1.peer_id, h2.peer_id}, TrustSettings(),
                                         n=16)
        t1 = time.time()
        audit_result, audit_chain, _ = run(swarm, parts, peers, {o1.peer_id, o2.peer_id, h2.peer_id}, TrustSettings(),
                                           n=16, avoid={h2.peer_id})
        t2 = time.time()
        seen = {o.peer_id: (observed(o, t0, t1), observed(o, t1, t2)) for o in observers}
    assert real_result.tokens == audit_result.tokens == expected_long[:16]
    assert [p for p, _, _ in real_chain.route] == [o1.peer_id, o2.peer_id]
    assert [p for p, _, _ in audit_chain.route] == [h0.peer_id, h1.peer_id]
    stats = audit_chain.auditor.stats
    assert stats.routed >= 2 and stats.audits == stats.routed and stats.mismatches == 0, stats  # all from the route
    clients = (real_chain.node.peer_id, audit_chain.node.peer_id)
    openers = set()
    for o, prev_hop, next_hop in ((o1.peer_id, None, o2.peer_id), (o2.peer_id, o1.peer_id, None)):
        (as_hop, as_auditor) = (sessions(part) for part in seen[o])
        assert len(as_hop) == 1 and len(as_auditor) == 1, (as_hop, as_auditor)  # one shadow route, kept
        (real, real_blocks), (shadow, shadow_blocks) = as_hop[0], as_auditor[0]
        print(f"\n{o[-6:]}: real {len(real_blocks)} blocks, paced {paced(seen[o][0], real['session_id'])}; "
              f"shadow {len(shadow_blocks)} blocks, paced {paced(seen[o][1], shadow['session_id'])}")
        assert real["opener"] == real_chain.node.peer_id and shadow["opener"] not in clients
        openers.add(shadow["opener"])
        same = ("model", "start", "end", "max_length", "dtype", "weights", "prev_peer", "next_peer")
        assert {k: shadow[k] for k in same} == {k: real[k] for k in same}
        assert (real["prev_peer"], real["next_peer"]) == (prev_hop, next_hop)
        assert len(shadow["session_id"]) == len(real["session_id"])
        assert (shadow["next_session_id"] is None) == (real["next_session_id"] is None)
        assert shadow_blocks == real_blocks  # every block of the route, shaped alike
        for part, session in ((seen[o][0], real), (seen[o][1], shadow)):
            blocks = [b for b in part if b["kind"] == "block" and b["session_id"] == session["session_id"]]
            want = {prev_hop} if prev_hop else {session["opener"]}
            assert {b["sender"] for b in blocks} == want  # pushed by the previous hop, or sent by the opener
            assert {tuple(b["upstream"]) for b in blocks} == {(prev_hop,) if prev_hop else ()}
        assert paced(seen[o][1], shadow["session_id"]) == paced(seen[o][0], real["session_id"])
        assert all(paced(seen[o][1], shadow["session_id"])[1:])  # decode blocks: one per pass
    assert len(openers) == 1  # one identity for the shadow route, neither client's
