"""What a peer says about itself (INFO_PROTOCOL): the models it serves, whom it knows, how it is reached.

`dsdnode swarm` lists every model without knowing their names this way (the DHT can only be asked
about a name it is given), and a private node asks peers whether they offer a relay. A request of
b"load" gets the short form: no peers, only the models and the load on each now (open sessions and
the measured seconds of a pass), which clients and replicas ask before they choose a server, since
a signed record's load is up to an announce old. Everything a peer answers is a hint, bounded in
size; routing trusts only the signed span records on the DHT and what it measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from dsdnode.net.bridge import StreamClosed
from dsdnode.net.host import Host, PeerInfo, PeerUnreachable
from dsdnode.net.reachability import PRIVATE, PUBLIC, UNKNOWN
from dsdnode.net.stream import FrameTooLarge

INFO_PROTOCOL = "/dsdnode/info/1.0.0"
INFO_MAX_BYTES = 256 * 1024  # an info answer: a few models and at most a routing table's worth of peers
INFO_MAX_PEERS = 512
INFO_MAX_MODELS = 256
INFO_MAX_ADDRS = 16
INFO_REQUEST = b"info"
LOAD_REQUEST = b"load"  # the short answer: models and load only


@dataclass(frozen=True)
class NodeInfo:
    """What a peer says about itself over INFO_PROTOCOL.

    `models` maps each model the peer announces now to its layer span (a hint: the signed span
    records on the DHT are what routing trusts); `peers` are the peers in its DHT routing table
    (servers only: clients never enter one), so a caller can find more of the swarm. `reachability`
    is what the peer learned about itself (public, private, unknown; see reachability.py) and
    `relay` whether it offers a relay service (private peers reserve slots on such peers). `load`
    maps each model it serves to (open sessions, seconds of a one-position pass over its span as
    measured lately: server/load.py), a claim like any other."""

    peer_id: str
    models: dict[str, tuple[int, int]]
    peers: tuple[PeerInfo, ...]
    reachability: str = UNKNOWN
    relay: bool = False
    load: dict[str, tuple[int, float]] = field(default_factory=dict)

    def encode(self) -> bytes:
        return msgpack.packb({"models": {m: list(span) for m, span in self.models.items()},
                              "peers": [[p.peer_id, list(p.addrs)] for p in self.peers],
                              "reach": self.reachability, "relay": self.relay,
                              "load": {m: [n, s] for m, (n, s) in self.load.items()}}, use_bin_type=True)

    @classmethod
    def decode(cls, peer_id: str, frame: bytes) -> NodeInfo:
        """Parse a peer's answer; anything malformed or over the limits raises ValueError."""
        try:
            body = msgpack.unpackb(frame, raw=False)
            models = {str(m): (int(a), int(b)) for m, (a, b) in body["models"].items()
                      if isinstance(m, str) and type(a) is int and type(b) is int}
            peers = tuple(PeerInfo(p, tuple(a for a in addrs[:INFO_MAX_ADDRS] if isinstance(a, str)))
                          for p, addrs in body["peers"] if isinstance(p, str) and isinstance(addrs, list))
            reach = body.get("reach", UNKNOWN)
            reach = reach if reach in (PUBLIC, PRIVATE, UNKNOWN) else UNKNOWN
            offers_relay = body.get("relay") is True
            load = {str(m): (n, float(t)) for m, (n, t) in body.get("load", {}).items()
                    if isinstance(m, str) and type(n) is int and n >= 0
                    and isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < math.inf}
        except Exception as exc:
            raise ValueError(f"malformed info answer from {peer_id}: {exc!r}") from None
        if len(models) > INFO_MAX_MODELS or len(load) > INFO_MAX_MODELS or len(peers) > INFO_MAX_PEERS:
            raise ValueError(f"info answer from {peer_id} lists {len(models)} models and {len(peers)} peers: too many")
        return cls(peer_id, models, peers, reach, offers_relay, load)


def known_peers(host: Host) -> list[PeerInfo]:
    """The peers in the host's DHT routing table, with the addresses it has for them (trio thread)."""
    assert host.kad is not None
    store = host.libp2p.get_peerstore()
    peers = []
    for pid in host.kad.routing_table.get_peer_ids()[:INFO_MAX_PEERS]:
        try:
            addrs = tuple(str(a) for a in store.addrs(pid)[:INFO_MAX_ADDRS])
        except Exception:  # no addresses left in the peerstore
            addrs = ()
        peers.append(PeerInfo(pid.to_base58(), addrs))
    return peers


async def trio_ask(host: Host, peer: PeerInfo, timeout: float, request: bytes = INFO_REQUEST) -> NodeInfo:
    """What `peer` says about itself (request: INFO_REQUEST or LOAD_REQUEST); PeerUnreachable or
    ValueError if it cannot say (trio thread)."""
    stream = await host.trio_open(peer, INFO_PROTOCOL, timeout, max_frame_bytes=INFO_MAX_BYTES)
    try:
        with trio.fail_after(timeout):
            await stream.trio_send(request)
            frame = await stream.trio_recv()
    except trio.TooSlowError:
        raise PeerUnreachable(f"info from {peer.peer_id} timed out after {timeout}s") from None
    except FrameTooLarge as exc:
        raise ValueError(f"info answer from {peer.peer_id}: {exc}") from None
    finally:
        await stream.trio_close()
    return NodeInfo.decode(peer.peer_id, frame)


def info_handler(host: Host, describe: Callable[[bool], NodeInfo]) -> Callable[[Any], Any]:
    """The INFO_PROTOCOL handler: one answer per stream, `describe(short)` taken when asked (short: the
    request was LOAD_REQUEST)."""

    async def serve(raw: Any) -> None:
        stream = host.wrap(raw)
        try:
            frame = await stream.trio_recv(timeout=10.0)
            if len(frame) <= 64:
                await stream.trio_send(describe(frame == LOAD_REQUEST).encode())
        except (StreamClosed, TimeoutError, FrameTooLarge):
            pass
        finally:
            await stream.trio_close()

    return serve
