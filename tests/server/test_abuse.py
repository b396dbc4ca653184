"""Throw-away peer ids from one network against a public server, in separate network stacks
(tests/helpers/netns.py): the server (SmolLM2 layers 0:30, float32, not a local swarm, so it
groups peers by the /24 their connections come from) in 203.0.113.0/24, an attacker with many
peer ids in the same /24 range, and an honest client in 198.51.100.0/24.

The attacker's ids each open a max-length session and write positions until refused, then keep
every session busy. Before #28 an OpenSession reserved a whole max-length cache, so two ids filled
the budget; now caches are charged as written and one network holds at most half the budget: the
server's memory stays bounded and the honest client, from another network, is served. Needs root
(CI runs as root); skipped with the reason otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from dsdnode.local_swarm import start_node
from dsdnode.models.fetch import pull
from dsdnode.models.weights import weights_digest
from tests.helpers.netns import Internet, missing_requirements

# Behind `soak`: it passed on 2026-12-07 in 269 s on the shared 2-core machine (load average 20),
# 190 s of it the honest `dsdnode generate` (a process that imports torch, loads SmolLM2 and routes),
# so no smaller span or session length brings it near the ~60 s a normal-run test may take.
# DSDNODE_SOAK=1 runs it.
pytestmark = [pytest.mark.heavy, pytest.mark.soak, pytest.mark.timeout(600),
              pytest.mark.skipif(bool(missing_requirements()), reason=missing_requirements())]
MODEL = "smollm2-135m"
HIDDEN = 576
BUDGET_MB = 100
MAX_LENGTH = 1024  # a full session: 1024 x 30 layers x 2 x 3 heads x 64 x 4 B = 47 MB
IDS = 6


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def generate(host, bootstrap: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    out = subprocess.run(["ip", "netns", "exec", host.ns, sys.executable, "-m", "dsdnode", "generate", "--model",
                          MODEL, "--dtype", "float32", "--k", "4", "--raw", "--threads", "1", "--no-audit",
                          "--bootstrap", bootstrap, "--max-new-tokens", "16", "def fibonacci(n):"],
                         capture_output=True, text=True, timeout=300)
    return out, time.monotonic() - t0


def test_throw_away_ids_of_one_network_cannot_starve_another(smollm2_dir, tmp_path):
    weights = weights_digest(pull(MODEL, progress=False))
    with Internet() as net:
        server_host = net.public("server")
        attacker_host = net.public("attacker")
        honest_host = net.public("honest", net="198.51.100")
        server = start_node(["--host", server_host.ip, "--model", MODEL, "--layers", "0:30", "--dtype", "float32",
                             "--cache-budget-mb", str(BUDGET_MB), "--max-session-length", str(MAX_LENGTH)],
                            tmp_path / "server.log", launcher=server_host.launcher(), local_swarm=False)
        server_host.processes.append(server.proc)
        rss_idle = rss_mb(server.proc.pid)
        attacker = subprocess.Popen(["ip", "netns", "exec", attacker_host.ns, sys.executable, "-m",
                                     "tests.helpers.kv_squatter", server.addr, server.peer_id, MODEL, weights,
                                     str(IDS), str(MAX_LENGTH), str(HIDDEN)],
                                    stdout=subprocess.PIPE, stderr=open(tmp_path / "attacker.log", "w"), text=True,
                                    start_new_session=True)
        attacker_host.processes.append(attacker)
        report: list[str] = []
        reader = threading.Thread(target=lambda: report.append(attacker.stdout.readline()), daemon=True)
        reader.start()
        reader.join(240)
        assert report and report[0], (tmp_path / "attacker.log").read_text()[-3000:]
        held = json.loads(report[0])
        rss_attacked = rss_mb(server.proc.pid)
        out, served_s = generate(honest_host, server.addr)
        rss_after = rss_mb(server.proc.pid)
        assert attacker.poll() is None  # it kept its sessions busy the whole time
    print(f"{IDS} ids of one /24: {held}; server RSS {rss_idle:.0f} -> {rss_attacked:.0f} -> {rss_after:.0f} MB; "
          f"honest client from another /24 served in {served_s:.1f} s")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]
    # the network holds at most its share, half the budget (50 MB: 1066 positions of the whole model)
    assert held["positions"] * 30 * 2 * 3 * 64 * 4 <= (BUDGET_MB << 20) // 2 and held["refusals"].get("busy"), held
    assert rss_attacked - rss_idle < BUDGET_MB / 2 + 30
