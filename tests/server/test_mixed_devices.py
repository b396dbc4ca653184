"""A chain of servers on different devices, and a client on its own device.

Server 1 runs on the CPU, server 2 and the client on `device` (CUDA where a GPU exists). Hidden
states cross the wire as CPU tensors in the client's dtype; each server moves them to its device
and its dtype and back. In float32 the text must be exactly the in-process chain's on the CPU."""

import asyncio

import pytest
import torch

import dsdnode
from dsdnode.local_swarm import LocalSwarm
from tests.helpers.devices import DEVICES

pytestmark = pytest.mark.heavy
MODEL = "smollm2-135m"
PROMPT = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    with dsdnode.connect(MODEL, local=True, hops=1, draft=False, dtype="float32", device="cpu") as client:
        return client.generate(PROMPT, max_new_tokens=24, k=0).tokens


# without a GPU the "device" is the CPU too, and the test is one more CPU swarm generation like those of
# tests/server/test_swarm.py: then it runs only with DSDNODE_SOAK=1 (suite time)
@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu", marks=pytest.mark.soak)
                                    if d.values == ("cpu",) and not torch.cuda.is_available() else d for d in DEVICES])
def test_a_cpu_server_and_a_device_server_give_the_cpu_tokens(reference, tmp_path, device):
    with LocalSwarm(MODEL, [(0, 15)], tmp_path, dtype="float32", extra_args=["--device", "cpu"]) as swarm:
        swarm.servers.append(swarm.add_server(15, 30, args=["--device", device]))
        assert [s.info["device"] for s in swarm.servers] == ["cpu", device]

        async def generate():
            async with await dsdnode.connect_async(MODEL, bootstrap=swarm.bootstrap_addrs, draft=MODEL,
                                                   dtype="float32", device=device) as client:
                assert client.service.models.device.type == device
                return await client.generate(PROMPT, max_new_tokens=24, k=4)
        out = asyncio.run(generate())
    assert out.tokens == reference
    assert [(a, b) for _, a, b in out.route] == [(0, 15), (15, 30)]
    assert out.result.mean_accepted > 0  # the draft (the target itself) ran on the client's device
