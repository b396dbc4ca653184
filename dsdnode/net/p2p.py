"""The libp2p host of a dsdnode peer, run in a dedicated trio thread, used from asyncio.

The host, its Kademlia DHT and every stream live in one thread under
`trio.run`; asyncio code reaches them through bridge.Bridge (one trio task per operation).
Stack: TCP + Noise + Yamux only (QUIC measured ~4 MB/s here), at most one connection per
peer (more made every connect cost >= 250 ms). Streams: see stream.py.

Servers and bootstrap peers run Kademlia in server mode. A client (`start(client=True)`) listens
nowhere and runs it in client mode: py-libp2p adds the peer of every inbound DHT query to the
routing table, but only with an address to dial, and a node that listens nowhere has none, so a
client never enters a server's routing table and leaves no dead peer behind to be dialed (measured:
three client-mode runs leave 0 client entries, three server-mode runs 3 on every server, each
then dialed by every later query). It still finds providers and fetches values as before.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import peer_routing as _peer_routing
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as LibPeerInfo
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from dsdnode.net.bridge import Bridge, NodeStopped, StreamClosed
from dsdnode.net.dht import DHT
from dsdnode.net.identity import load_or_create_identity
from dsdnode.net import reachability, relay
from dsdnode.net.latency import LinkEmulator, LinkLatency
from dsdnode.net.reachability import CLIENT, PRIVATE, PUBLIC, UNKNOWN, Reachability
from dsdnode.net.relay import RelayLimits, RelayService, Reservation
from dsdnode.net.stream import FrameTooLarge, Stream

__all__ = ["BootstrapUnreachable", "FrameTooLarge", "ListenError", "NodeInfo", "NodeStopped", "P2PNode", "PeerInfo",
           "PeerUnreachable", "Reachability", "RelayLimits", "Stream", "StreamClosed", "check_listen_address"]

log = logging.getLogger(__name__)

PING_PROTOCOL = "/dsdnode/ping/1.0.0"
INFO_PROTOCOL = "/dsdnode/info/1.0.0"
INFO_MAX_BYTES = 256 * 1024  # an info answer: a few models and at most a routing table's worth of peers
INFO_MAX_PEERS = 512
INFO_MAX_MODELS = 256
INFO_MAX_ADDRS = 16
START_TIMEOUT = 60.0
BOOTSTRAP_TIMEOUT = 10.0
RELAYS_WANTED = 2  # reservations a private node holds, so losing one relay leaves it reachable
RELAY_RETRY_S = 5.0  # a private node without a relay looks for one this often
RELAY_TOP_UP_S = 30.0  # one holding fewer than RELAYS_WANTED looks for more this often
RELAY_CANDIDATES_ASKED = 16  # peers asked per search whether they relay (bootstrap peers first)
RELAY_INFO_TIMEOUT_S = 5.0
RECHECK_UNKNOWN_S = 30.0  # a node that no peer could judge yet asks again this often


class _CleanCloseFilter(logging.Filter):
    """Drop KadDHT's warning for a peer closing its DHT stream normally (every query does)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith("Failed to read DHT message from stream")
            and bool(record.args)
            and isinstance(record.args[0], StreamEOF)  # type: ignore[index]
        )


logging.getLogger("libp2p.kad_dht.kad_dht").addFilter(_CleanCloseFilter())
# A lookup from a routing table of fewer than 5 peers (any small swarm) also asks every connected
# peer and every peer the peerstore ever held, as if each were a DHT server: clients (which do not
# speak the DHT protocol) and long-gone peers, each failed query logged as an error. Our nodes seed
# their tables at join (bootstrap peers, then a lookup of themselves), and servers enter each
# other's tables by querying, so lookups ask routing-table peers only.
_peer_routing.MIN_PEERS_THRESHOLD = 0
if not os.environ.get("LIBP2P_DEBUG"):
    # Importing libp2p cuts its loggers off the application's logging (no handler, no propagation),
    # so its errors (every failed dial) reach stderr raw through logging.lastResort, whatever the
    # application configured. Hand them back: the application's handlers and levels decide.
    logging.getLogger("libp2p").propagate = True
    logging.getLogger("libp2p").setLevel(logging.NOTSET)
    # A failed TCP dial is logged as an error for every address tried, though trying the next address
    # (a NATed peer's stale direct address before its relay) is normal; dsdnode says itself when a
    # peer cannot be reached at all.
    logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)


class PeerUnreachable(ConnectionError):
    """Could not connect to the peer or negotiate the protocol in time."""


class BootstrapUnreachable(PeerUnreachable):
    """None of the bootstrap peers answered a node that cannot work alone (a client)."""


class ListenError(OSError):
    """The node cannot listen where it was asked to: the port is taken or the address is not this machine's."""


def check_listen_address(host: str, port: int) -> None:
    """Raise ListenError unless this process alone can listen on host:port (IPv4; port 0 = any free port).

    py-libp2p listens with SO_REUSEPORT (for hole punching), so on Linux a second node asked for a
    busy port binds beside the first one and the kernel splits incoming connections between them,
    silently. A plain socket with SO_REUSEADDR but without SO_REUSEPORT cannot bind a port that any
    socket listens on, yet may bind one that only has connections in TIME_WAIT left, so a node that
    restarts on its port is not refused. The probe socket is closed before libp2p listens.
    """
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"listen host must be an IPv4 address such as 127.0.0.1 or 0.0.0.0, got {host!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"listen port must be in 0..65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(f"port {port} on {host} is already in use") from None
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


@dataclass(frozen=True)
class PeerInfo:
    """A peer to dial: base58 peer id plus multiaddr strings (a /p2p/<id> suffix is optional)."""

    peer_id: str
    addrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeInfo:
    """What a peer says about itself over INFO_PROTOCOL, so `dsdnode swarm` can list every model
    without knowing their names (the DHT can only be asked about a name it is given).

    `models` maps each model the peer announces now to its layer span (a hint: the signed span
    records on the DHT are what routing trusts); `peers` are the peers in its DHT routing table
    (servers only: clients never enter one), so a caller can find more of the swarm. `reachability`
    is what the peer learned about itself (public, private, unknown; see reachability.py) and
    `relay` whether it offers a relay service (private peers reserve slots on such peers)."""

    peer_id: str
    models: dict[str, tuple[int, int]]
    peers: tuple[PeerInfo, ...]
    reachability: str = UNKNOWN
    relay: bool = False

    def encode(self) -> bytes:
        return msgpack.packb({"models": {m: list(span) for m, span in self.models.items()},
                              "peers": [[p.peer_id, list(p.addrs)] for p in self.peers],
                              "reach": self.reachability, "relay": self.relay}, use_bin_type=True)

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
        except Exception as exc:
            raise ValueError(f"malformed info answer from {peer_id}: {exc!r}") from None
        if len(models) > INFO_MAX_MODELS or len(peers) > INFO_MAX_PEERS:
            raise ValueError(f"info answer from {peer_id} lists {len(models)} models and {len(peers)} peers: too many")
        return cls(peer_id, models, peers, reach, offers_relay)


class P2PNode:
    """A libp2p host (TCP + Noise + Yamux, Kademlia; server mode unless a client) usable from asyncio.

    Create it with `await P2PNode.start(...)` and use it (and its streams) only from the
    event loop that started it.
    """

    def __init__(self, keypair: KeyPair, latency: LinkLatency | None, max_frame_bytes: int) -> None:
        self.keypair = keypair
        self.latency = latency
        self.link = LinkEmulator(latency) if latency is not None else None  # jitter draws, uplink bucket
        self.max_frame_bytes = max_frame_bytes
        self.peer_id: str = ID.from_pubkey(keypair.public_key).to_base58()
        self.addrs: list[str] = []
        self.started_at = time.monotonic()  # a node that just joined may not see the whole swarm yet
        self.dht: DHT = DHT(self)
        self._bridge = Bridge(asyncio.get_running_loop())
        self._handlers: dict[str, Callable[[Stream], Awaitable[None]]] = {}
        self._handler_tasks: set[asyncio.Task] = set()
        self._host: Any = None
        self._kad: KadDHT | None = None
        self._stop_event: trio.Event | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Future | None = None
        self.reachability = Reachability(UNKNOWN)
        self.relay: RelayService | None = None  # our relay service, while we offer one
        self.reservations: dict[str, Reservation] = {}  # relay peer id -> our reservation there (private nodes)
        self._direct_addrs: list[str] = []
        self._announce: list[multiaddr.Multiaddr] = []
        self._addrs_changed = asyncio.Event()
        self._relay_wake: trio.Event | None = None
        self._relay_offer: RelayLimits | None = None
        self._assume_private = False
        self._closed_listen_addrs: list[multiaddr.Multiaddr] = []

    @classmethod
    async def start(cls, *, identity: KeyPair | None = None, host: str = "127.0.0.1", port: int = 0,
                    bootstrap: list[str] | tuple[str, ...] = (), latency: LinkLatency | None = None,
                    max_frame_bytes: int = 64 * 2**20, announce: list[str] | tuple[str, ...] = (),
                    require_bootstrap: bool = False, client: bool = False, relay_service: bool = True,
                    relay_limits: RelayLimits | None = None, assume_private: bool = False) -> P2PNode:
        """Start the host thread, listen, connect to `bootstrap` peers (/ip4/../tcp/../p2p/<id>).

        `client=True` starts a node that only asks: it listens nowhere and runs Kademlia in client
        mode, so no server adds it to its routing table and nothing dials it after it is gone
        (`host`, `port` and `announce` are ignored). Servers (and bootstrap peers) use the default.

        `announce` replaces the advertised addresses (needed when listening on 0.0.0.0).
        A busy port raises ListenError before anything listens (see check_listen_address).
        Unreachable bootstrap peers are logged, not fatal, by default: a server may start before
        its peers. A client cannot do anything alone, so with `require_bootstrap` a node none of
        whose bootstrap peers answers raises BootstrapUnreachable instead of starting.

        A listening node then learns its reachability (reachability.py) before start() returns. A
        public (or not yet judged) one offers a relay service within `relay_limits` unless
        `relay_service` is False; a private one stops advertising its unreachable addresses,
        runs Kademlia in client mode, reserves slots on RELAYS_WANTED relays and advertises their
        circuit addresses instead (`addrs`; `wait_addrs_changed` tells when they change).
        `assume_private` skips the check and acts private (relayed servers on one machine).
        """
        if not client:
            check_listen_address(host, port)
        listen = None if client else multiaddr.Multiaddr(f"/ip4/{host}/tcp/{port}")
        try:
            boot = [info_from_p2p_addr(multiaddr.Multiaddr(a)) for a in bootstrap]
            announced = [multiaddr.Multiaddr(a) for a in announce]
        except Exception as exc:
            raise ValueError(f"bad bootstrap/announce multiaddr (need /ip4/H/tcp/P/p2p/ID): {exc}") from None
        node = cls(identity or load_or_create_identity(None), latency, max_frame_bytes)
        node._announce = announced
        node._assume_private = assume_private
        node._relay_offer = relay_limits or RelayLimits() if relay_service else None
        ready = node._bridge.loop.create_future()
        node._thread = threading.Thread(target=node._thread_main,
                                        args=(listen, boot, announced, require_bootstrap, ready),
                                        name=f"libp2p-{node.peer_id[-6:]}", daemon=True)
        node._thread.start()
        try:
            await asyncio.wait_for(ready, START_TIMEOUT)
        except BaseException as exc:
            await node.stop()
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"the libp2p host did not start within {START_TIMEOUT:g} s") from None
            raise
        return node

    @property
    def info(self) -> PeerInfo:
        """How other peers dial this node."""
        return PeerInfo(self.peer_id, tuple(self.addrs))

    def reach_fields(self) -> dict:
        """How peers reach this node, for ready lines: reachability, whether it relays, its relays."""
        return {"reachability": self.reachability.status, "relay_service": self.relay is not None,
                "relays": sorted(self.reservations)}

    async def wait_addrs_changed(self, timeout: float) -> bool:
        """Wait until `addrs` change (a relay reserved or lost) or `timeout` passes; True if they changed."""
        try:
            await asyncio.wait_for(self._addrs_changed.wait(), timeout)
        except TimeoutError:
            return False
        self._addrs_changed.clear()
        return True

    def set_stream_handler(self, protocol: str, handler: Callable[[Stream], Awaitable[None]]) -> None:
        """Serve inbound streams of `protocol` with an asyncio coroutine (one task per stream).

        The stream stays open while the handler runs and is closed when it returns or raises.
        """
        self._handlers[protocol] = handler
        if self._bridge.token is not None:
            self._bridge.notify(lambda: self._register(protocol))

    async def open_stream(self, peer: PeerInfo, protocol: str, timeout: float = 10.0) -> Stream:
        return await self._bridge.call(self._t_open, peer, protocol, timeout)

    async def ask_info(self, peer: PeerInfo, timeout: float = 10.0) -> NodeInfo:
        """What `peer` serves and whom it knows (see NodeInfo); PeerUnreachable or ValueError if it cannot say."""
        return NodeInfo.decode(peer.peer_id, await self._bridge.call(self._t_info, peer, timeout))

    async def known_peers(self) -> list[PeerInfo]:
        """The peers in this node's DHT routing table, with the addresses it has for them."""
        return await self._bridge.call(self._t_known_peers)

    async def ping(self, peer: PeerInfo, timeout: float = 10.0) -> float:
        """Round-trip time in seconds of one 8-byte echo frame (emulated latency included)."""
        return await self._bridge.call(self._t_ping, peer, timeout)

    async def stop(self) -> None:
        """Stop the host and join its thread; safe to call repeatedly and concurrently."""
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        self._stopping = self._bridge.loop.create_future()
        try:
            for task in list(self._handler_tasks):
                task.cancel()
            if self._bridge.token is not None and self._stop_event is not None:
                self._bridge.notify(self._stop_event.set)
            if self._thread is not None:
                await asyncio.to_thread(self._thread.join, 20.0)
                if self._thread.is_alive():
                    log.warning("libp2p thread of %s did not stop within 20 s", self.peer_id)
        finally:
            self._stopping.set_result(None)

    # ---- trio thread -------------------------------------------------------------------
    def _thread_main(self, listen: multiaddr.Multiaddr | None, boot: list[LibPeerInfo],
                     announce: list[multiaddr.Multiaddr], require_bootstrap: bool, ready: asyncio.Future) -> None:
        def fail(exc: BaseException) -> None:
            if not ready.done():
                ready.set_exception(exc)

        try:
            trio.run(self._trio_main, listen, boot, announce, require_bootstrap, ready)
        except BaseException as exc:  # report startup failures to the waiting caller
            log.debug("libp2p thread of %s ended with %r", self.peer_id, exc)
            try:
                self._bridge.loop.call_soon_threadsafe(fail, RuntimeError(f"libp2p host failed: {exc!r}"))
            except RuntimeError:
                pass
        finally:
            self._bridge.token = None

    async def _trio_main(self, listen: multiaddr.Multiaddr | None, boot: list[LibPeerInfo],
                         announce: list[multiaddr.Multiaddr], require_bootstrap: bool,
                         ready: asyncio.Future) -> None:
        noise = NoiseTransport(self.keypair, noise_privkey=new_x25519_key_pair().private_key)
        self._host = new_host(
            key_pair=self.keypair,
            sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=[listen] if listen else None,
            connection_config=ConnectionConfig(max_connections_per_peer=1),
            addrs_factory=self._advertised,
            disable_identify_address_discovery=True,
        )
        self._kad = KadDHT(self._host, DHTMode.SERVER if listen else DHTMode.CLIENT)
        self.dht._attach(self._kad)
        self._stop_event = trio.Event()
        self._host.set_stream_handler(TProtocol(PING_PROTOCOL), self._serve_ping)
        self._host.set_stream_handler(TProtocol(INFO_PROTOCOL), self._serve_info)
        if listen:
            self._host.set_stream_handler(reachability.DIALBACK_PROTOCOL, reachability.DialbackService(self._host).serve)
            self._host.set_stream_handler(relay.STOP_PROTOCOL, relay.stop_handler(self._host, self._holds_reservation))
        async with self._host.run([listen] if listen else []), background_trio_service(self._kad):
            # The auto-connector dials every peerstore entry, forever, to reach 100
            # connections; in a small swarm that only means redialing dead peers.
            self._host.get_network().auto_connector._started = False
            async with trio.open_nursery() as nursery:
                self._bridge.nursery = nursery
                self._bridge.token = trio.lowlevel.current_trio_token()
                for protocol in list(self._handlers):
                    self._register(protocol)
                failure = await self._join(boot, require_bootstrap)
                if failure is not None:
                    # the caller's start() raises it and then stops this node, which ends this run
                    self._bridge.loop.call_soon_threadsafe(Bridge._deliver, ready, None, failure)
                else:
                    self._direct_addrs = [str(a) for a in self._host.get_addrs()]
                    self.addrs = list(self._direct_addrs)
                    if listen:
                        await self._t_settle_reachability(nursery, [p.peer_id for p in boot])
                    else:
                        self.reachability = Reachability(CLIENT)
                    self._bridge.loop.call_soon_threadsafe(Bridge._deliver, ready, None, None)
                await self._stop_event.wait()
                self._bridge.nursery = None
                nursery.cancel_scope.cancel()

    # ---- reachability and relays (trio side) --------------------------------------------
    def _advertised(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        """What identify and our DHT provider records tell peers our addresses are: --announce-addr or
        the listen ones, kept after a private node stops listening (py-libp2p's provider records
        carry the provider's identify addresses, and peers drop a provider that has none)."""
        if self._announce:
            return list(self._announce)
        if self.reachability.status == PRIVATE:
            return list(self._closed_listen_addrs)
        return candidates

    def _holds_reservation(self, relay_id: ID) -> bool:
        return relay_id.to_base58() in self.reservations

    async def _t_settle_reachability(self, nursery: trio.Nursery, boot: list[ID]) -> None:
        """Learn our reachability, then offer a relay (public or unknown) or reserve relay slots (private)."""
        ports = sorted({int(a.value_for_protocol("tcp")) for a in self._host.get_transport_addrs()})
        if self._assume_private:
            self.reachability = Reachability(PRIVATE)
            log.info("reachability: private (assumed: --assume-private)")
        else:
            self.reachability = await reachability.check(self._host, self._dialback_candidates(boot), ports)
            log.info("reachability: %s", self.reachability.describe())
        if self.reachability.status == PRIVATE:
            await self._t_stop_listening()
            assert self._kad is not None
            # nobody can dial us for queries; switching empties the routing table, so refill it
            known = self._kad.routing_table.get_peer_ids()
            await self._kad.switch_mode(DHTMode.CLIENT)
            for peer in known:
                await self._kad.add_peer(peer, skip_server_mode_check=True)
            self._relay_wake = trio.Event()
            first = trio.Event()
            nursery.start_soon(self._t_keep_relays, boot, first)
            with trio.move_on_after(2 * relay.CONTROL_TIMEOUT_S):
                await first.wait()
            return
        if self._relay_offer is not None:
            self.relay = RelayService(self._host, self._relay_offer,
                                      self.link.delay_s if self.link else (lambda _peer: 0.0))
            self.relay.register()
            log.info("offering a relay service (%d reservations, %d circuits, %d MiB and %.0f s per circuit)",
                     self._relay_offer.max_reservations, self._relay_offer.max_circuits,
                     self._relay_offer.circuit_bytes >> 20, self._relay_offer.circuit_duration_s)
        if self.reachability.status == UNKNOWN:
            nursery.start_soon(self._t_recheck_unknown, ports)

    def _dialback_candidates(self, first: list[ID]) -> list[ID]:
        """Peers to ask for a dial-back: bootstrap peers first, then other connected routing-table peers."""
        assert self._kad is not None
        connected = set(self._host.get_connected_peers())
        ordered = [*first, *self._kad.routing_table.get_peer_ids()]
        return [p for i, p in enumerate(ordered) if p in connected and p not in ordered[:i]]

    async def _t_stop_listening(self) -> None:
        """Nobody outside can dial a private node, so it stops listening: every peer then reaches it
        through its relays, also where its listen address would happen to be routable (a peer on the
        same home network; a node made private with --assume-private on one machine)."""
        self._closed_listen_addrs = list(self._host.get_transport_addrs())
        for listener in list(self._host.get_network().listeners.values()):
            with trio.move_on_after(5):
                await listener.close()

    async def _t_recheck_unknown(self, ports: list[int]) -> None:
        """A node that started alone (the first bootstrap peer) asks again once peers have joined."""
        while self.reachability.status == UNKNOWN:
            await trio.sleep(RECHECK_UNKNOWN_S)
            found = await reachability.check(self._host, self._dialback_candidates([]), ports)
            if found.status != UNKNOWN:
                self.reachability = found
                log.info("reachability: %s", found.describe())
                if found.status == PRIVATE and self.relay is not None:
                    log.warning("this node is not reachable from outside: it keeps its relay service, "
                                "but nobody can use it; restart it with an open port or behind none")

    async def _t_keep_relays(self, boot: list[ID], first: trio.Event) -> None:
        """Hold RELAYS_WANTED reservations for as long as the node runs; replace each lost one."""
        assert self._relay_wake is not None
        failed: dict[ID, float] = {}  # relay -> when it last refused or failed us
        warned = False
        while True:
            if len(self.reservations) < RELAYS_WANTED:
                for info in await self._t_relay_candidates(boot, failed):
                    if len(self.reservations) >= RELAYS_WANTED:
                        break
                    try:
                        res = await relay.reserve(self._host, info, self._bridge.nursery, self._t_relay_lost)
                    except Exception as exc:
                        failed[info.peer_id] = trio.current_time()
                        log.info("relay %s refused or failed a reservation: %s", info.peer_id, _root_cause(exc))
                        continue
                    self.reservations[res.relay_id] = res
                    log.info("reserved a relay slot on %s; reachable at %s", res.relay_id, res.circuit_addr)
                    self._t_set_relayed_addrs()
                if self.reservations:
                    first.set()
                    warned = False
                elif not warned:  # once each time the node is left without a relay
                    log.warning("no relay found yet: nobody outside this network can reach this node")
                    warned = True
            with trio.move_on_after(RELAY_TOP_UP_S if self.reservations else RELAY_RETRY_S):
                await self._relay_wake.wait()
            self._relay_wake = trio.Event()

    async def _t_relay_candidates(self, boot: list[ID], failed: dict[ID, float]) -> list[LibPeerInfo]:
        """Known peers that say they offer a relay, bootstrap peers first; skips current relays and any
        that failed us in the last minute."""
        assert self._kad is not None
        store = self._host.get_peerstore()
        now = trio.current_time()
        ordered = [*boot, *self._kad.routing_table.get_peer_ids()]
        peers = [p for i, p in enumerate(ordered) if p not in ordered[:i] and p.to_base58() not in self.reservations
                 and now - failed.get(p, -math.inf) > 60.0]
        offers: list[LibPeerInfo] = []

        async def ask(pid: ID) -> None:
            try:
                addrs = [a for a in store.addrs(pid) if not relay.is_circuit(str(a))]
            except Exception:
                addrs = []
            if not addrs:
                return
            try:
                frame = await self._t_info(PeerInfo(pid.to_base58()), RELAY_INFO_TIMEOUT_S)
                if NodeInfo.decode(pid.to_base58(), frame).relay:
                    offers.append(LibPeerInfo(pid, addrs[:1]))
            except Exception as exc:
                log.debug("asking %s whether it relays failed: %r", pid, exc)

        async with trio.open_nursery() as nursery:
            for pid in peers[:RELAY_CANDIDATES_ASKED]:
                nursery.start_soon(ask, pid)
        return sorted(offers, key=lambda i: ordered.index(i.peer_id))

    def _t_relay_lost(self, res: Reservation) -> None:
        if self.reservations.get(res.relay_id) is res:
            del self.reservations[res.relay_id]
            self._t_set_relayed_addrs()
        if self._relay_wake is not None:
            self._relay_wake.set()

    def _t_set_relayed_addrs(self) -> None:
        """Advertise our circuit addresses (our own, unreachable ones only while we hold no relay)."""
        self.addrs = [r.circuit_addr for r in self.reservations.values()] or list(self._direct_addrs)
        self._bridge.loop.call_soon_threadsafe(self._addrs_changed.set)

    async def _join(self, boot: list[LibPeerInfo], required: bool) -> BootstrapUnreachable | None:
        """Connect to bootstrap peers and look ourselves up so they (and we) fill routing tables.

        If `required` and no bootstrap peer answers, returns why (the caller raises it, so it is
        not logged too); otherwise unreachable peers are logged and None is returned."""
        assert self._kad is not None
        joined = 0
        reasons: list[str] = []
        for info in boot:
            where = f"{info.peer_id} at {', '.join(str(a) for a in info.addrs)}"
            reason = f"no answer within {BOOTSTRAP_TIMEOUT:g} s"
            with trio.move_on_after(BOOTSTRAP_TIMEOUT):
                try:
                    await self._host.connect(info)
                    await self._kad.add_peer(info.peer_id, skip_server_mode_check=True)
                    joined += 1
                    continue
                except Exception as exc:
                    reason = _root_cause(exc)
            log.log(logging.DEBUG if required else logging.WARNING, "bootstrap peer %s unreachable: %s", where, reason)
            reasons.append(f"{where}: {reason}")
        if joined:
            with trio.move_on_after(BOOTSTRAP_TIMEOUT):
                await self._kad.peer_routing.find_closest_peers_network(self._host.get_id().to_bytes())
            return None
        if boot and required:
            return BootstrapUnreachable(f"cannot reach any bootstrap peer ({'; '.join(reasons)})")
        if boot:
            log.warning("no bootstrap peer reachable; starting alone")
        return None

    def _wrap(self, raw: Any) -> Stream:
        return Stream(raw, self._bridge, self.link, self.max_frame_bytes)

    def _register(self, protocol: str) -> None:
        async def on_stream(raw: Any) -> None:
            await self._serve(raw, protocol)

        self._host.set_stream_handler(TProtocol(protocol), on_stream)

    async def _serve(self, raw: Any, protocol: str) -> None:
        """Hand an inbound stream to the asyncio handler; close it when the handler ends."""
        stream = self._wrap(raw)
        finished = trio.Event()
        handler = self._handlers[protocol]
        token = self._bridge.token

        def done(task: asyncio.Task) -> None:
            self._handler_tasks.discard(task)
            try:
                token.run_sync_soon(finished.set)  # type: ignore[union-attr]
            except trio.RunFinishedError:
                pass

        def begin() -> None:
            task = self._bridge.loop.create_task(self._run_handler(handler, stream, protocol))
            self._handler_tasks.add(task)
            task.add_done_callback(done)

        try:
            self._bridge.loop.call_soon_threadsafe(begin)
            await finished.wait()
        except RuntimeError:  # asyncio loop already closed
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream._t_close()

    @staticmethod
    async def _run_handler(handler: Callable[[Stream], Awaitable[None]], stream: Stream, protocol: str) -> None:
        try:
            await handler(stream)
        except (StreamClosed, asyncio.CancelledError):
            pass
        except (FrameTooLarge, TimeoutError) as exc:
            log.warning("closing %s stream from %s: %s", protocol, stream.remote_peer_id, exc)
        except Exception:
            log.exception("handler for %s from %s failed; closing the stream", protocol, stream.remote_peer_id)

    async def _t_open(self, peer: PeerInfo, protocol: str, timeout: float,
                      max_frame_bytes: int | None = None) -> Stream:
        try:
            pid = ID.from_base58(peer.peer_id)
            addrs = [_without_p2p(multiaddr.Multiaddr(a)) for a in peer.addrs if not relay.is_circuit(a)]
            circuits = [a for a in peer.addrs if relay.is_circuit(a)]
            for a in circuits:
                relay.split_circuit(a)
        except Exception as exc:
            raise ValueError(f"bad peer {peer!r}: {exc}") from None
        try:
            with trio.fail_after(timeout):
                network = self._host.get_network()
                if not any(not conn.is_closed for conn in network.get_connections(pid)):
                    if pid in self._host.get_connected_peers():
                        # the swarm still lists a connection that is closed (its relay is gone, say) and
                        # would answer "No valid connections available": drop it and dial afresh
                        log.info("the connection to %s is closed; dialing again", pid)
                        await network.close_peer(pid)
                    await self._t_connect(pid, addrs, circuits)
                elif addrs:
                    self._host.get_peerstore().add_addrs(pid, addrs, 120)
                raw = await self._host.new_stream(pid, [TProtocol(protocol)])
        except trio.TooSlowError:
            raise PeerUnreachable(f"no {protocol} stream to {peer.peer_id} within {timeout}s") from None
        except Exception as exc:
            raise PeerUnreachable(f"cannot open {protocol} to {peer.peer_id}: {exc!r}") from None
        if max_frame_bytes is not None:
            return Stream(raw, self._bridge, self.link, max_frame_bytes)
        return self._wrap(raw)

    async def _t_connect(self, pid: ID, addrs: list[multiaddr.Multiaddr], circuits: list[str]) -> None:
        """Dial `pid` directly at `addrs`, else through the relays of its circuit addresses, in order."""
        errors: list[BaseException] = []
        if addrs or not circuits:
            try:
                await self._host.connect(LibPeerInfo(pid, addrs))
                return
            except Exception as exc:
                errors.append(exc)
        for addr in circuits:
            try:
                await relay.dial_relayed(self._host, pid, addr)
                return
            except Exception as exc:
                log.info("dial to %s through %s failed: %s", pid, addr, _root_cause(exc))
                errors.append(exc)
        raise errors[-1]

    async def _t_ping(self, peer: PeerInfo, timeout: float) -> float:
        stream = await self._t_open(peer, PING_PROTOCOL, timeout)
        try:
            with trio.fail_after(timeout):
                start = trio.current_time()
                await stream._t_send(b"dsdping!")
                await stream._t_recv()
                return trio.current_time() - start
        except trio.TooSlowError:
            raise PeerUnreachable(f"ping to {peer.peer_id} timed out after {timeout}s") from None
        finally:
            await stream._t_close()

    async def _t_known_peers(self) -> list[PeerInfo]:
        assert self._kad is not None
        store = self._host.get_peerstore()
        peers = []
        for pid in self._kad.routing_table.get_peer_ids()[:INFO_MAX_PEERS]:
            try:
                addrs = tuple(str(a) for a in store.addrs(pid)[:INFO_MAX_ADDRS])
            except Exception:  # no addresses left in the peerstore
                addrs = ()
            peers.append(PeerInfo(pid.to_base58(), addrs))
        return peers

    def _served_models(self) -> dict[str, tuple[int, int]]:
        """The spans this node announces now: its DHT's last announcement per model, unless withdrawn
        or expired (so nothing has to register what it serves a second time)."""
        now = time.time()
        announced = list(self.dht._last.items())  # one atomic copy: the asyncio thread may announce meanwhile
        return {m: (r.start, r.end) for m, r in announced if not r.withdrawn and r.expires > now}

    async def _t_info(self, peer: PeerInfo, timeout: float) -> bytes:
        stream = await self._t_open(peer, INFO_PROTOCOL, timeout, max_frame_bytes=INFO_MAX_BYTES)
        try:
            with trio.fail_after(timeout):
                await stream._t_send(b"info")
                return await stream._t_recv()
        except trio.TooSlowError:
            raise PeerUnreachable(f"info from {peer.peer_id} timed out after {timeout}s") from None
        except FrameTooLarge as exc:
            raise ValueError(f"info answer from {peer.peer_id}: {exc}") from None
        finally:
            await stream._t_close()

    async def _serve_info(self, raw: Any) -> None:
        """One answer per stream: what this node serves and whom its routing table holds."""
        stream = self._wrap(raw)
        try:
            frame = await stream._t_recv(timeout=10.0)
            if len(frame) <= 64:
                info = NodeInfo(self.peer_id, self._served_models(), tuple(await self._t_known_peers()),
                                self.reachability.status, self.relay is not None)
                await stream._t_send(info.encode())
        except (StreamClosed, TimeoutError, FrameTooLarge):
            pass
        finally:
            await stream._t_close()

    async def _serve_ping(self, raw: Any) -> None:
        stream = self._wrap(raw)
        try:
            while True:
                frame = await stream._t_recv(timeout=60.0)
                if len(frame) > 64:
                    break
                await stream._t_send(frame)
        except (StreamClosed, TimeoutError, FrameTooLarge):
            pass
        finally:
            await stream._t_close()


def _root_cause(exc: BaseException) -> str:
    """Why a connect failed, in one short line.

    libp2p wraps the cause in layers (a dial error from a group of retried dials, each from an
    OSError of trio's from the kernel's); the innermost says what a user can act on, e.g.
    "Connection refused"."""
    for _ in range(16):  # bounded: a chain is a few links deep
        group = getattr(exc, "exceptions", None) or getattr(exc, "errors", None)  # ExceptionGroup, libp2p MultiError
        inner = exc.__cause__ or exc.__context__ or (group[0] if isinstance(group, (list, tuple)) and group else None)
        if not isinstance(inner, BaseException):
            break
        exc = inner
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _without_p2p(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    """Transport part of a multiaddr (the peerstore wants addresses without /p2p/<id>)."""
    try:
        value = addr.value_for_protocol("p2p")
    except Exception:
        return addr
    return addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{value}")) if value else addr
