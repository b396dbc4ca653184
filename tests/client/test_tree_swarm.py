"""Token trees over real server processes (SmolLM2, float32): masks, positions and kept paths cross
the wire and every hop compacts its cache, so greedy trees give exactly the in-process chain's
greedy text -- also when a hop dies mid-generation and the client replays the kept prefix elsewhere."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.local import LocalChain
from dsdnode.client.swarm_chain import RemoteChain
from dsdnode.local_swarm import LocalSwarm
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.models.weights import weights_digest
from dsdnode.net.p2p import P2PNode
from dsdnode.speculative.controller import ControllerSettings
from dsdnode.speculative.draft import Drafter
from tests.client.test_generate import TREE_SHAPES, ScriptedShapes

pytestmark = pytest.mark.heavy
MODEL = "smollm2-135m"
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    "
NEW_TOKENS = 40
SETTINGS = GenerationSettings(max_new_tokens=NEW_TOKENS, lookup=True, controller=ControllerSettings(k_max=5, width_max=4))


def generator(head, draft_span, chain, n_hops):
    drafter = Drafter(head, [draft_span], 512, SETTINGS.sampling)
    gen = Generator(head, chain, drafter, SETTINGS, eos_ids=set())
    gen.controller = ScriptedShapes(SETTINGS.controller, n_hops, TREE_SHAPES)
    return gen


def test_greedy_trees_over_a_swarm_equal_the_local_chain(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer
    head = Head.load(smollm2_dir, torch.float32)
    draft_span = Span.load(smollm2_dir, 0, 12, torch.float32)  # a weak draft: trees take other branches
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT)["input_ids"]
    local = LocalChain([Span.load(smollm2_dir, a, b, torch.float32) for a, b in [(0, 15), (15, 30)]])
    expected = asyncio.run(Generator(head, local, Drafter(head, [draft_span], 512, SETTINGS.sampling),
                                     GenerationSettings(max_new_tokens=NEW_TOKENS, speculative=False),
                                     eos_ids=set()).generate(ids)).tokens

    with LocalSwarm(MODEL, [(0, 15), (15, 30), (15, 30)], tmp_path, dtype="float32") as swarm:
        async def main():
            node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs, client=True)
            chain = RemoteChain(node, MODEL, head.config.num_hidden_layers, head.config.hidden_size,
                                weights=weights_digest(smollm2_dir), dtype=torch.float32)
            try:
                deadline = time.monotonic() + 60
                while len({r.peer_id for r in await node.dht.discover(MODEL)}) < 3 and time.monotonic() < deadline:
                    await asyncio.sleep(1)
                first = await generator(head, draft_span, chain, 2).generate(ids)
                assert chain.failovers == 0

                # the second time, the last hop dies after a few rounds: the other one takes over
                gen = generator(head, draft_span, chain, 2)
                killed = []

                def on_tokens(new):
                    if not killed and gen.controller.played >= 4:
                        tail = next(s for s in swarm.servers if s.peer_id == chain.route[-1][0])
                        os.killpg(tail.proc.pid, signal.SIGKILL)
                        killed.append(tail)
                second = await gen.generate(ids, on_tokens)
                return first, second, killed, chain.failovers
            finally:
                await chain.shutdown()
        first, second, killed, failovers = asyncio.run(main())
    assert first.tokens == expected
    assert {r.width for r in first.rounds} == {1, 2, 3, 4} and any(r.nodes > r.k for r in first.rounds)
    assert killed and failovers >= 1
    assert second.tokens == expected
