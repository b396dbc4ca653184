"""Node assembly (server/node.py): the DHT-only peer runs without torch or transformers."""

from __future__ import annotations

import signal
from pathlib import Path

from dsdnode.local_swarm import start_node
from tests.helpers.no_torch import LAUNCHER as NO_TORCH

LEAN_RSS_MB = 150  # measured about 93 MB; with torch imported it was about 310


def test_dht_peer_needs_no_torch(tmp_path):
    """`dsdnode start --layers none` with torch and transformers unimportable gets to its ready line,
    has no libtorch mapped and stays small."""
    node = start_node(["--layers", "none"], tmp_path / "dht.log", launcher=NO_TORCH)
    try:
        assert node.info["role"] == "bootstrap" and node.peer_id
        assert "libtorch" not in Path(f"/proc/{node.proc.pid}/maps").read_text()
        rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
        assert rss_kb < LEAN_RSS_MB * 1024, f"{rss_kb / 1024:.0f} MB"
    finally:
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(20)
    assert node.proc.returncode == 0, (tmp_path / "dht.log").read_text()[-2000:]
