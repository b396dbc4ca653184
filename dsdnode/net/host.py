"""The libp2p host of a dsdnode peer and its streams, run in a dedicated trio thread, used from asyncio.

The host, its Kademlia DHT and every stream live in one thread under `trio.run`; asyncio code
reaches them through bridge.Bridge (one trio task per operation). Stack: TCP + Noise + Yamux only
(QUIC measured ~4 MB/s here), at most one connection per peer (more made every connect cost
>= 250 ms). Streams: see stream.py.

`Host` is the part of a node every other concern builds on (the DHT, reachability, the relay
client, peer info): it owns the thread, the libp2p host (`libp2p`), the Kademlia instance (`kad`),
the bridge, the advertised addresses, stream handlers, outbound streams (direct or through a relay)
and ping. Methods named `trio_*` run on the host thread; other net modules call them there.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.connection_types import ConnectionType
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import peer_routing as _peer_routing
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as LibPeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from dsdnode.errors import BadValue, PeerError, UserError
from dsdnode.net import relay
from dsdnode.net.bridge import Bridge, StreamClosed
from dsdnode.net.latency import LinkEmulator, LinkLatency
from dsdnode.net.stream import FrameTooLarge, Stream

log = logging.getLogger(__name__)

PING_PROTOCOL = "/dsdnode/ping/1.0.0"
START_TIMEOUT = 60.0


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


class PeerUnreachable(PeerError, ConnectionError):
    """Could not connect to the peer or negotiate the protocol in time."""


class BootstrapUnreachable(PeerUnreachable):
    """None of the bootstrap peers answered a node that cannot work alone (a client)."""


class ListenError(UserError, OSError):
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
        raise BadValue(f"listen host must be an IPv4 address such as 127.0.0.1 or 0.0.0.0, got {host!r}") from None
    if not 0 <= port <= 65535:
        raise BadValue(f"listen port must be in 0..65535, got {port}")
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


# Called on the host thread: once the libp2p host and Kademlia exist (register protocols), and once
# they run (join the swarm; a returned exception fails the start).
SetupHook = Callable[[], None]
RunningHook = Callable[[trio.Nursery], Awaitable[BaseException | None]]



def connection_ip(libp2p: Any, peer: ID) -> tuple[str, bool] | None:
    """(IP address, relayed) of an open connection to `peer` as the transport sees it (not what the
    peer announces; a relayed connection's IP is its relay's); None without one. Trio thread."""
    for conn in libp2p.get_network().get_connections(peer):
        try:
            if conn.is_closed:
                continue
            remote = conn.muxed_conn.get_remote_address()
            relayed = conn.muxed_conn.get_connection_type() == ConnectionType.RELAYED
        except Exception as exc:  # a connection type that does not say
            log.debug("no remote address for %s: %r", peer, exc)
            continue
        if remote:
            return str(remote[0]), relayed
    return None


def release_inbound_slots_on_close(swarm: Any) -> None:
    """Make each inbound connection give its slot back when it closes.

    py-libp2p 0.8.1 admits at most max_connections - min_connections (250) inbound connections, and
    the task that holds a connection's slot waits for the whole swarm to stop, not for the
    connection to close (`Swarm._do_handle_inbound_connection`). So a node that has been dialed 250
    times in its life, by peers that have long gone, refuses every new inbound connection at once.
    Measured: 12 peers connected then killed -9 left 12 slots held and 0 peers connected; in a
    63-peer swarm with 144 departures and a 50-id flood, the bootstrap peers then refused every
    client ("connection reset"). Here the handler ends as soon as its connection's socket is closed,
    which releases the slot (and the handler's memory)."""
    handle = swarm._do_handle_inbound_connection

    async def handle_until_closed(read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
        closed = trio.Event()
        close = read_write_closer.close

        async def close_and_tell() -> None:
            try:
                await close()
            finally:
                closed.set()

        read_write_closer.close = close_and_tell
        async with trio.open_nursery() as nursery:
            async def until_closed() -> None:
                await closed.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_closed)
            await handle(read_write_closer, maddr, failure_event)
            nursery.cancel_scope.cancel()

    swarm._do_handle_inbound_connection = handle_until_closed


class Host:
    """A libp2p host in its own trio thread (TCP + Noise + Yamux, Kademlia), usable from asyncio."""

    def __init__(self, keypair: KeyPair, latency: LinkLatency | None, max_frame_bytes: int) -> None:
        self.keypair = keypair
        self.latency = latency
        self.link = LinkEmulator(latency) if latency is not None else None  # jitter draws, uplink bucket
        self.max_frame_bytes = max_frame_bytes
        self.peer_id: str = ID.from_pubkey(keypair.public_key).to_base58()
        self.addrs: list[str] = []  # how peers dial us now (direct, or our relays' circuit addresses)
        # what identify and our provider records advertise instead of the listen addresses (None: those)
        self.advertised: list[multiaddr.Multiaddr] | None = None
        self.bridge = Bridge(asyncio.get_running_loop())
        self.libp2p: Any = None
        self.kad: KadDHT | None = None
        self._handlers: dict[str, Callable[[Stream], Awaitable[None]]] = {}
        self._handler_tasks: set[asyncio.Task] = set()
        self._addrs_changed = asyncio.Event()
        self._stop_event: trio.Event | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Future | None = None

    async def run(self, listen: multiaddr.Multiaddr | None, setup: SetupHook, running: RunningHook) -> None:
        """Start the thread and the host (listening on `listen`, or nowhere as a DHT client); return once
        `running` has returned on the host thread. Raises what it returned, or why the host failed."""
        ready = self.bridge.loop.create_future()
        self._thread = threading.Thread(target=self._thread_main, args=(listen, setup, running, ready),
                                        name=f"libp2p-{self.peer_id[-6:]}", daemon=True)
        self._thread.start()
        try:
            await asyncio.wait_for(ready, START_TIMEOUT)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"the libp2p host did not start within {START_TIMEOUT:g} s") from None
            raise

    def set_addrs(self, addrs: list[str]) -> None:
        """Replace the addresses peers dial us at (any thread); wakes wait_addrs_changed."""
        self.addrs = list(addrs)
        self.bridge.loop.call_soon_threadsafe(self._addrs_changed.set)

    async def wait_addrs_changed(self, timeout: float) -> bool:
        """Wait until `addrs` change or `timeout` passes; True if they changed."""
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
        if self.bridge.token is not None:
            self.bridge.notify(lambda: self._register(protocol))

    async def open_stream(self, peer: PeerInfo, protocol: str, timeout: float = 10.0, *,
                          only_given_addrs: bool = False) -> Stream:
        return await self.bridge.call(self.trio_open, peer, protocol, timeout, None, only_given_addrs)

    async def ping(self, peer: PeerInfo, timeout: float = 10.0) -> float:
        """Round-trip time in seconds of one 8-byte echo frame (emulated latency included)."""
        return await self.bridge.call(self._t_ping, peer, timeout)

    async def connected_ip(self, peer_id: str) -> tuple[str, bool] | None:
        """The IP address of the open connection to `peer_id` as the transport sees it (not what the
        peer announces), and whether that connection goes through a relay (the IP is then the
        relay's); None without an open connection."""
        async def read() -> tuple[str, bool] | None:
            return connection_ip(self.libp2p, ID.from_base58(peer_id))

        return await self.bridge.call(read)

    async def stop(self) -> None:
        """Stop the host and join its thread; safe to call repeatedly and concurrently."""
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        self._stopping = self.bridge.loop.create_future()
        try:
            for task in list(self._handler_tasks):
                task.cancel()
            if self.bridge.token is not None and self._stop_event is not None:
                self.bridge.notify(self._stop_event.set)
            if self._thread is not None:
                await asyncio.to_thread(self._thread.join, 20.0)
                if self._thread.is_alive():
                    log.warning("libp2p thread of %s did not stop within 20 s", self.peer_id)
        finally:
            self._stopping.set_result(None)

    # ---- trio thread -------------------------------------------------------------------
    def _thread_main(self, listen: multiaddr.Multiaddr | None, setup: SetupHook, running: RunningHook,
                     ready: asyncio.Future) -> None:
        def fail(exc: BaseException) -> None:
            if not ready.done():
                ready.set_exception(exc)

        try:
            trio.run(self._trio_main, listen, setup, running, ready)
        except BaseException as exc:  # report startup failures to the waiting caller
            log.debug("libp2p thread of %s ended with %r", self.peer_id, exc)
            try:
                self.bridge.loop.call_soon_threadsafe(fail, RuntimeError(f"libp2p host failed: {exc!r}"))
            except RuntimeError:
                pass
        finally:
            self.bridge.token = None

    async def _trio_main(self, listen: multiaddr.Multiaddr | None, setup: SetupHook, running: RunningHook,
                         ready: asyncio.Future) -> None:
        noise = NoiseTransport(self.keypair, noise_privkey=new_x25519_key_pair().private_key)
        self.libp2p = new_host(
            key_pair=self.keypair,
            sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=[listen] if listen else None,
            connection_config=ConnectionConfig(max_connections_per_peer=1),
            addrs_factory=self._advertised,
            disable_identify_address_discovery=True,
        )
        self.kad = KadDHT(self.libp2p, DHTMode.SERVER if listen else DHTMode.CLIENT)
        self._stop_event = trio.Event()
        self.libp2p.set_stream_handler(TProtocol(PING_PROTOCOL), self._serve_ping)
        setup()
        async with self.libp2p.run([listen] if listen else []), background_trio_service(self.kad):
            # The auto-connector dials every peerstore entry, forever, to reach 100
            # connections; in a small swarm that only means redialing dead peers.
            self.libp2p.get_network().auto_connector._started = False
            release_inbound_slots_on_close(self.libp2p.get_network())
            async with trio.open_nursery() as nursery:
                self.bridge.nursery = nursery
                self.bridge.token = trio.lowlevel.current_trio_token()
                for protocol in list(self._handlers):
                    self._register(protocol)
                # on failure the caller's run() raises it and then stops this host, which ends this run
                failure = await running(nursery)
                self.bridge.loop.call_soon_threadsafe(Bridge.deliver, ready, None, failure)
                await self._stop_event.wait()
                self.bridge.nursery = None
                nursery.cancel_scope.cancel()

    def _advertised(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        """What identify and our DHT provider records tell peers our addresses are."""
        return list(self.advertised) if self.advertised is not None else candidates

    def wrap(self, raw: Any, max_frame_bytes: int | None = None, max_send_bytes: int | None = None) -> Stream:
        """A framed Stream over a raw libp2p stream (trio thread); it reads frames of at most
        `max_frame_bytes` and sends frames of at most `max_send_bytes` (default: the same)."""
        return Stream(raw, self.bridge, self.link, max_frame_bytes or self.max_frame_bytes, max_send_bytes)

    def _register(self, protocol: str) -> None:
        async def on_stream(raw: Any) -> None:
            await self._serve(raw, protocol)

        self.libp2p.set_stream_handler(TProtocol(protocol), on_stream)

    async def _serve(self, raw: Any, protocol: str) -> None:
        """Hand an inbound stream to the asyncio handler; close it when the handler ends."""
        stream = self.wrap(raw)
        finished = trio.Event()
        handler = self._handlers[protocol]
        token = self.bridge.token

        def done(task: asyncio.Task) -> None:
            self._handler_tasks.discard(task)
            try:
                token.run_sync_soon(finished.set)  # type: ignore[union-attr]
            except trio.RunFinishedError:
                pass

        def begin() -> None:
            task = self.bridge.loop.create_task(self._run_handler(handler, stream, protocol))
            self._handler_tasks.add(task)
            task.add_done_callback(done)

        try:
            self.bridge.loop.call_soon_threadsafe(begin)
            await finished.wait()
        except RuntimeError:  # asyncio loop already closed
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.trio_close()

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

    async def trio_open(self, peer: PeerInfo, protocol: str, timeout: float,
                        max_frame_bytes: int | None = None, only_given_addrs: bool = False) -> Stream:
        """Open a framed stream of `protocol` to `peer`, dialing it first if we hold no live connection.
        only_given_addrs: dial none of the addresses the peerstore learnt for it elsewhere (the DHT
        and identify add whatever peers say), only `peer.addrs` (server/next_hops.py filtered them)."""
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
                network = self.libp2p.get_network()
                if not any(not conn.is_closed for conn in network.get_connections(pid)):
                    if pid in self.libp2p.get_connected_peers():
                        # the swarm still lists a connection that is closed (its relay is gone, say) and
                        # would answer "No valid connections available": drop it and dial afresh
                        log.info("the connection to %s is closed; dialing again", pid)
                        await network.close_peer(pid)
                    if only_given_addrs:
                        self.libp2p.get_peerstore().clear_addrs(pid)
                    await self._t_connect(pid, addrs, circuits)
                elif addrs:
                    self.libp2p.get_peerstore().add_addrs(pid, addrs, 120)
                raw = await self.libp2p.new_stream(pid, [TProtocol(protocol)])
        except trio.TooSlowError:
            raise PeerUnreachable(f"no {protocol} stream to {peer.peer_id} within {timeout}s") from None
        except Exception as exc:
            raise PeerUnreachable(f"cannot open {protocol} to {peer.peer_id}: {exc!r}") from None
        return self.wrap(raw, max_frame_bytes)

    async def _t_connect(self, pid: ID, addrs: list[multiaddr.Multiaddr], circuits: list[str]) -> None:
        """Dial `pid` directly at `addrs`, else through the relays of its circuit addresses, in order."""
        errors: list[BaseException] = []
        if addrs or not circuits:
            try:
                await self.libp2p.connect(LibPeerInfo(pid, addrs))
                return
            except Exception as exc:
                errors.append(exc)
        for addr in circuits:
            try:
                await relay.dial_relayed(self.libp2p, pid, addr)
                return
            except Exception as exc:
                log.info("dial to %s through %s failed: %s", pid, addr, root_cause(exc))
                errors.append(exc)
        raise errors[-1]

    async def _t_ping(self, peer: PeerInfo, timeout: float) -> float:
        stream = await self.trio_open(peer, PING_PROTOCOL, timeout)
        try:
            with trio.fail_after(timeout):
                start = trio.current_time()
                await stream.trio_send(b"dsdping!")
                await stream.trio_recv()
                return trio.current_time() - start
        except trio.TooSlowError:
            raise PeerUnreachable(f"ping to {peer.peer_id} timed out after {timeout}s") from None
        finally:
            await stream.trio_close()

    async def _serve_ping(self, raw: Any) -> None:
        stream = self.wrap(raw)
        try:
            while True:
                frame = await stream.trio_recv(timeout=60.0)
                if len(frame) > 64:
                    break
                await stream.trio_send(frame)
        except (StreamClosed, TimeoutError, FrameTooLarge):
            pass
        finally:
            await stream.trio_close()


def root_cause(exc: BaseException) -> str:
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
