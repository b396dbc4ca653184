"""A dsdnode peer's network side: one libp2p host and the concerns built on it, used from asyncio.

`P2PNode` assembles them and decides how the node joins: host.py (the trio thread, streams, ping),
dht.py (span records, bootstrap join), reachability.py (dial-back checks), relay.py (our relay
service), relay_client.py (our reservations while private) and peer_info.py (what we say about
ourselves). Those modules talk through each other's public names only.

Servers and bootstrap peers run Kademlia in server mode. A client (`start(client=True)`) listens
nowhere and runs it in client mode: py-libp2p adds the peer of every inbound DHT query to the
routing table, but only with an address to dial, and a node that listens nowhere has none, so a
client never enters a server's routing table and leaves no dead peer behind to be dialed (measured:
three client-mode runs leave 0 client entries, three server-mode runs 3 on every server, each
then dialed by every later query). It still finds providers and fetches values as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import multiaddr
import trio
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as LibPeerInfo
from libp2p.peer.peerinfo import info_from_p2p_addr

from dsdnode.errors import BadValue
from dsdnode.net import reachability, relay
from dsdnode.net.bridge import NodeStopped, StreamClosed
from dsdnode.net.dht import DHT
from dsdnode.net.host import (BootstrapUnreachable, Host, ListenError, PeerInfo, PeerUnreachable,
                              check_listen_address)
from dsdnode.net.identity import load_or_create_identity
from dsdnode.net.latency import LinkLatency
from dsdnode.net.peer_info import (INFO_MAX_BYTES, INFO_PROTOCOL, LOAD_REQUEST, NodeInfo, info_handler,
                                   known_peers, trio_ask)
from dsdnode.net.reachability import CLIENT, PRIVATE, UNKNOWN, Reachability
from dsdnode.net.relay import RelayLimits, RelayService, Reservation
from dsdnode.net.relay_client import RelayClient
from dsdnode.net.stream import FrameTooLarge, Stream

__all__ = ["BootstrapUnreachable", "FrameTooLarge", "INFO_MAX_BYTES", "INFO_PROTOCOL", "ListenError", "NodeInfo",
           "NodeStopped", "P2PNode", "PeerInfo", "PeerUnreachable", "Reachability", "RelayLimits", "Stream",
           "StreamClosed", "check_listen_address"]

log = logging.getLogger(__name__)

RECHECK_UNKNOWN_S = 30.0  # a node that no peer could judge yet asks again this often


class P2PNode:
    """A libp2p host (TCP + Noise + Yamux, Kademlia; server mode unless a client) usable from asyncio.

    Create it with `await P2PNode.start(...)` and use it (and its streams) only from the
    event loop that started it.
    """

    def __init__(self, keypair: KeyPair, latency: LinkLatency | None, max_frame_bytes: int) -> None:
        self.host = Host(keypair, latency, max_frame_bytes)
        self.keypair = keypair
        self.latency = latency
        self.peer_id = self.host.peer_id
        self.started_at = time.monotonic()  # a node that just joined may not see the whole swarm yet
        self.dht = DHT(self.host)
        self.reachability = Reachability(UNKNOWN)
        self.relay: RelayService | None = None  # our relay service, while we offer one
        self.relay_client = RelayClient(self.host)
        self._relay_offer: RelayLimits | None = None
        self._assume_private = False
        self.local_swarm = False  # loopback peers are network groups of their own (net/groups.py)
        # what the load answer says (peer_info.NodeInfo.load): a server sets it (server/load.py); read
        # on the trio thread, so it must only read plain attributes
        self.load_status: Callable[[], dict[str, tuple[int, float]]] = dict

    @classmethod
    async def start(cls, *, identity: KeyPair | None = None, host: str = "127.0.0.1", port: int = 0,
                    bootstrap: list[str] | tuple[str, ...] = (), latency: LinkLatency | None = None,
                    max_frame_bytes: int = 64 * 2**20, announce: list[str] | tuple[str, ...] = (),
                    require_bootstrap: bool = False, client: bool = False, relay_service: bool = True,
                    relay_limits: RelayLimits | None = None, assume_private: bool = False,
                    local_swarm: bool = False) -> P2PNode:
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
        `local_swarm` (tests, bench, one machine): each loopback peer counts as a network group of its
        own, for the reachability quorum and the relay's limits per group (net/groups.py).
        """
        if not client:
            check_listen_address(host, port)
        listen = None if client else multiaddr.Multiaddr(f"/ip4/{host}/tcp/{port}")
        try:
            boot = [info_from_p2p_addr(multiaddr.Multiaddr(a)) for a in bootstrap]
            announced = [multiaddr.Multiaddr(a) for a in announce]
        except Exception as exc:
            raise BadValue(f"bad bootstrap/announce multiaddr (need /ip4/H/tcp/P/p2p/ID): {exc}") from None
        node = cls(identity or load_or_create_identity(None), latency, max_frame_bytes)
        node.host.advertised = announced or None
        node._assume_private = assume_private
        node.local_swarm = local_swarm
        node._relay_offer = relay_limits or RelayLimits() if relay_service else None

        async def running(nursery: trio.Nursery) -> BaseException | None:
            return await node._t_join(nursery, boot, require_bootstrap, listen is not None)

        await node.host.run(listen, lambda: node._t_setup(listen is not None), running)
        return node

    @property
    def addrs(self) -> list[str]:
        """How peers dial this node now (its relays' circuit addresses while it is private)."""
        return self.host.addrs

    @property
    def info(self) -> PeerInfo:
        """How other peers dial this node."""
        return PeerInfo(self.peer_id, tuple(self.addrs))

    @property
    def reservations(self) -> dict[str, Reservation]:
        """Relay peer id -> our reservation there (private nodes)."""
        return self.relay_client.reservations

    def reach_fields(self) -> dict:
        """How peers reach this node, for ready lines: reachability, whether it relays, its relays."""
        return {"reachability": self.reachability.status, "relay_service": self.relay is not None,
                "relays": sorted(self.reservations)}

    async def wait_addrs_changed(self, timeout: float) -> bool:
        """Wait until `addrs` change (a relay reserved or lost) or `timeout` passes; True if they changed."""
        return await self.host.wait_addrs_changed(timeout)

    def set_stream_handler(self, protocol: str, handler: Callable[[Stream], Awaitable[None]]) -> None:
        """Serve inbound streams of `protocol` with an asyncio coroutine (one task per stream).

        The stream stays open while the handler runs and is closed when it returns or raises.
        """
        self.host.set_stream_handler(protocol, handler)

    @property
    def max_frame_bytes(self) -> int:
        """The longest frame any stream of this node reads (a server lowers it to its own ceiling)."""
        return self.host.max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        self.host.max_frame_bytes = value

    async def open_stream(self, peer: PeerInfo, protocol: str, timeout: float = 10.0, *,
                          only_given_addrs: bool = False) -> Stream:
        return await self.host.open_stream(peer, protocol, timeout, only_given_addrs=only_given_addrs)

    async def ask_info(self, peer: PeerInfo, timeout: float = 10.0) -> NodeInfo:
        """What `peer` serves and whom it knows (see NodeInfo); PeerUnreachable or ValueError if it cannot say."""
        return await self.host.bridge.call(trio_ask, self.host, peer, timeout)

    async def ask_load(self, peer: PeerInfo, timeout: float = 10.0) -> dict[str, tuple[int, float]]:
        """What `peer` says its load is now, per model it serves (NodeInfo.load: the short answer)."""
        return (await self.host.bridge.call(trio_ask, self.host, peer, timeout, LOAD_REQUEST)).load

    async def known_peers(self) -> list[PeerInfo]:
        """The peers in this node's DHT routing table, with the addresses it has for them."""
        async def read() -> list[PeerInfo]:
            return known_peers(self.host)

        return await self.host.bridge.call(read)

    async def ping(self, peer: PeerInfo, timeout: float = 10.0) -> float:
        """Round-trip time in seconds of one 8-byte echo frame (emulated latency included)."""
        return await self.host.ping(peer, timeout)

    async def connected_ip(self, peer_id: str) -> tuple[str, bool] | None:
        """See Host.connected_ip: the transport's view of where `peer_id` is, for observed network groups."""
        return await self.host.connected_ip(peer_id)

    async def stop(self) -> None:
        """Stop the host and join its thread; safe to call repeatedly and concurrently."""
        await self.host.stop()

    # ---- trio thread -------------------------------------------------------------------
    def _t_setup(self, listening: bool) -> None:
        """Register our protocols once the libp2p host and its Kademlia exist."""
        libp2p = self.host.libp2p
        self.dht.register()
        libp2p.set_stream_handler(INFO_PROTOCOL, info_handler(self.host, self._describe))
        if listening:
            libp2p.set_stream_handler(reachability.DIALBACK_PROTOCOL, reachability.DialbackService(libp2p).serve)
            libp2p.set_stream_handler(relay.STOP_PROTOCOL,
                                      relay.stop_handler(libp2p, self.relay_client.holds_reservation))

    def _describe(self, short: bool = False) -> NodeInfo:
        return NodeInfo(self.peer_id, self.dht.announced(), () if short else tuple(known_peers(self.host)),
                        self.reachability.status, self.relay is not None, self.load_status())

    async def _t_join(self, nursery: trio.Nursery, boot: list[LibPeerInfo], required: bool,
                      listening: bool) -> BaseException | None:
        """Join the swarm, then learn our reachability; returns why the start failed, if it did."""
        failure = await self.dht.trio_join(boot, required)
        if failure is not None:
            return failure
        nursery.start_soon(self.dht.trio_upkeep)
        self.host.addrs = [str(a) for a in self.host.libp2p.get_addrs()]
        if listening:
            await self._t_settle_reachability(nursery, [p.peer_id for p in boot])
        else:
            self.reachability = Reachability(CLIENT)
        return None

    async def _t_settle_reachability(self, nursery: trio.Nursery, boot: list[ID]) -> None:
        """Learn our reachability, then offer a relay (public or unknown) or reserve relay slots (private)."""
        host = self.host
        ports = reachability.listen_ports(host)
        if self._assume_private:
            self.reachability = Reachability(PRIVATE)
            log.info("reachability: private (assumed: --assume-private)")
        else:
            self.reachability = await reachability.check(host.libp2p, reachability.dialback_candidates(host, boot),
                                                         ports, self.local_swarm)
            log.info("reachability: %s", self.reachability.describe())
        if self.reachability.status == PRIVATE:
            await self._t_go_private(nursery, boot)
            return
        if self._relay_offer is not None:
            self.relay = RelayService(host.libp2p, self._relay_offer,
                                      self.host.link.delay_s if self.host.link else (lambda _peer: 0.0),
                                      self.local_swarm)
            self.relay.register()
            log.info("offering a relay service (%s)", self._relay_offer.describe())
        if self.reachability.status == UNKNOWN:
            nursery.start_soon(self._t_recheck_unknown, nursery, boot, ports)

    async def _t_go_private(self, nursery: trio.Nursery, boot: list[ID]) -> None:
        """Nobody outside can dial us: stop listening and offering a relay, run Kademlia in client
        mode, and reserve relay slots (waits a while for the first search to end)."""
        host = self.host
        if self.relay is not None:
            self.relay.enabled = False  # refuses new reservations and circuits; held ones end at their next beat
            self.relay = None
        closed = await reachability.stop_listening(host)
        if host.advertised is None:
            # py-libp2p's provider records carry the provider's identify addresses, and peers
            # drop a provider that has none: keep advertising the closed ones
            host.advertised = closed
        kad = host.kad
        assert kad is not None
        # nobody can dial us for queries; switching empties the routing table, so refill it
        known = kad.routing_table.get_peer_ids()
        await kad.switch_mode(DHTMode.CLIENT)
        for peer in known:
            await kad.add_peer(peer, skip_server_mode_check=True)
        first = trio.Event()
        nursery.start_soon(self.relay_client.trio_keep, boot, list(host.addrs), first)
        with trio.move_on_after(2 * relay.CONTROL_TIMEOUT_S):
            await first.wait()

    async def _t_recheck_unknown(self, nursery: trio.Nursery, boot: list[ID], ports: list[int]) -> None:
        """A node no quorum of peers could judge yet (the first bootstrap peer, which starts alone; one
        that only peers of one network dialled back) asks again once more peers have joined."""
        said_private = False
        while self.reachability.status == UNKNOWN:
            await trio.sleep(RECHECK_UNKNOWN_S)
            found = await reachability.check(self.host.libp2p, reachability.dialback_candidates(self.host, boot),
                                             ports, self.local_swarm)
            if found.status == PRIVATE and not said_private:  # a serving node stops listening on two in a row only
                said_private = True
                log.info("reachability check: %s; asking again before acting on it", found.describe())
                continue
            said_private = False
            if found.status != UNKNOWN:
                self.reachability = found
                log.info("reachability: %s", found.describe())
                if found.status == PRIVATE:
                    await self._t_go_private(nursery, boot)
