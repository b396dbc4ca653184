"""Failover with real server processes: every fault ends in the no-fault text, or a clear error.

One bootstrap peer lives for the module; each test starts the servers it needs (SmolLM2, float32),
so routing is the real routing: servers a test wants avoided at first are made slower with an
emulated link latency, not hidden. The expected text is the in-process chain's greedy output."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from dsdnode.local_swarm import LocalSwarm
from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.local import LocalChain
from dsdnode.client.routing import NoRoute
from dsdnode.client.standing import TrustSettings
from dsdnode.client.swarm_chain import RemoteChain
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.net.latency import LinkLatency
from dsdnode.net.p2p import P2PNode
from dsdnode.speculative.controller import ControllerSettings
from dsdnode.speculative.draft import Drafter
from tests.helpers.faulty_server import LAUNCHER

pytestmark = pytest.mark.heavy
MODEL = "smollm2-135m"
PROMPT = "def fibonacci(n):\n    "
NEW_TOKENS = 32
SOAK = os.environ.get("DSDNODE_SOAK") == "1"
# A server routing avoids while a faster one exists. Routing prices a hop at half its ping plus the
# step time its server measured at start, beside the test's other servers loading their weights. A
# 15-layer SmolLM2 step measured 28 ms on an idle 2-core machine and 57-64 ms beside three busy
# processes: 40 ms here (20 ms of route cost) once lost to that difference; 150 ms (75 ms) exceeds it.
SLOW = ["--link-latency-ms", "150"]


@pytest.fixture(scope="module")
def swarm(smollm2_dir, tmp_path_factory):
    with LocalSwarm(MODEL, [], tmp_path_factory.mktemp("failover"), dtype="float32") as sw:
        yield sw


@pytest.fixture(scope="module")
def parts(smollm2_dir):
    from transformers import AutoTokenizer
    head = Head.load(smollm2_dir, torch.float32)
    draft_span = Span.load(smollm2_dir, 0, 12, torch.float32)  # a cheap, weak draft: faults, not speed, matter here
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT)["input_ids"]
    return head, draft_span, ids


@pytest.fixture(scope="module")
def expected(parts, smollm2_dir):
    local = LocalChain([Span.load(smollm2_dir, a, b, torch.float32) for a, b in [(0, 15), (15, 30)]])
    return asyncio.run(generate(local, parts)).tokens


def generate(chain, parts, on_tokens=None, k_fixed=4, n=NEW_TOKENS):
    head, draft_span, ids = parts
    settings = GenerationSettings(max_new_tokens=n, controller=ControllerSettings(k_fixed=k_fixed))
    drafter = Drafter(head, [draft_span], 256, settings.sampling)
    return Generator(head, chain, drafter, settings, eos_ids=set()).generate(ids, on_tokens)


_server_index = itertools.count(100)  # across a module's tests: no two servers write one log


@contextmanager
def servers(swarm, *specs):
    """Start servers (start, end, extra args[, launcher]); stop each by pid at the end, even if stopped.
    Each gets a log of its own in the swarm's folder (server<index>-<start>-<end>.log)."""
    nodes = []

    def start(spec):
        begin, end, args, *launcher = spec
        node = swarm.add_server(begin, end, index=next(_server_index), args=list(args),
                                launcher=launcher[0] if launcher else None)
        nodes.append(node)
        return node
    try:
        with ThreadPoolExecutor(len(specs)) as pool:  # in parallel: each start imports torch and loads a span
            started = list(pool.map(start, specs))
        yield started
    finally:
        for node in nodes:
            if node.alive():
                os.killpg(node.proc.pid, signal.SIGCONT)
                node.proc.terminate()
        for node in nodes:
            try:
                node.proc.wait(20)
            except Exception:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(5)


async def client_chain(swarm, head, peers, latency_ms=0.0, trust: TrustSettings = TrustSettings()) -> RemoteChain:
    """A client that already sees every record of `peers` (a fresh server announces within seconds)."""
    node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs, latency=LinkLatency(latency_ms), client=True)
    want, deadline = {p.peer_id for p in peers}, time.monotonic() + 60  # 30 s was once too short under load
    while not want <= {r.peer_id for r in await node.dht.discover(MODEL)}:
        assert time.monotonic() < deadline, "servers did not show up in the DHT within 60 s"
        await asyncio.sleep(0.5)
    chain = RemoteChain(node, MODEL, 30, head.config.hidden_size, weights=peers[0].info["weights"],
                        dtype=torch.float32, trust=trust)
    chain.router.seed = ""  # the cheapest route, not a spread over replicas: these tests name who is routed
    return chain


def run_with_fault(swarm, parts, peers, fault, latency_ms=0.0, k_fixed=4, trust: TrustSettings = TrustSettings(),
                   n=NEW_TOKENS):
    """Generate; call fault(chain) once 10 tokens are out. Returns (result, chain, token arrival times)."""
    async def main():
        chain = await client_chain(swarm, parts[0], peers, latency_ms, trust)
        seen, times = [], []

        faulted = []

        def on_tokens(tokens):
            seen.extend(tokens)
            times.append(time.monotonic())
            if fault and len(seen) >= 10 and not faulted:
                faulted.append(True)
                fault(chain)
        try:
            result = await generate(chain, parts, on_tokens, k_fixed, n)
            return result, chain, times
        finally:
            await chain.shutdown()
    return asyncio.run(main())


def node_of(nodes, peer_id):
    return next(n for n in nodes if n.peer_id == peer_id)


def test_refused_session_is_routed_around(swarm, parts, expected):
    """A server that refuses the session (here: too long for it) is excluded; the next route works."""
    with servers(swarm, (0, 15, ["--max-session-length", "16"]), (0, 15, SLOW), (15, 30, [])) as (short, slow, tail):
        result, chain, _ = run_with_fault(swarm, parts, [short, slow, tail], None)
    assert result.tokens == expected
    assert chain.excluded == {short.peer_id: "too_large"}
    assert [p for p, _, _ in chain.route] == [slow.peer_id, tail.peer_id]


def test_failover_may_change_the_number_of_hops(swarm, parts, expected):
    """One server for every layer, killed mid-generation; the only route left is two slower hops."""
    with servers(swarm, (0, 30, []), (0, 15, SLOW), (15, 30, SLOW)) as (whole, head_hop, tail_hop):
        def kill_whole(chain):
            swarm.kill(node_of([whole], chain.route[0][0]))
        result, chain, times = run_with_fault(swarm, parts, [whole, head_hop, tail_hop], kill_whole, k_fixed=None)
    assert result.tokens == expected
    assert chain.failovers >= 1 and chain.route == [(head_hop.peer_id, 0, 15), (tail_hop.peer_id, 15, 30)]
    assert {len(r.hop_compute_s) for r in result.rounds} == {1, 2}
    # no other server serves any hop's layers (on either route), so nothing waits for an audit: the
    # text streams round by round, not in bursts at audit time (every 10 rounds)
    assert len(times) >= len(result.rounds) // 2, (len(times), len(result.rounds))


def test_unusable_reply_excludes_its_sender(swarm, parts, expected):
    """A last hop that answers with one position too few is a failure of that hop, not of the client."""
    with servers(swarm, (0, 15, []), (15, 30, [], [*LAUNCHER, "short"]), (15, 30, SLOW)) as (first, bad, good):
        result, chain, _ = run_with_fault(swarm, parts, [first, bad, good], None)
    assert result.tokens == expected
    assert chain.excluded == {bad.peer_id: "bad_reply"}
    assert chain.route[-1][0] == good.peer_id


def test_busy_server_is_waited_for(swarm, parts, expected):
    """The only server is full (another client holds its cache): the client waits for its retry hint.
    (--max-cache-share 1: one client may hold the whole budget, so one session fills it.)"""
    with servers(swarm, (0, 30, ["--cache-budget-mb", "3", "--max-cache-share", "1"])) as (only,):
        async def main():
            holder = await client_chain(swarm, parts[0], [only])
            waiter = await client_chain(swarm, parts[0], [only])
            try:
                await holder.start_session(64)  # about 3 MiB of float32 cache: the server is full
                release = asyncio.get_running_loop().call_later(3.0, lambda: asyncio.ensure_future(holder.close()))
                t0 = time.monotonic()
                result = await generate(waiter, parts)
                release.cancel()
                return result, time.monotonic() - t0
            finally:
                await holder.shutdown()
                await waiter.shutdown()
        result, elapsed = asyncio.run(main())
    assert result.tokens == expected
    assert elapsed >= 3.0  # it did wait for the holder to leave


def test_no_route_left_is_a_clear_error(swarm, parts):
    """Every server for layers 15:30 refuses: the client ends with NoRoute naming what it avoided."""
    with servers(swarm, (0, 15, []), (15, 30, ["--max-session-length", "16"])) as (first, short):
        with pytest.raises(NoRoute, match="too_large"):
            run_with_fault(swarm, parts, [first, short], None)


@pytest.mark.parametrize("trial", range(5 if SOAK else 1))
def test_hung_hop_is_detected_within_seconds(swarm, parts, expected, trial):
    """SIGSTOP a hop mid-generation at 50 ms links: the deadline from measured rounds catches it and
    the generation resumes within 10 s with the same text."""
    fifty = ["--link-latency-ms", "50"]
    with servers(swarm, (0, 15, fifty), (15, 30, fifty), (15, 30, ["--link-latency-ms", "90"])) as nodes:
        stopped = []

        def hang_tail(chain):
            victim = node_of(nodes, chain.route[-1][0])
            os.killpg(victim.proc.pid, signal.SIGSTOP)
            stopped.append(victim)
        # without audits: they hand tokens out in bursts, and this test measures the pause a hang causes
        result, chain, times = run_with_fault(swarm, parts, nodes, hang_tail, latency_ms=50, n=24,
                                              trust=TrustSettings(audit_rate=0.0))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert result.tokens == expected[:24]
    assert stopped and chain.excluded.get(stopped[0].peer_id) == "hung"
    assert max(gaps) < 10.0, f"the longest pause between tokens was {max(gaps):.1f} s (median {statistics.median(gaps):.2f} s)"


@pytest.mark.skipif(not SOAK, reason="soak: set DSDNODE_SOAK=1 (20 kill -9 trials, about 10 minutes)")
@pytest.mark.timeout(1800)
def test_kill9_trials(parts, expected, tmp_path):
    """20 generations, each losing a hop to SIGKILL mid-way: all give the no-fault text.

    Each trial has a swarm of its own: py-libp2p keeps departed peers in its routing tables, and after
    about 20 of them in one small swarm new servers were no longer found (a churn problem of the DHT,
    not of failover; see the closing note of stop 18)."""
    ok = 0
    for trial in range(20):
        with LocalSwarm(MODEL, [], tmp_path / f"trial{trial}", dtype="float32") as swarm, \
                servers(swarm, (0, 15, []), (15, 30, []), (0, 15, SLOW), (15, 30, SLOW)) as nodes:
            victim_hop = trial % 2  # alternate which hop dies

            def kill(chain):
                swarm.kill(node_of(nodes, chain.route[victim_hop][0]))
            result, chain, _ = run_with_fault(swarm, parts, nodes, kill)
        ok += result.tokens == expected and chain.failovers >= 1
    assert ok == 20
