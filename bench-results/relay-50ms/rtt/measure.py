"""Round trip to a direct and to a relayed server, as `dsdnode swarm` measures it (its ping).

A LocalSwarm of two SmolLM2 servers at 50 ms emulated link latency; the second acts private
(--assume-private: it stops listening and is reached only through a relay, which adds its own
50 ms when it forwards). `dsdnode swarm` (no latency of its own) is run three times.
Run: PYTHONPATH=. python bench-results/relay-50ms/rtt/measure.py > bench-results/relay-50ms/rtt/swarm.txt
"""
import subprocess
import sys
import tempfile

from dsdnode.local_swarm import LocalSwarm

with tempfile.TemporaryDirectory() as work, \
        LocalSwarm("smollm2-135m", [(0, 15), (15, 30)], work, dtype="float32", relayed=1, link_latency_ms=50) as sw:
    for _ in range(3):
        out = subprocess.run([sys.executable, "-m", "dsdnode", "swarm", "--model", "smollm2-135m",
                              "--bootstrap", sw.bootstrap.addr], capture_output=True, text=True, timeout=120)
        print(out.stdout, end="", flush=True)
