"""Requests to a node in a child process, one JSON line each way over its stdin and stdout.

Used by the tests' node processes (tests/helpers/p2p_node.py) and the membership scale harness
(scripts/membership_scale.py, scripts/membership_peer.py); the scripts also print their results as
one JSON line (print_result). The child prints `READY {json}` once it
is up, then answers each request line `{"op": ..., ...}` with one line: `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`; the op "stop" is answered, then ends the child's loop.
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

READY = "READY "


async def serve_requests(handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    """The child's side: answer stdin's requests with `handle` until "stop" or end of input."""
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        try:
            reply = {"ok": True, **await handle(req)}
        except Exception as exc:
            reply = {"ok": False, "error": repr(exc)}
        print(json.dumps(reply), flush=True)
        if req["op"] == "stop":
            break


class RequestChannel:
    """The parent's side, for a child started with stdin and stdout as text pipes: a thread reads
    the child's stdout (only READY and JSON lines count), so waits have timeouts."""

    def __init__(self, proc: subprocess.Popen, name: str) -> None:
        self.proc = proc
        self.name = name
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def ready(self, timeout: float) -> dict[str, Any] | None:
        """The child's READY payload; None if it printed something else first, exited or timed out."""
        line = self._next(timeout)
        if line is None or not line.startswith(READY):
            return None
        return json.loads(line[len(READY):])

    def request(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; TimeoutError, or RuntimeError on a child error or exit."""
        with self._lock:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"{self.name} gave no answer to {op} in {timeout:g} s") from None
        if line is None:
            raise RuntimeError(f"{self.name} exited (code {self.proc.poll()}) during {op}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{op} failed in {self.name}: {reply.get('error')}")
        return reply

    def _next(self, timeout: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith(READY) or line.startswith("{"):
                self._lines.put(line)
        self._lines.put(None)


def print_result(result: dict[str, Any], out: Path | None) -> None:
    """A script's results: one JSON line on stdout, and the same line in `out` (if given)."""
    line = json.dumps(result)
    print(line)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
