"""Relayed connections for peers nobody can dial: dsdnode's own small circuit relay.

A server behind a NAT keeps an outbound connection to a public relay and holds a *reservation*
there; anyone may then reach it at `<relay addr>/p2p/<relay id>/p2p-circuit`: the dialer asks the
relay to connect it to the server, the relay opens a stream to the server over the connection the
server already holds, and pipes bytes between the two streams. Both ends then run the ordinary
libp2p upgrade (Noise, then Yamux) over that piped stream, so the connection is end-to-end
encrypted and authenticated (the relay sees only ciphertext) and the swarm uses it like any other
connection: every dsdnode protocol works over it unchanged.

Why not py-libp2p 0.8.1's `relay/circuit_v2`: measured here, its hop, reservation and upgrade work
for one circuit, but its relay keys the circuits it pipes by destination peer and, when any circuit
to a peer ends, closes the streams stored under that key, which belong to the newest circuit to the
same peer (a client's and an upstream hop's circuits to one NATed server kill each other). Its
reservations expire by time, so a relay that dies unnoticed is learned of only when a dial fails.
Here a reservation lives exactly as long as its reserve stream: the server sends a heartbeat every
HEARTBEAT_S and the relay echoes it, so either side learns within HEARTBEAT_TIMEOUT_S that the other
is gone (the server then reserves elsewhere at once).

Limits (RelayLimits): reservations held, circuits at once (in all and per reserved peer), bytes and
seconds per circuit. A circuit over a limit is cut (both streams reset); the ends see a lost
connection and fail over as after any fault. A relay never relays for a stream that itself arrived
through a relay, and only connects a dialer to a peer that holds a reservation and is connected now.

Everything here runs on the libp2p host's trio thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as LibPeerInfo

from ..errors import BadValue, PeerError

log = logging.getLogger(__name__)

RESERVE_PROTOCOL = TProtocol("/dsdnode/relay/reserve/1.0.0")
CONNECT_PROTOCOL = TProtocol("/dsdnode/relay/connect/1.0.0")
STOP_PROTOCOL = TProtocol("/dsdnode/relay/stop/1.0.0")
CIRCUIT = "/p2p-circuit"
CONTROL_MAX_BYTES = 1024  # a control message: a few short fields
CONTROL_TIMEOUT_S = 10.0
HEARTBEAT_S = 5.0
HEARTBEAT_TIMEOUT_S = 3 * HEARTBEAT_S
PIPE_CHUNK = 64 * 1024
PIPE_QUEUE = 64  # chunks in flight per direction while the emulated link delays them


class RelayError(PeerError, ConnectionError):
    """A relay refused or failed a reservation or a circuit; the message says why."""


@dataclass(frozen=True)
class RelayLimits:
    """What one relay gives away. A circuit carries one connection (all its streams, e.g. every
    session between a client and a NATed server), so the byte and time limits are per connection."""

    max_reservations: int = 128
    max_circuits: int = 512
    max_circuits_per_peer: int = 32
    circuit_bytes: int = 4 << 30
    circuit_duration_s: float = 6 * 3600.0


def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


def circuit_addr(relay_addr: str, relay_id: str) -> str:
    """How a reserving peer is dialled through a relay (its own /p2p/<id> is left off, as on every
    address a record carries)."""
    return f"{relay_addr}/p2p/{relay_id}{CIRCUIT}"


def split_circuit(addr: str) -> tuple[str, str]:
    """(relay transport address, relay peer id) of a circuit address; ValueError if it is none."""
    try:
        ma = multiaddr.Multiaddr(addr.split(CIRCUIT, 1)[0])
        relay_id = ma.value_for_protocol("p2p")
    except Exception:
        relay_id = None
    if not relay_id:
        raise BadValue(f"circuit address {addr!r} names no relay (/p2p/<relay id> before {CIRCUIT})")
    return str(ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{relay_id}"))), str(relay_id)


# ---- control messages: 2-byte length + msgpack map, read exactly (the bytes after them belong to Noise)
async def send_control(raw: Any, body: dict) -> None:
    frame = msgpack.packb(body, use_bin_type=True)
    await raw.write(len(frame).to_bytes(2, "big") + frame)


async def _read_exact(raw: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await raw.read(n - len(buf))
        if not chunk:
            raise RelayError("stream closed")
        buf += chunk
    return buf


async def recv_control(raw: Any, timeout: float = CONTROL_TIMEOUT_S) -> dict:
    """One control message; RelayError if it is late, too big or not a map."""
    with trio.move_on_after(timeout):
        size = int.from_bytes(await _read_exact(raw, 2), "big")
        if size > CONTROL_MAX_BYTES:
            raise RelayError(f"control message of {size} bytes")
        try:
            body = msgpack.unpackb(await _read_exact(raw, size), raw=False)
        except Exception as exc:
            raise RelayError(f"malformed control message: {exc!r}") from None
        if not isinstance(body, dict):
            raise RelayError("control message is not a map")
        return body
    raise RelayError(f"no control message within {timeout:g} s")


async def _reset(raw: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await raw.reset()
        except Exception:
            pass


def _remote(raw: Any) -> ID:
    return raw.muxed_conn.peer_id


def tag_relayed(host: Any, peer: ID, muxed: Any, addr: multiaddr.Multiaddr) -> None:
    """Mark the swarm connection that runs over a circuit as relayed, with its circuit address
    (the generic upgrade cannot know it): the dial-back service refuses requests arriving on it."""
    for conn in host.get_network().connections.get(peer, []):
        if getattr(conn, "muxed_conn", None) is muxed or conn is muxed:
            conn.set_transport_info([addr], ConnectionType.RELAYED)


def connection_is_relayed(host: Any, peer: ID) -> bool:
    """Whether our connection to `peer` runs through a relay (fails closed: unknown counts as relayed)."""
    conns = host.get_network().connections.get(peer, [])
    if not conns:
        return True
    try:
        return any(CIRCUIT in str(a) for c in conns for a in (c.get_transport_addresses() or []))
    except Exception:
        return True


class RelayService:
    """The relay side: reservations, and circuits to peers that hold one."""

    def __init__(self, host: Any, limits: RelayLimits, latency_s: Callable[[str], float]) -> None:
        self.host, self.limits, self._latency_s = host, limits, latency_s
        self.reservations: dict[ID, object] = {}  # peer -> token of the reserve stream that holds it
        self.circuits: dict[ID, int] = {}  # reserved peer -> circuits to it now
        self.enabled = True

    def register(self) -> None:
        self.host.set_stream_handler(RESERVE_PROTOCOL, self._serve_reserve)
        self.host.set_stream_handler(CONNECT_PROTOCOL, self._serve_connect)

    @property
    def open_circuits(self) -> int:
        return sum(self.circuits.values())

    async def _serve_reserve(self, raw: Any) -> None:
        peer = _remote(raw)
        token = object()
        try:
            await recv_control(raw)
            reason = self._refusal(peer)
            if reason:
                await send_control(raw, {"ok": False, "reason": reason})
                return
            self.reservations[peer] = token
            log.info("relay: reservation for %s (%d held)", peer, len(self.reservations))
            await send_control(raw, {"ok": True, "heartbeat_s": HEARTBEAT_S,
                                     "circuit_bytes": self.limits.circuit_bytes,
                                     "circuit_duration_s": self.limits.circuit_duration_s})
            while self.enabled:  # the reservation lives while the peer keeps beating
                beat = await recv_control(raw, HEARTBEAT_TIMEOUT_S)
                await send_control(raw, beat)
        except (RelayError, Exception) as exc:  # a peer's stream may fail in any way; it only ends its reservation
            log.debug("relay: reserve stream of %s ended: %r", peer, exc)
        finally:
            if self.reservations.get(peer) is token:
                del self.reservations[peer]
                log.info("relay: reservation of %s ended", peer)
            await _reset(raw)

    def _refusal(self, peer: ID) -> str:
        if not self.enabled:
            return "this node offers no relay service"
        if connection_is_relayed(self.host, peer):
            return "reservations over a relayed connection are refused"
        if peer not in self.reservations and len(self.reservations) >= self.limits.max_reservations:
            return f"relay full ({self.limits.max_reservations} reservations)"
        return ""

    async def _serve_connect(self, raw: Any) -> None:
        source = _remote(raw)
        target: ID | None = None
        counted = False
        stop = None
        try:
            body = await recv_control(raw)
            target = ID.from_base58(str(body.get("target", "")))
            reason = ("dialer came through a relay" if connection_is_relayed(self.host, source)
                      else "target holds no reservation here" if target not in self.reservations
                      else "target is not connected" if not self.host.get_network().connections.get(target)
                      else f"relay carries {self.limits.max_circuits} circuits already"
                      if self.open_circuits >= self.limits.max_circuits
                      else f"target has {self.limits.max_circuits_per_peer} circuits already"
                      if self.circuits.get(target, 0) >= self.limits.max_circuits_per_peer else "")
            if reason:
                await send_control(raw, {"ok": False, "reason": reason})
                return
            self.circuits[target] = self.circuits.get(target, 0) + 1
            counted = True
            with trio.fail_after(CONTROL_TIMEOUT_S):
                stop = await self.host.new_stream(target, [STOP_PROTOCOL])
                await send_control(stop, {"source": source.to_base58()})
                answer = await recv_control(stop)
            if not answer.get("ok"):
                await send_control(raw, {"ok": False, "reason": f"target refused: {answer.get('reason', '')}"[:200]})
                return
            await send_control(raw, {"ok": True})
            await self._pipe(raw, stop, source, target)
        except Exception as exc:  # bad request, target gone, limits: only this circuit ends
            log.debug("relay: circuit %s -> %s ended: %r", source, target, exc)
        finally:
            if counted and target is not None:
                self.circuits[target] -= 1
                if not self.circuits[target]:
                    del self.circuits[target]
            await _reset(raw)
            if stop is not None:
                await _reset(stop)

    async def _pipe(self, a: Any, b: Any, a_id: ID, b_id: ID) -> None:
        """Copy both ways until either side ends or a limit is reached. Each direction delays its
        chunks by this node's emulated link latency toward the receiver (a relayed link is one more
        link) without holding back the chunks behind them."""
        budget = [self.limits.circuit_bytes]
        with trio.move_on_after(self.limits.circuit_duration_s) as cut:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._copy, a, b, b_id, budget, nursery.cancel_scope)
                nursery.start_soon(self._copy, b, a, a_id, budget, nursery.cancel_scope)
        if cut.cancelled_caught:
            log.info("relay: circuit %s <-> %s reached its duration limit", a_id, b_id)

    async def _copy(self, src: Any, dst: Any, dst_id: ID, budget: list[int], done: trio.CancelScope) -> None:
        send, recv = trio.open_memory_channel[tuple[float, bytes]](PIPE_QUEUE)
        delay = self._latency_s(dst_id.to_base58())

        async def deliver() -> None:
            async for due, chunk in recv:
                wait = due - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                await dst.write(chunk)

        try:
            async with trio.open_nursery() as inner:
                inner.start_soon(deliver)
                async with send:
                    while True:
                        chunk = await src.read(PIPE_CHUNK)
                        if not chunk:
                            break
                        budget[0] -= len(chunk)
                        if budget[0] < 0:
                            log.info("relay: circuit to %s reached its byte limit", dst_id)
                            break
                        await send.send((trio.current_time() + delay, chunk))
        except Exception as exc:
            log.debug("relay: copy to %s ended: %r", dst_id, exc)
        done.cancel()


@dataclass
class Reservation:
    relay_id: str
    relay_addr: str  # transport address of the relay, without /p2p
    lost: trio.Event

    @property
    def circuit_addr(self) -> str:
        return circuit_addr(self.relay_addr, self.relay_id)


async def reserve(host: Any, relay: LibPeerInfo, nursery: trio.Nursery, on_lost: Callable[[Reservation], None]
                  ) -> Reservation:
    """Hold a reservation on `relay` until the connection or the relay goes; on_lost is called then.
    RelayError (or PeerUnreachable's causes) if the relay refuses or cannot be reached."""
    with trio.fail_after(CONTROL_TIMEOUT_S):
        await host.connect(relay)
        raw = await host.new_stream(relay.peer_id, [RESERVE_PROTOCOL])
    try:
        await send_control(raw, {"op": "reserve"})
        answer = await recv_control(raw)
    except BaseException:
        await _reset(raw)
        raise
    if not answer.get("ok"):
        await _reset(raw)
        raise RelayError(str(answer.get("reason", "refused"))[:200])
    addr = str(relay.addrs[0]).split("/p2p/")[0] if relay.addrs else ""  # the transport part
    res = Reservation(relay.peer_id.to_base58(), addr, trio.Event())

    async def keep() -> None:
        try:
            while True:
                await trio.sleep(HEARTBEAT_S)
                await send_control(raw, {"beat": True})
                await recv_control(raw, HEARTBEAT_TIMEOUT_S)
        except Exception as exc:
            log.warning("relay %s lost: %s", res.relay_id, exc)
        finally:
            res.lost.set()
            await _reset(raw)
            on_lost(res)

    nursery.start_soon(keep)
    return res


async def dial_relayed(host: Any, target: ID, addr: str) -> None:
    """Connect to `target` through the relay named in circuit address `addr`; afterwards the swarm
    holds an (end-to-end encrypted) connection to target. RelayError or a libp2p error if not."""
    relay_addr, relay_id = split_circuit(addr)
    rid = ID.from_base58(relay_id)
    if rid == target:
        raise RelayError("a peer cannot be its own relay")
    await host.connect(LibPeerInfo(rid, [multiaddr.Multiaddr(relay_addr)]))
    raw = await host.new_stream(rid, [CONNECT_PROTOCOL])
    try:
        await send_control(raw, {"target": target.to_base58()})
        answer = await recv_control(raw)
        if not answer.get("ok"):
            raise RelayError(f"relay {relay_id} refused: {str(answer.get('reason', ''))[:200]}")
        ma = multiaddr.Multiaddr(f"{relay_addr}/p2p/{relay_id}{CIRCUIT}/p2p/{target.to_base58()}")
        conn = RawConnection(stream=raw, initiator=True, connection_type=ConnectionType.RELAYED, addresses=[ma])
        swarm_conn = await host.upgrade_outbound_connection(conn, target)
        tag_relayed(host, target, getattr(swarm_conn, "muxed_conn", swarm_conn), ma)
    except BaseException:
        await _reset(raw)
        raise


def stop_handler(host: Any, accepts: Callable[[ID], bool]) -> Callable[[Any], Any]:
    """The reserving side: a relay we hold a reservation with brings us a dialer's circuit."""

    async def serve_stop(raw: Any) -> None:
        relay = _remote(raw)
        try:
            body = await recv_control(raw)
            source = ID.from_base58(str(body.get("source", "")))
            if not accepts(relay):
                await send_control(raw, {"ok": False, "reason": "no reservation with this relay"})
                await _reset(raw)
                return
            await send_control(raw, {"ok": True})
            ma = multiaddr.Multiaddr(f"/p2p/{relay.to_base58()}{CIRCUIT}/p2p/{source.to_base58()}")
            conn = RawConnection(stream=raw, initiator=False, connection_type=ConnectionType.RELAYED, addresses=[ma])
            with trio.fail_after(CONTROL_TIMEOUT_S):
                muxed = await host.upgrade_inbound_connection(conn, ma)
            tag_relayed(host, source, muxed, ma)
        except Exception as exc:  # a malformed or failed circuit only ends itself
            log.debug("relayed connection through %s failed: %r", relay, exc)
            await _reset(raw)

    return serve_stop


__all__ = ["CIRCUIT", "RelayError", "RelayLimits", "RelayService", "Reservation", "circuit_addr",
           "connection_is_relayed", "dial_relayed", "is_circuit", "reserve", "split_circuit",
           "stop_handler"]
