"""A local swarm of real `dsdnode start` processes on loopback, for tests, benchmarks and the demo.

Every node is its own OS process with its own libp2p host; they find each other through a
bootstrap peer exactly as machines on the internet would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .ready import parse_ready

READY_TIMEOUT_S = 180.0


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    info: dict
    log_path: Path
    lines: list[str] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return self.info["addrs"][0]

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_node(args: list[str], log_path: Path, threads: int = 1, env: dict | None = None,
               parent_pid: int | None = None, launcher: list[str] | None = None) -> NodeProcess:
    """Run `dsdnode start ARGS` and wait for its ready line; its stderr goes to log_path.

    The node runs in its own session (a test's Ctrl-C does not reach it mid-shutdown) and stops
    by itself once parent_pid (default: this process) is gone. `launcher` replaces
    `python -m dsdnode` (tests run servers with injected faults this way)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    log = open(log_path, "w")
    cmd = [*(launcher or [sys.executable, "-m", "dsdnode"]), "start", "--threads", str(threads),
           "--parent-pid", str(parent_pid or os.getpid()), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
    lines: list[str] = []
    ready: dict = {}
    got = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line)
            event = None if got.is_set() else parse_ready(line)
            if event is not None:
                ready.update(event)
                got.set()
        got.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not got.wait(0.2):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"node did not start within {READY_TIMEOUT_S} s; see {log_path}")
    if not ready:
        proc.wait(5)
        raise RuntimeError(f"node exited with {proc.returncode} before it was ready:\n{log_path.read_text()[-2000:]}")
    return NodeProcess(proc, ready, log_path, lines)


class LocalSwarm:
    """A bootstrap peer plus servers covering `spans` of `model`; use as a context manager."""

    def __init__(self, model: str, spans: list[tuple[int, int]], workdir: Path, *, link_latency_ms: float = 0.0,
                 threads: int = 1, dtype: str = "bfloat16", extra_args: list[str] = (), relayed: int = 0):
        """`relayed`: the last N servers act as if behind a NAT (--assume-private): every connection
        to them crosses a relay (the bootstrap peer or a server that offers one), which adds the
        emulated link latency when it forwards, so a relayed link costs what two links cost."""
        if not 0 <= relayed <= len(spans):
            raise ValueError(f"cannot relay {relayed} of {len(spans)} servers")
        self.relayed = relayed
        self.model, self.spans, self.workdir = model, spans, Path(workdir)
        self.link_latency_ms, self.threads, self.dtype, self.extra_args = link_latency_ms, threads, dtype, list(extra_args)
        self.bootstrap: NodeProcess | None = None
        self.servers: list[NodeProcess] = []

    def __enter__(self) -> "LocalSwarm":
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            relay_args = ["--link-latency-ms", str(self.link_latency_ms)] if self.relayed else []
            self.bootstrap = start_node(["--layers", "none", *relay_args], self.workdir / "bootstrap.log")
            for i, (a, b) in enumerate(self.spans):
                private = i >= len(self.spans) - self.relayed
                self.servers.append(self.add_server(a, b, i, args=["--assume-private"] if private else []))
        except BaseException:
            self.stop()
            raise
        return self

    def add_server(self, start: int, end: int, index: int | None = None, args: list[str] = (),
                   launcher: list[str] | None = None, env: dict | None = None) -> NodeProcess:
        """Start one more server (not added to .servers when called directly); `args` come last, so
        they override the swarm's own (e.g. another --link-latency-ms for this server)."""
        index = len(self.servers) if index is None else index
        args = ["--model", self.model, "--layers", f"{start}:{end}", "--bootstrap", self.bootstrap.addr,
                "--link-latency-ms", str(self.link_latency_ms), "--dtype", self.dtype,
                "--announce-interval", "2", *self.extra_args, *args]
        return start_node(args, self.workdir / f"server{index}-{start}-{end}.log", self.threads, env=env,
                          launcher=launcher)

    @property
    def bootstrap_addrs(self) -> list[str]:
        return [self.bootstrap.addr]

    def kill(self, node: NodeProcess) -> None:
        """SIGKILL: a machine that vanishes without a word."""
        os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)

    def stop(self) -> None:
        nodes = [*self.servers, *([self.bootstrap] if self.bootstrap else [])]
        for node in nodes:
            if node.alive():
                node.proc.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)

    def __exit__(self, *exc) -> None:
        self.stop()
