"""The machine description is complete, truthful for this host, and JSON-ready."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime

import torch

from dsdnode.bench.machine import machine_info


def test_machine_info_describes_this_host():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = json.loads(json.dumps(machine_info()))
    finally:
        torch.set_num_threads(before)
    assert info["cpu_count"] == os.cpu_count()
    assert info["cpu_affinity"] == len(os.sched_getaffinity(0))
    assert info["cpu_model"]
    assert info["mem_total_bytes"] > 256 * 1024**2
    assert info["torch"] == torch.__version__
    assert info["torch_threads"] == 1
    assert info["hostname"] == socket.gethostname()
    assert info["python"].startswith("3.")
    assert datetime.fromisoformat(info["date"]).tzinfo is not None
