"""Description of the machine a benchmark ran on, recorded in every benchmark JSON.

Timings are only comparable between runs on the same hardware, thread settings and software
versions, so each result carries them instead of relying on the reader's memory.
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpuinfo() -> dict[str, str]:
    """First processor's fields from /proc/cpuinfo (empty where that file does not exist)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch": None, "torch_threads": None, "torch_interop_threads": None}
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }


def source_digest() -> str:
    """A digest of dsdnode's own source files: which code a measurement ran (committing results does
    not change it; editing any module does)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, software versions, host and UTC time, as a JSON-ready dict."""
    cpu = _cpuinfo()
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    mem = _mem_total_bytes()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags_avx512": "avx512f" in cpu.get("flags", "").split(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "mem_total_bytes": mem,
        "mem_total_gib": round(mem / 1024**3, 2) if mem is not None else None,
        "loadavg": load,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        **_torch_info(),
        "transformers": _version("transformers"),
        "dsdnode": _version("dsdnode"),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
