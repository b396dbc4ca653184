"""What starting a `dsdnode start` process costs: seconds and CPU seconds until its ready line, and
its resident memory then; --tree measures another checkout's dsdnode (an older commit, say):

    python scripts/node_start_cost.py --repeat 3 -- --layers none
    python scripts/node_start_cost.py --tree /path/to/other/checkout -- --model smollm2-135m --layers 0:15

Prints one JSON line per start. On a shared machine wall time follows the load (CPU seconds less so)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dsdnode
from dsdnode.ready import parse_ready


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mb(pid: int) -> float:
    line = next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def measure(args: list[str], tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    began = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "dsdnode", "start", "--threads", "1", "--parent-pid",
                             str(os.getpid()), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, cwd=tree)
    try:
        for line in proc.stdout:
            if parse_ready(line) is not None:
                break
        else:
            raise SystemExit(f"dsdnode start {' '.join(args)} exited with {proc.wait()} before it was ready")
        ready_s = time.monotonic() - began
        maps = open(f"/proc/{proc.pid}/maps").read()
        return {"args": args, "ready_s": round(ready_s, 2), "cpu_s": round(cpu_seconds(proc.pid), 2),
                "rss_mb": round(rss_mb(proc.pid), 1), "torch_loaded": "libtorch" in maps}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--tree", type=Path, default=Path(dsdnode.__file__).resolve().parents[1],
                        help="checkout whose dsdnode to start [default: the one this script imports]")
    parser.add_argument("start_args", nargs="*", help="arguments of `dsdnode start` (after --)")
    ns = parser.parse_args()
    for _ in range(ns.repeat):
        print(json.dumps({"tree": str(ns.tree), **measure(ns.start_args, ns.tree.resolve())}), flush=True)


if __name__ == "__main__":
    main()
