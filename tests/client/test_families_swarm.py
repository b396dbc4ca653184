"""An MoE family (Mixtral, experts fused on load) and a sliding-window family (Gemma 2: alternating
windows of 12, eager attention with softcapping, final-logit softcap) through real server processes
of one swarm, in float32: greedy DSD (chains, then trees) gives transformers' greedy tokens with a
prompt and text longer than the window, across hops that split the layers."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.swarm_chain import RemoteChain
from dsdnode.local_swarm import LocalSwarm
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.models.weights import weights_digest
from dsdnode.net.p2p import P2PNode
from dsdnode.speculative.controller import ControllerSettings
from dsdnode.speculative.draft import Drafter
from tests.client.test_generate import TREE_SHAPES, ScriptedShapes, reference_greedy
from tests.helpers.tiny_models import save_tiny_family

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(600)]  # 4 processes start on a loaded 2-core box
SPANS = {"mixtral": [(0, 4)], "gemma2": [(0, 1), (1, 4)]}  # the windows cross a hop


def test_moe_and_sliding_window_families_over_a_swarm(tmp_path):
    dirs = {family: save_tiny_family(family, tmp_path / family) for family in SPANS}
    prompt = torch.randint(3, 97, (16,), generator=torch.Generator().manual_seed(5)).tolist()
    want = {f: reference_greedy(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), prompt, 20)
            for f, d in dirs.items()}
    first, *rest = SPANS["mixtral"]
    with LocalSwarm(str(dirs["mixtral"]), [first], tmp_path / "swarm", dtype="float32") as swarm:
        for a, b in rest:
            swarm.servers.append(swarm.add_server(a, b))
        for a, b in SPANS["gemma2"]:
            swarm.servers.append(swarm.add_server(a, b, args=["--model", str(dirs["gemma2"])]))

        async def main():
            node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs, client=True)
            try:
                for family, model_dir in dirs.items():
                    model = str(model_dir)
                    deadline = time.monotonic() + 90
                    while len(await node.dht.discover(model)) < len(SPANS[family]) and time.monotonic() < deadline:
                        await asyncio.sleep(1)
                    head = Head.load(model_dir, torch.float32)
                    draft = [Span.load(model_dir, 0, 2, torch.float32)]
                    for width in (1, 4):
                        settings = GenerationSettings(max_new_tokens=20, controller=ControllerSettings(
                            k_max=4, width_max=width, k_fixed=3 if width == 1 else None))
                        chain = RemoteChain(node, model, head.config.num_hidden_layers, head.config.hidden_size,
                                            weights=weights_digest(model_dir), dtype=torch.float32)
                        gen = Generator(head, chain, Drafter(head, draft, 256, settings.sampling), settings,
                                        eos_ids=set())
                        if width > 1:
                            gen.controller = ScriptedShapes(settings.controller, len(SPANS[family]), TREE_SHAPES)
                        try:
                            result = await gen.generate(prompt)
                        finally:
                            await chain.close()
                        assert result.tokens == want[family], (family, width)
                        assert len({hop[0] for hop in chain.route}) == len(SPANS[family])
            finally:
                await node.stop()
        asyncio.run(main())
