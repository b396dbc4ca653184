"""Run a dsdnode P2PNode in its own process, for network tests with real processes.

Parent side: `NodeProcess.start(**config)` spawns `python p2p_node.py '<json config>'`,
waits for its READY line and exposes `peer_id`, `addrs`, `peer_info`, `request(op, ...)`
(JSON-lines requests over stdin/stdout, tests/helpers/jsonl_rpc.py), `kill()` (SIGKILL, to test
peer death) and `stop()`.

Child side (this file run as a script): starts a node on uvloop with the test protocols
below and serves requests: announce / withdraw / discover (DHT), ping, forge (inject a
forged span record, for validator tests), stop.

Config keys: host, port, bootstrap (list of multiaddrs), latency_ms, max_frame_bytes,
identity (key file path or null), link_config (a --link-config TOML path: replaces latency_ms),
client (listen nowhere), local_swarm, assume_private, relay_service, relay_limits, lie_dialback
(answer every dial-back request "reached", without dialling: a lying peer). The READY line also
carries reachability, relay_service and relays (P2PNode.reach_fields). Ops for relay tests: blob
(fetch N bytes from a peer's BLOB protocol, timed), connections (addresses of our open connections
to a peer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

from tests.helpers.jsonl_rpc import READY, RequestChannel, serve_requests

ECHO = "/dsdtest/echo/1"  # echoes every frame
DUPLEX = "/dsdtest/duplex/1"  # sends 5 "tick-i" frames while echoing "echo:"+frame
BLOB = "/dsdtest/blob/1"  # answers a frame holding a decimal N with N bytes
RAISE = "/dsdtest/raise/1"  # reads one frame, then raises inside the handler
DUPLEX_TICKS = 5
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the child imports tests.helpers
READY_TIMEOUT_S = 90.0  # a contended 2-core machine (the whole suite, other jobs) starts a node in 5-40 s


class NodeProcess:
    """A node running in a child process; use as a context manager or call stop()."""

    def __init__(self, proc: subprocess.Popen, channel: RequestChannel, ready: dict[str, Any]) -> None:
        self.proc = proc
        self.channel = channel
        self.peer_id: str = ready["peer_id"]
        self.addrs: list[str] = ready["addrs"]
        self.ready: dict[str, Any] = ready  # the whole READY line (reachability, relays: P2PNode.reach_fields)

    @classmethod
    def start(cls, netns: str | None = None, **config: Any) -> NodeProcess:
        """`netns`: run inside that network namespace (tests/helpers/netns.py; give `host` too)."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen(
            [*(["ip", "netns", "exec", netns] if netns else []), sys.executable, os.path.abspath(__file__),
             json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
        )
        channel = RequestChannel(proc, "node process")
        ready = channel.ready(READY_TIMEOUT_S)
        if ready is None:
            proc.kill()
            raise RuntimeError(f"node process did not start within {READY_TIMEOUT_S:g} s (exit {proc.poll()})")
        channel.name = f"node {ready['peer_id']}"
        return cls(proc, channel, ready)

    @property
    def peer_info(self) -> Any:
        from dsdnode.net.p2p import PeerInfo

        return PeerInfo(self.peer_id, tuple(self.addrs))

    def request(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; raises RuntimeError on a child error."""
        return self.channel.request(op, timeout, **args)

    async def arequest(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """request() without blocking the caller's event loop."""
        return await asyncio.to_thread(self.request, op, timeout, **args)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request("stop", timeout=10)
            except Exception:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---- child process ------------------------------------------------------------------------
async def _child(config: dict[str, Any]) -> None:
    from dsdnode.net.records import SpanRecord
    from dsdnode.net.identity import load_or_create_identity
    from dsdnode.net.latency import LinkLatency
    from dsdnode.net.p2p import P2PNode, PeerInfo, RelayLimits
    from libp2p.peer.id import ID

    if config.get("lie_dialback"):
        _lie_about_dialbacks()
    node = await P2PNode.start(
        identity=load_or_create_identity(config.get("identity")),
        host=config.get("host", "127.0.0.1"), port=config.get("port", 0),
        bootstrap=config.get("bootstrap", []),
        latency=LinkLatency.load(config["link_config"]) if config.get("link_config")
        else LinkLatency(config.get("latency_ms", 0.0)),
        max_frame_bytes=config.get("max_frame_bytes", 64 * 2**20),
        local_swarm=config.get("local_swarm", False), assume_private=config.get("assume_private", False),
        relay_service=config.get("relay_service", True), relay_limits=RelayLimits(**config.get("relay_limits", {})),
        client=config.get("client", False),
    )
    for protocol, handler in _HANDLERS.items():
        node.set_stream_handler(protocol, handler)
    print(READY + json.dumps({"peer_id": node.peer_id, "addrs": node.addrs, **node.reach_fields()}), flush=True)

    async def handle(req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "announce":
            await node.dht.announce(SpanRecord(**{"peer_id": node.peer_id, "addrs": node.addrs, **req["record"]}))
        elif op == "withdraw":
            await node.dht.withdraw(req["model"])
        elif op == "discover":
            records = await node.dht.discover(req["model"])
            return {"records": [dataclasses.asdict(r) for r in records], "partial": node.dht.last_discovery_partial}
        elif op == "ping":
            return {"rtt": await node.ping(PeerInfo(req["peer_id"], tuple(req["addrs"])))}
        elif op == "blob":
            stream = await node.open_stream(PeerInfo(req["peer_id"], tuple(req["addrs"])), BLOB)
            try:
                t0 = time.monotonic()
                await stream.send(str(req["n"]).encode())
                got = len(await stream.recv(timeout=120))
                return {"bytes": got, "seconds": time.monotonic() - t0}
            finally:
                await stream.close()
        elif op == "connections":
            async def addrs() -> list[str]:
                conns = node.host.libp2p.get_network().get_connections(ID.from_base58(req["peer_id"]))
                return [str(a) for c in conns if not c.is_closed for a in (c.get_transport_addresses() or [])]

            return {"addrs": await node.host.bridge.call(addrs)}
        elif op == "forge":
            return {"remote_accepted": await _forge(node, req["model"], req["kind"])}
        elif op != "stop":
            raise ValueError(f"unknown op {op!r}")
        return {}

    await serve_requests(handle)
    await node.stop()


def _lie_about_dialbacks() -> None:
    """Make this process's dial-back service answer every request "reached" without dialling."""
    from dsdnode.net import reachability

    async def serve(self: Any, raw: Any) -> None:
        try:
            await reachability.recv_control(raw)
            await reachability.send_control(raw, {"ok": True, "addr": "/ip4/198.51.100.1/tcp/4001"})
        finally:
            await raw.close()

    reachability.DialbackService.serve = serve


async def _forge(node: Any, model: str, kind: str) -> int:
    """File a bad record of `model` in the directory and the value store, bypassing local validation.

    kind "wrong_signer": the record claims another (fresh) peer id but is signed by us.
    kind "expired": our own record, correctly signed, but expired an hour ago.
    Pushes the blob to every connected peer (directory and value store); returns how many stores
    took it (should be 0).
    """
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    from dsdnode.net import directory
    from dsdnode.net.records import SpanRecord, sign_record, value_key

    claimed = ID.from_pubkey(create_new_key_pair().public_key).to_base58() if kind == "wrong_signer" else node.peer_id
    expires = time.time() - 3600 if kind == "expired" else time.time() + 3600
    rec = SpanRecord(model, 0, 4, claimed, node.addrs, 100.0, 1000, "forged", expires, time.time())
    blob = sign_record(rec, node.keypair)
    key = value_key(model, node.peer_id).encode()
    dir_key = directory.shard_key(model, directory.shard_of(claimed))

    async def inject() -> int:
        kad = node.host.kad
        kad.value_store.put(key, blob)
        accepted = 0
        for peer in node.host.libp2p.get_connected_peers():
            accepted += bool(await kad.value_store._store_at_peer(peer, key, blob))
            accepted += await directory.trio_put_at(node.host, peer, dir_key, blob)
        return accepted

    return await node.host.bridge.call(inject)


async def _echo(stream: Any) -> None:
    while True:
        await stream.send(await stream.recv())


async def _duplex(stream: Any) -> None:
    async def ticker() -> None:
        for i in range(DUPLEX_TICKS):
            await stream.send(f"tick-{i}".encode())
            await asyncio.sleep(0.02)

    task = asyncio.create_task(ticker())
    try:
        while True:
            frame = await stream.recv()
            await stream.send(b"echo:" + frame)
    finally:
        await task


async def _blob(stream: Any) -> None:
    while True:
        await stream.send(b"b" * int(await stream.recv()))


async def _raise(stream: Any) -> None:
    await stream.recv()
    raise RuntimeError("handler failure injected by the test")


_HANDLERS = {ECHO: _echo, DUPLEX: _duplex, BLOB: _blob, RAISE: _raise}

if __name__ == "__main__":
    import logging

    import uvloop

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s child %(levelname)s %(name)s: %(message)s")
    uvloop.run(_child(json.loads(sys.argv[1])))
