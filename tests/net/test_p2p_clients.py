"""Clients are clients: `dsdnode swarm` and `dsdnode generate` join the DHT in client mode and leave
nothing behind. Real processes: a local swarm (bootstrap peer + two servers of SmolLM2) and CLI runs
against it; afterwards every server's routing table (asked over /dsdnode/info/1.0.0) holds only the
swarm's own peers, the servers logged nothing, and `generate` printed only its text and its summary."""

import asyncio
import json
import re
import subprocess
import sys

import pytest

from dsdnode.cli_generate import unaudited_warning
from dsdnode.local_swarm import LocalSwarm
from dsdnode.net.p2p import P2PNode, PeerInfo
from tests.helpers import forkserver

MODEL = "smollm2-135m"
SUMMARY = re.compile(r"^\d+ tokens in [\d.]+ s \([\d.]+ tok/s\), .*stopped on \w+$")


def dsdnode(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, "-m", "dsdnode", *args], timeout=timeout)


@pytest.fixture(scope="module")
def swarm(smollm2_dir, tmp_path_factory):
    with LocalSwarm(MODEL, [(0, 15), (15, 30)], tmp_path_factory.mktemp("clients"), dtype="float32") as sw:
        yield sw


async def routing_tables(swarm: LocalSwarm) -> dict[str, set[str]]:
    """Peer id -> the peer ids in its DHT routing table, for the bootstrap peer and every server
    (asked by a client-mode node, which itself enters no table)."""
    node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs, require_bootstrap=True, client=True)
    try:
        tables = {}
        for p in [swarm.bootstrap, *swarm.servers]:
            info = await node.ask_info(PeerInfo(p.peer_id, (p.addr,)), timeout=10)
            tables[p.peer_id] = {q.peer_id for q in info.peers}
        return tables
    finally:
        await node.stop()


@pytest.mark.heavy
def test_clients_leave_no_peer_behind_and_generate_prints_only_its_output(swarm):
    boot = swarm.bootstrap_addrs[0]
    for _ in range(2):
        result = dsdnode("swarm", "--model", MODEL, "--bootstrap", boot)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith(f"{MODEL}: 30 layers, 2 live servers, fully covered"), result.stdout
        assert result.stderr == ""
    result = dsdnode("generate", "def add(a, b):", "--raw", "--model", MODEL, "--bootstrap", boot, "--dtype",
                     "float32", "--max-new-tokens", "8", "--k", "2", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no text"
    assert not re.search(r"(WARNING|ERROR|INFO|libp2p|Traceback)", result.stdout), result.stdout
    stderr = result.stderr.splitlines()  # both servers are on 127.0.0.1, one network group: nobody can audit
    assert len(stderr) == 2 and stderr[0] == unaudited_warning([(0, 15), (15, 30)]), result.stderr
    assert SUMMARY.match(stderr[1]), result.stderr

    tables = asyncio.run(routing_tables(swarm))
    members = {swarm.bootstrap.peer_id, *(s.peer_id for s in swarm.servers)}
    for peer, table in tables.items():
        assert table and table <= members - {peer}, f"{peer} holds peers outside the swarm: {table - members}"
    for log in swarm.workdir.glob("*.log"):
        assert log.read_text() == "", f"{log.name} logged: {log.read_text()[-2000:]}"


@pytest.mark.heavy
def test_swarm_lists_models_and_refuses_unserved_ones(swarm):
    boot = swarm.bootstrap_addrs[0]
    result = dsdnode("swarm", "--bootstrap", boot, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [m["model"] for m in report["models"]] == [MODEL]
    assert report["models"][0]["uncovered_layers"] == [] and report["models"][0]["coverage"] == [1] * 30
    result = dsdnode("swarm", "--bootstrap", boot)
    assert result.returncode == 0 and result.stdout == f"{MODEL}: 30 layers, 2 live servers, fully covered\n"

    result = dsdnode("swarm", "--model", "nosuch-model", "--bootstrap", boot)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: no live peer serves 'nosuch-model' (no peer announces it on the DHT)"
    assert "fully covered" not in result.stdout
