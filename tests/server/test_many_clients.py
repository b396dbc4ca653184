"""Many clients at once against real server processes (SmolLM2, float32): blocks of concurrent
sessions are batched at each server and every client still gets exactly its own greedy tokens;
a client past its per-client share of a server is told busy and routes around it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dsdnode.client.local import LocalChain
from dsdnode.local_swarm import LocalSwarm
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from tests.client.test_failover import MODEL, client_chain, generate, servers
from tests.helpers.ports import free_port
from tests.server.test_metrics import scrape

pytestmark = pytest.mark.heavy
PROMPTS = ["def fibonacci(n):\n    ", "The capital of France is", "import numpy as np\n", "Once upon a time,"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def swarm(smollm2_dir, tmp_path_factory):
    with LocalSwarm(MODEL, [], tmp_path_factory.mktemp("clients"), dtype="float32") as sw:
        yield sw


@pytest.fixture(scope="module")
def parts(smollm2_dir):
    from transformers import AutoTokenizer
    head = Head.load(smollm2_dir, torch.float32)
    draft_span = Span.load(smollm2_dir, 0, 12, torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return head, draft_span, [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(parts, smollm2_dir):
    """Each prompt's tokens from the in-process chain, one session at a time (nothing batched)."""
    head, draft_span, prompts = parts
    local = LocalChain([Span.load(smollm2_dir, a, b, torch.float32) for a, b in [(0, 15), (15, 30)]])
    return [asyncio.run(generate(local, (head, draft_span, ids), n=NEW_TOKENS)).tokens for ids in prompts]


def test_concurrent_clients_are_batched_and_each_gets_its_own_tokens(swarm, parts, expected):
    head, draft_span, prompts = parts
    ports = [free_port(), free_port()]
    specs = [(0, 15, ["--metrics-port", str(ports[0])]), (15, 30, ["--metrics-port", str(ports[1])])]
    with servers(swarm, *specs) as nodes:
        async def main():
            chains = [await client_chain(swarm, head, nodes) for _ in prompts]  # a node (peer id) each
            try:
                return await asyncio.gather(*(generate(c, (head, draft_span, ids), n=NEW_TOKENS)
                                              for c, ids in zip(chains, prompts)))
            finally:
                await asyncio.gather(*(c.shutdown() for c in chains))
        results = asyncio.run(main())
        samples = [scrape(p) for p in ports]
    assert [r.tokens for r in results] == expected
    for got in samples:
        forwards = got[("dsdnode_forward_batch_blocks_count", ())]
        alone = got[("dsdnode_forward_batch_blocks_bucket", (("le", "1.0"),))]
        blocks = got[("dsdnode_forward_batch_blocks_sum", ())]
        assert forwards > alone  # some forwards carried blocks of several sessions
        assert blocks > forwards


def test_a_client_past_its_share_is_told_busy_and_routes_around(swarm, parts, expected):
    """A server takes one session per client; the same client's second session is refused there
    ("busy", with a retry hint) and goes through a slower server instead, while the first lives on."""
    head, draft_span, prompts = parts
    one = ["--max-sessions-per-client", "1"]
    # far slower than load noise on a busy 2-core machine can make the fast one look
    slow_link = ["--link-latency-ms", "200"]
    with servers(swarm, (0, 15, one), (0, 15, [*one, *slow_link]), (15, 30, [])) as (fast, slow, tail):
        async def main():
            holder = await client_chain(swarm, head, [fast, slow, tail])
            waiter = holder.__class__(holder.node, MODEL, 30, head.config.hidden_size, weights=holder.weights,
                                      dtype=torch.float32)
            for chain in (holder, waiter):  # the cheapest route, not a spread over replicas: the fast one first
                chain.router.seed = ""
            try:
                await holder.start_session(64)
                # a few tokens: this is about where the session goes (the slow route's 200 ms links)
                result = await generate(waiter, (head, draft_span, prompts[0]), n=8)
                return result, list(holder.route), list(waiter.route), dict(waiter.router.busy_until), waiter.failovers
            finally:
                await waiter.close()
                await holder.shutdown()
        result, held, route, busy, failovers = asyncio.run(main())
    assert held[0][0] == fast.peer_id
    assert result.tokens == expected[0][:8]
    assert fast.peer_id in busy and failovers == 1  # refused once by the fast server ...
    assert [p for p, _, _ in route] == [slow.peer_id, tail.peer_id]  # ... and routed around it
