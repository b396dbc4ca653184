"""Private layers (client/private.py) over a real server process: the client runs SmolLM2's layers
0:8 itself and the swarm, whose only server holds 8:30 (so a route from layer 0 does not exist),
runs the rest. Greedy text in float32 equals the in-process chain's, plain and speculative."""

from __future__ import annotations

import pytest

import dsdnode
from dsdnode.local_swarm import LocalSwarm

pytestmark = pytest.mark.heavy
MODEL = "smollm2-135m"
PROMPT = "def fibonacci(n):\n    "
PRIVATE = 8


def test_private_layers_give_the_plain_chains_greedy_text(smollm2_dir, tmp_path):
    with dsdnode.connect(MODEL, local=True, hops=1, draft=False, dtype="float32") as local:
        expected = local.generate(PROMPT, chat=False, max_new_tokens=24, k=0)
    with LocalSwarm(MODEL, [(PRIVATE, 30)], tmp_path, dtype="float32") as swarm, \
            dsdnode.connect(MODEL, bootstrap=swarm.bootstrap_addrs, private_layers=PRIVATE, draft=MODEL,
                            dtype="float32") as client:
        plain = client.generate(PROMPT, chat=False, max_new_tokens=24, k=0)
        drafted = client.generate(PROMPT, chat=False, max_new_tokens=24, k=3)
    assert plain.route == [("local", 0, PRIVATE), (swarm.servers[0].peer_id, PRIVATE, 30)]
    assert plain.tokens == drafted.tokens == expected.tokens
    with pytest.raises(ValueError, match="private_layers must be in 0..29"):
        dsdnode.connect(MODEL, bootstrap=["/ip4/127.0.0.1/tcp/1/p2p/x"], private_layers=30, draft=False)
