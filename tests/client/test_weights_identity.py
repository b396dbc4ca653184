"""Weights identity: one model name, several checkpoints. Records and OpenSession carry a digest of
the weights; a client chains only servers of its own weights, and a record of another protocol
version is skipped with a clear reason."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time

import msgpack
import pytest
import torch
from libp2p.peer.id import ID
from safetensors.torch import load_file, save_file

from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.local import LocalChain
from dsdnode.client.routing import NoRoute, same_weights
from dsdnode.client.swarm_chain import RemoteChain
from dsdnode.local_swarm import LocalSwarm
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.models.weights import DIGEST_FILE, weights_digest
from dsdnode.net.records import SIGN_DOMAIN, RecordRejected, SpanRecord, sign_record, verify_record
from dsdnode.net.identity import load_or_create_identity
from dsdnode.net.p2p import P2PNode
from dsdnode.net.protocol import PROTOCOL_VERSION
from dsdnode.speculative.controller import ControllerSettings
from dsdnode.speculative.draft import Drafter

MODEL = "smollm2-135m"


def record(peer: str, weights: str, **kw) -> SpanRecord:
    return SpanRecord(MODEL, 0, 30, peer, [], 10.0, 100, "t", time.time() + 60, weights=weights, **kw)


def other_checkpoint(smollm2_dir, where):
    """A copy of SmolLM2 with one layer's MLP scaled: a 'fine-tune' under the same name."""
    where.mkdir()
    for f in smollm2_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != DIGEST_FILE:
            shutil.copy(f, where / f.name)
    state = load_file(smollm2_dir / "model.safetensors")
    state["model.layers.12.mlp.down_proj.weight"] = state["model.layers.12.mlp.down_proj.weight"] * 1.5
    save_file(state, str(where / "model.safetensors"), metadata={"format": "pt"})
    return where


def test_the_digest_names_the_weights_and_is_cached(smollm2_dir, tmp_path):
    ours = weights_digest(smollm2_dir)
    assert len(ours) == 32 and int(ours, 16) >= 0
    assert weights_digest(smollm2_dir) == ours  # from the cache file now
    other = other_checkpoint(smollm2_dir, tmp_path / "tuned")
    theirs = weights_digest(other)
    assert theirs != ours
    assert (other / DIGEST_FILE).exists()
    (other / DIGEST_FILE).write_text('{"files": [], "digest": "stale"}')  # a cache for other files is ignored
    assert weights_digest(other) == theirs


def test_routing_keeps_only_servers_of_our_weights():
    same, other = same_weights([record("A", "aa"), record("B", "bb"), record("C", "aa")], "aa")
    assert [r.peer_id for r in same] == ["A", "C"]
    assert list(other) == ["B"] and "serves other weights" in other["B"] and "bb" in other["B"]


def test_a_record_of_another_protocol_version_is_skipped_with_a_clear_reason():
    keypair = load_or_create_identity(None)
    peer = ID.from_pubkey(keypair.public_key).to_base58()
    assert verify_record(sign_record(record(peer, "aa"), keypair)).protocol == PROTOCOL_VERSION
    with pytest.raises(RecordRejected, match=f"incompatible: the peer speaks dsdnode protocol {PROTOCOL_VERSION + 1}"):
        verify_record(sign_record(record(peer, "aa", protocol=PROTOCOL_VERSION + 1), keypair))

    # a record from before records carried a version (no protocol field), signed by its peer
    fields = dataclasses.asdict(record(peer, "aa"))
    del fields["protocol"], fields["weights"]
    body = msgpack.packb(fields, use_bin_type=True)
    old = msgpack.packb({"record": body, "public_key": keypair.public_key.serialize(),
                         "signature": keypair.private_key.sign(SIGN_DOMAIN + body)}, use_bin_type=True)
    with pytest.raises(RecordRejected, match="older dsdnode protocol"):
        verify_record(old)


@pytest.mark.heavy
def test_a_client_chains_only_servers_of_its_weights(smollm2_dir, tmp_path):
    """Two servers announce the same model name for layers 0:30; one holds other weights (and is
    made the faster-looking one: no link latency). The client must use the other, give the text of
    its own weights, and once that one is gone, say why no route is left instead of mixing."""
    from transformers import AutoTokenizer

    tuned = other_checkpoint(smollm2_dir, tmp_path / "tuned")
    registry = tmp_path / "models.toml"
    registry.write_text(f'[models."{MODEL}"]\ndescription = "a fine-tune"\npath = "{tuned}"\n')
    head = Head.load(smollm2_dir, torch.float32)
    draft = Span.load(smollm2_dir, 0, 12, torch.float32)
    ids = AutoTokenizer.from_pretrained(smollm2_dir)("def fibonacci(n):\n    ")["input_ids"]
    settings = GenerationSettings(max_new_tokens=16, controller=ControllerSettings(k_fixed=4))

    def generate(chain):
        drafter = Drafter(head, [draft], 128, settings.sampling)
        return Generator(head, chain, drafter, settings, eos_ids=set()).generate(ids)

    expected = asyncio.run(generate(LocalChain([Span.load(smollm2_dir, 0, 30, torch.float32)]))).tokens

    with LocalSwarm(MODEL, [], tmp_path / "swarm", dtype="float32") as swarm:
        honest = swarm.add_server(0, 30, 0, args=["--link-latency-ms", "20"])
        other = swarm.add_server(0, 30, 1, env={"DSDNODE_MODELS_TOML": str(registry)})
        try:
            assert other.info["weights"] == weights_digest(tuned) != honest.info["weights"]

            async def scenario():
                node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs, client=True)
                deadline = time.monotonic() + 30
                while {r.peer_id for r in await node.dht.discover(MODEL)} != {honest.peer_id, other.peer_id}:
                    assert time.monotonic() < deadline, "servers did not show up in the DHT"
                    await asyncio.sleep(0.5)
                chain = RemoteChain(node, MODEL, 30, head.config.hidden_size, weights=weights_digest(smollm2_dir),
                                    dtype=torch.float32)
                try:
                    result = await generate(chain)
                    route = list(chain.route)
                    await chain.close()
                    swarm.kill(honest)
                    with pytest.raises(NoRoute) as no_route:
                        await generate(chain)
                    return result, route, str(no_route.value)
                finally:
                    await chain.shutdown()

            result, route, error = asyncio.run(scenario())
        finally:
            for node in (honest, other):
                if node.alive():
                    node.proc.terminate()
                    node.proc.wait(20)
    assert route == [(honest.peer_id, 0, 30)]
    assert result.tokens == expected
    assert other.peer_id in error and "serves other weights" in error
