"""Node metrics: the Prometheus exposition of a real `dsdnode start --metrics-port` process moves
with the work it does, and the collector renders daemon state (sessions, errors) at scrape time."""

import asyncio
import socket
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from dsdnode.local_swarm import LocalSwarm, start_node
from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.swarm_chain import RemoteChain
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.net.p2p import P2PNode, PeerInfo
from dsdnode.net.wire import ErrorReply, WireLimits, decode
from dsdnode.net.protocol import SESSION_PROTOCOL as PROTOCOL
from dsdnode.server.metrics import NodeMetrics
from dsdnode.speculative.controller import ControllerSettings
from dsdnode.speculative.draft import Drafter
from tests.helpers.ports import free_port


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of http://127.0.0.1:PORT/metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_renders_counters_and_daemon_state():
    sessions, errors = {"a": 1, "b": 2}, {"malformed": 3}
    metrics = NodeMetrics({"peer_id": "Qm1", "model": "m", "layers": "0:4"}, sessions_open=lambda: len(sessions),
                          cache_bytes_used=lambda: 4096, errors=lambda: errors, cache_budget_bytes=1 << 20,
                          dht_stats=lambda: {"routing_table_peers": 3})
    port = free_port()
    metrics.serve("127.0.0.1", port)
    try:
        metrics.observe_block(5, 0.02)
        metrics.observe_block(1, 0.003)
        metrics.sessions_opened.inc()
        metrics.bytes_in.inc(100)
        metrics.bytes_out.inc(250)
        errors["busy"] = 1  # state read at scrape time, not copied at construction
        got = scrape(port)
    finally:
        metrics.stop()
    assert got[("dsdnode_tokens_served_total", ())] == 6
    assert got[("dsdnode_forward_compute_seconds_count", ())] == 2
    assert got[("dsdnode_forward_compute_seconds_sum", ())] == pytest.approx(0.023)
    assert got[("dsdnode_forward_compute_seconds_bucket", (("le", "0.005"),))] == 1
    assert got[("dsdnode_sessions_opened_total", ())] == 1
    assert got[("dsdnode_sessions_open", ())] == 2
    assert got[("dsdnode_kv_cache_bytes", ())] == 4096 and got[("dsdnode_kv_cache_budget_bytes", ())] == 1 << 20
    assert got[("dsdnode_dht_routing_table_peers", ())] == 3
    assert got[("process_resident_memory_bytes", ())] > 0
    assert got[("dsdnode_received_bytes_total", ())] == 100 and got[("dsdnode_sent_bytes_total", ())] == 250
    assert got[("dsdnode_errors_total", (("kind", "malformed"),))] == 3
    assert got[("dsdnode_errors_total", (("kind", "busy"),))] == 1
    assert got[("dsdnode_node_info", (("layers", "0:4"), ("model", "m"), ("peer_id", "Qm1")))] == 1


def test_metrics_port_in_use_is_a_clear_error():
    metrics = NodeMetrics({}, lambda: 0, lambda: 0, lambda: {})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ValueError, match="cannot serve metrics"):
            metrics.serve("127.0.0.1", taken.getsockname()[1])


@pytest.mark.heavy
def test_a_served_generation_moves_the_node_metrics(smollm2_dir, tmp_path):
    port = free_port()
    head = Head.load(smollm2_dir, torch.float32)
    draft = Span.load(smollm2_dir, 0, 22, torch.float32)
    settings = GenerationSettings(max_new_tokens=12, controller=ControllerSettings(k_fixed=3))
    prompt = [1, 504, 3037, 28, 2]

    async def work(swarm):
        node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs, client=True)
        try:
            chain = RemoteChain(node, "smollm2-135m", 30, head.config.hidden_size,
                                weights=swarm.servers[0].info["weights"], dtype=torch.float32)
            drafter = Drafter(head, [draft], 64, settings.sampling)
            result = await Generator(head, chain, drafter, settings, eos_ids=set()).generate(prompt)
            server = swarm.servers[0]
            stream = await node.open_stream(PeerInfo(server.peer_id, tuple(server.info["addrs"])), PROTOCOL)
            await stream.send(b"\x00\xffnot msgpack")
            reply = decode(await stream.recv(timeout=20), WireLimits())
            await stream.close()
            return result, reply
        finally:
            await node.stop()

    with LocalSwarm("smollm2-135m", [(0, 30)], tmp_path, dtype="float32",
                    extra_args=["--metrics-port", str(port)]) as swarm:
        before = scrape(port)
        result, reply = asyncio.run(work(swarm))
        deadline = time.monotonic() + 10
        while True:  # the session closes asynchronously after the client's CloseSession
            after = scrape(port)
            if after[("dsdnode_sessions_open", ())] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)

    assert len(result.tokens) == 12 and isinstance(reply, ErrorReply) and reply.code == "malformed"
    assert before[("dsdnode_tokens_served_total", ())] == 0
    # every prompt position and every verified block position ran through the node's 30 layers
    assert after[("dsdnode_tokens_served_total", ())] >= len(prompt) - 1 + 12
    assert after[("dsdnode_forward_compute_seconds_count", ())] == 1 + len(result.rounds)  # prefill + rounds
    assert after[("dsdnode_forward_compute_seconds_sum", ())] > 0
    assert after[("dsdnode_sessions_opened_total", ())] == 1
    assert after[("dsdnode_sessions_open", ())] == 0
    assert after[("dsdnode_kv_cache_budget_bytes", ())] > 0
    assert after[("dsdnode_dht_routing_table_peers", ())] >= 1  # it knows at least the bootstrap peer
    assert after[("dsdnode_errors_total", (("kind", "malformed"),))] == 1
    hidden_bytes = 4 * head.config.hidden_size * (len(prompt) - 1 + 12)  # float32 activations in and out
    assert after[("dsdnode_received_bytes_total", ())] > hidden_bytes
    assert after[("dsdnode_sent_bytes_total", ())] > hidden_bytes


@pytest.mark.heavy
def test_a_bootstrap_peer_serves_dht_and_process_metrics(tmp_path):
    port = free_port()
    node = start_node(["--layers", "none", "--metrics-port", str(port)], tmp_path / "bootstrap.log")
    try:
        got = scrape(port)
    finally:
        node.proc.terminate()
        node.proc.wait(20)
    assert got[("dsdnode_dht_routing_table_peers", ())] == 0  # alone in its swarm
    assert got[("dsdnode_sessions_open", ())] == 0 and got[("process_resident_memory_bytes", ())] > 0
