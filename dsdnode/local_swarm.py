"""A local swarm of real `dsdnode start` processes on loopback, for tests, benchmarks and the demo.

Every node is its own OS process with its own libp2p host; they find each other through a
bootstrap peer exactly as machines on the internet would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .ready import parse_ready

READY_TIMEOUT_S = 180.0
spawn = subprocess.Popen
"""How launch_node starts a node process. The test suite swaps in a fork server that has imported
torch, transformers and libp2p once (tests/helpers/forkserver.py)."""


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
               parent_pid: int | None = None, launcher: list[str] | None = None,
               local_swarm: bool = True) -> NodeProcess:
    """Run `dsdnode start ARGS` and wait for its ready line; its stderr goes to log_path.

    The nodes of a local swarm (one machine, or namespaces on it) say so (`--local-swarm`): their
    next hops are at loopback or private addresses; local_swarm=False starts one as a public node.

    The node runs in its own session (a test's Ctrl-C does not reach it mid-shutdown) and stops
    by itself once parent_pid (default: this process) is gone. `launcher` replaces
    `python -m dsdnode` (tests run servers with injected faults this way)."""
    return launch_node(args, log_path, threads, env, parent_pid, launcher, local_swarm).wait_ready()


@dataclass
class LaunchedNode:
    """A node process started but not yet known to be ready: several can start at once (most of a
    start is importing torch and loading weights) and be waited for together."""

    proc: subprocess.Popen
    log_path: Path
    lines: list[str]
    ready: dict
    got: threading.Event

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> NodeProcess:
        deadline = time.monotonic() + timeout_s
        while not self.got.wait(0.2):
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"node did not start within {timeout_s} s; see {self.log_path}")
        if not self.ready:
            self.proc.wait(5)
            raise RuntimeError(f"node exited with {self.proc.returncode} before it was ready:\n"
                               f"{self.log_path.read_text()[-2000:]}")
        return NodeProcess(self.proc, self.ready, self.log_path, self.lines)


def launch_node(args: list[str], log_path: Path, threads: int = 1, env: dict | None = None,
                parent_pid: int | None = None, launcher: list[str] | None = None,
                local_swarm: bool = True) -> LaunchedNode:
    """Start `dsdnode start ARGS` without waiting (see start_node for the arguments)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    log = open(log_path, "w")
    cmd = [*(launcher or [sys.executable, "-m", "dsdnode"]), "start", "--threads", str(threads),
           "--parent-pid", str(parent_pid or os.getpid()), *(["--local-swarm"] if local_swarm else []), *args]
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
    log.close()  # the child holds its own copy
    node = LaunchedNode(proc, log_path, [], {}, threading.Event())

    def pump():
        for line in proc.stdout:
            node.lines.append(line)
            event = None if node.got.is_set() else parse_ready(line)
            if event is not None:
                node.ready.update(event)
                node.got.set()
        node.got.set()

    threading.Thread(target=pump, daemon=True).start()
    return node


def own_network_args(n: int, port: int) -> list[str]:
    """Server flags to be reached at 127.0.n.1:port only (its announced address), a loopback network
    of its own. It listens on every interface: a peer that checks its reachability dials it back at
    the IP it saw the server come from, which on loopback is 127.0.0.1 whatever it listens on."""
    return ["--host", "0.0.0.0", "--port", str(port), "--announce-addr", f"/ip4/127.0.{n}.1/tcp/{port}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSwarm:
    """A bootstrap peer plus servers covering `spans` of `model`; use as a context manager."""

    def __init__(self, model: str, spans: list[tuple[int, int]], workdir: Path, *, link_latency_ms: float = 0.0,
                 threads: int = 1, dtype: str = "bfloat16", extra_args: list[str] = (), relayed: int = 0,
                 own_networks: bool = False, wan=None, wan_seed: int | None = None):
        """`relayed`: the last N servers act as if behind a NAT (--assume-private): every connection
        to them crosses a relay (the bootstrap peer or a server that offers one), which adds the
        emulated link latency when it forwards, so a relayed link costs what two links cost.
        `own_networks`: server i is reached at 127.0.(i+1).1 (`own_network_args`), so a client observes
        each server in a network group of its own, as it would servers of different operators (an
        audit needs an auditor of another group than the audited server, client/audit.py).

        `wan` (a net.wan.WanProfile) replaces link_latency_ms: the client (whose node must use
        `client_identity` and `client_links`) sits at the profile's first site, server i at site i+1;
        each node gets its per-peer delays, jitter and uplink cap as a --link-config file."""
        if not 0 <= relayed <= len(spans):
            raise ValueError(f"cannot relay {relayed} of {len(spans)} servers")
        self.relayed, self.own_networks, self.wan, self.wan_seed = relayed, own_networks, wan, wan_seed
        self.client_identity = None  # with `wan`: the key pair and links the client's node must use
        self.client_links = None
        self._link_args: dict[str, list[str]] = {}
        self.model, self.spans, self.workdir = model, spans, Path(workdir)
        self.link_latency_ms, self.threads, self.dtype, self.extra_args = link_latency_ms, threads, dtype, list(extra_args)
        self.bootstrap: NodeProcess | None = None
        self.servers: list[NodeProcess] = []

    def __enter__(self) -> "LocalSwarm":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.wan is not None:
            self._write_links()
        try:
            relay_args = ["--link-latency-ms", str(self.link_latency_ms)] if self.relayed else []
            self.bootstrap = start_node(["--layers", "none", *relay_args, *self._link_args.get("bootstrap", [])],
                                        self.workdir / "bootstrap.log")
            launched = [self.launch_server(a, b, i, args=["--assume-private"] if i >= len(self.spans) - self.relayed else [])
                        for i, (a, b) in enumerate(self.spans)]  # all at once: the starts overlap
            for node in launched:
                try:
                    self.servers.append(node.wait_ready())
                except BaseException:
                    for other in launched:  # the ones not waited for yet are in no list stop() reads
                        if other.proc.poll() is None:
                            os.killpg(other.proc.pid, signal.SIGKILL)
                            other.proc.wait(10)
                    raise
        except BaseException:
            self.stop()
            raise
        return self

    def add_server(self, start: int, end: int, index: int | None = None, args: list[str] = (),
                   launcher: list[str] | None = None, env: dict | None = None) -> NodeProcess:
        """Start one more server (not added to .servers when called directly); `args` come last, so
        they override the swarm's own (e.g. another --link-latency-ms for this server)."""
        return self.launch_server(start, end, index, args, launcher, env).wait_ready()

    def launch_server(self, start: int, end: int, index: int | None = None, args: list[str] = (),
                      launcher: list[str] | None = None, env: dict | None = None) -> LaunchedNode:
        index = len(self.servers) if index is None else index
        if self.own_networks:
            args = [*own_network_args(index % 250 + 1, _free_port()), *args]
        args = ["--model", self.model, "--layers", f"{start}:{end}", "--bootstrap", self.bootstrap.addr,
                "--link-latency-ms", str(self.link_latency_ms), "--dtype", self.dtype,
                "--announce-interval", "2", *self._link_args.get(f"server{index}", []), *self.extra_args, *args]
        return launch_node(args, self.workdir / f"server{index}-{start}-{end}.log", self.threads, env=env,
                           launcher=launcher)

    def _write_links(self) -> None:
        """Identity keys for every node (so the peer ids are known before anyone starts) and each
        node's --link-config from the WAN profile; node order: client, servers, bootstrap."""
        from libp2p.peer.id import ID

        from .net.identity import load_or_create_identity

        keys, links = self.workdir / "keys", self.workdir / "links"
        links.mkdir(parents=True, exist_ok=True)
        names = ["client", *(f"server{i}" for i in range(len(self.spans))), "bootstrap"]
        pairs = {name: load_or_create_identity(keys / f"{name}.key") for name in names}
        ids = [ID.from_pubkey(pairs[name].public_key).to_base58() for name in names]
        for name, settings in zip(names, self.wan.node_links(ids, self.wan_seed)):
            path = links / f"{name}.toml"
            path.write_text(settings.to_toml())
            self._link_args[name] = ["--identity", str(keys / f"{name}.key"), "--link-config", str(path)]
            if name == "client":
                self.client_identity, self.client_links = pairs[name], settings

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
