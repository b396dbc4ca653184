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

Limits (RelayLimits): reservations held (in all and per network group of the reserving peers),
circuits at once (in all, per reserved peer and per network group of the dialers), and per circuit
its bytes, its duration, its rate (a token bucket shared by both directions: a circuit that sends
faster is read more slowly, so nothing piles up here) and its idleness (one that carries fewer than
IDLE_BYTES in circuit_idle_s is cut: yamux's own keep-alive pings do not keep it open). A group is
the /24 or /48 of the address the reserving or dialing connection comes from (`net/groups.py`),
never an address a peer claims: peer ids are free, addresses are not. A circuit over a limit is cut
(both streams reset); the ends see a lost connection and fail over as after any fault. A relay
never relays for a stream that itself arrived through a relay, and only connects a dialer to a peer
that holds a reservation and is connected now.

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
from .groups import network_group
from .stream import raw_remote_ip

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
PIPE_QUEUE = 16  # chunks in flight per direction while the emulated link delays them (1 MiB at most)
IDLE_BYTES = 4096  # a circuit that carries less than this in circuit_idle_s is idle (a yamux ping is a few dozen bytes)


class RelayError(PeerError, ConnectionError):
    """A relay refused or failed a reservation or a circuit; the message says why."""


@dataclass(frozen=True)
class RelayLimits:
    """What one relay gives away. A circuit carries one connection (all its streams, e.g. every
    session between a client and a NATed server), so the per-circuit limits are per connection.

    Why these defaults: a generation's traffic is small (Qwen2.5-1.5B: a block of 5 positions is
    15-30 KB, a 2,000-token prompt 6-12 MB), so 4 MiB/s per circuit delays only a long prompt's
    prefill and lets a relay's uplink carry many circuits; an hour and 1 GiB cover thousands of
    generations over one connection, and a circuit cut at a limit costs its ends one failover (they
    re-dial a fresh circuit). A circuit idle for 5 minutes (the servers' own session expiry) is
    cut, so abandoned circuits do not hold slots. 4 reservations per /24 leave room for a household
    with a few NATed servers; 16 circuits per dialer /24 for a few clients and servers behind one
    address."""

    max_reservations: int = 128
    max_reservations_per_group: int = 4
    max_circuits: int = 512
    max_circuits_per_peer: int = 32  # to one reserved peer
    max_circuits_per_group: int = 16  # from the dialers of one network group
    circuit_bytes: int = 1 << 30
    circuit_duration_s: float = 3600.0
    circuit_idle_s: float = 300.0
    circuit_bytes_per_s: int = 4 << 20  # both directions together; bursts up to one second's worth

    def describe(self) -> str:
        return (f"{self.max_reservations} reservations ({self.max_reservations_per_group} per network), "
                f"{self.max_circuits} circuits ({self.max_circuits_per_group} per network), per circuit "
                f"{self.circuit_bytes >> 20} MiB, {self.circuit_duration_s:.0f} s, "
                f"{self.circuit_bytes_per_s / (1 << 20):g} MiB/s, cut after {self.circuit_idle_s:g} s idle")


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


async def refuse(raw: Any, reason: str) -> None:
    """Say no, then wait (bounded) until the peer has read it and hung up: a stream reset at once
    can overtake the answer, and the peer would learn only that the stream broke."""
    await send_control(raw, {"ok": False, "reason": reason})
    with trio.move_on_after(CONTROL_TIMEOUT_S):
        try:
            while await raw.read(CONTROL_MAX_BYTES):
                pass
        except Exception:  # the peer reset it: it has read what it wanted
            pass


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


@dataclass
class _Circuit:
    """One piped circuit: what it may still carry, and when it last carried IDLE_BYTES."""

    source: ID
    target: ID
    group: str  # the dialer's network group
    bytes_left: int
    rate: int  # bytes/s, both directions together
    tokens: float  # the rate's token bucket (at most one second's worth)
    refilled: float
    moved: int = 0  # bytes since `active`
    active: float = 0.0  # trio time the circuit last carried IDLE_BYTES (or opened)

    async def take(self, n: int) -> None:
        """Charge n bytes to the bucket; sleep off any debt, so the reader of the faster side waits."""
        now = trio.current_time()
        self.tokens = min(float(self.rate), self.tokens + (now - self.refilled) * self.rate) - n
        self.refilled = now
        self.moved += n
        if self.moved >= IDLE_BYTES:
            self.moved, self.active = 0, now
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.rate)


class RelayService:
    """The relay side: reservations, and circuits to peers that hold one. `local_swarm`: loopback
    peers count as network groups of their own (net/groups.py)."""

    def __init__(self, host: Any, limits: RelayLimits, latency_s: Callable[[str], float],
                 local_swarm: bool = False) -> None:
        self.host, self.limits, self._latency_s, self.local_swarm = host, limits, latency_s, local_swarm
        self.reservations: dict[ID, tuple[object, str]] = {}  # peer -> (token of its reserve stream, group)
        self.circuits: dict[ID, int] = {}  # reserved peer -> circuits to it now
        self.group_circuits: dict[str, int] = {}  # dialers' network group -> circuits from it now
        self.enabled = True

    def register(self) -> None:
        self.host.set_stream_handler(RESERVE_PROTOCOL, self._serve_reserve)
        self.host.set_stream_handler(CONNECT_PROTOCOL, self._serve_connect)

    @property
    def open_circuits(self) -> int:
        return sum(self.circuits.values())

    def _group(self, raw: Any) -> str:
        return network_group(raw_remote_ip(raw), _remote(raw).to_base58(), self.local_swarm)

    async def _serve_reserve(self, raw: Any) -> None:
        peer = _remote(raw)
        token = object()
        try:
            await recv_control(raw)
            group = self._group(raw)
            reason = self._refusal(peer, group)
            if reason:
                await refuse(raw, reason)
                return
            self.reservations[peer] = (token, group)
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
            if self.reservations.get(peer, (None,))[0] is token:
                del self.reservations[peer]
                log.info("relay: reservation of %s ended", peer)
            await _reset(raw)

    def _refusal(self, peer: ID, group: str) -> str:
        if not self.enabled:
            return "this node offers no relay service"
        if connection_is_relayed(self.host, peer):
            return "reservations over a relayed connection are refused"
        others = {p: g for p, (_, g) in self.reservations.items() if p != peer}
        if len(others) >= self.limits.max_reservations:
            return f"relay full ({self.limits.max_reservations} reservations)"
        if sum(g == group for g in others.values()) >= self.limits.max_reservations_per_group:
            return f"peers of your network hold {self.limits.max_reservations_per_group} reservations here already"
        return ""

    async def _serve_connect(self, raw: Any) -> None:
        source = _remote(raw)
        circuit: _Circuit | None = None
        stop = None
        try:
            body = await recv_control(raw)
            target = ID.from_base58(str(body.get("target", "")))
            group = self._group(raw)
            limits = self.limits
            reason = ("this node offers no relay service" if not self.enabled
                      else "dialer came through a relay" if connection_is_relayed(self.host, source)
                      else "target holds no reservation here" if target not in self.reservations
                      else "target is not connected" if not self.host.get_network().connections.get(target)
                      else f"relay carries {limits.max_circuits} circuits already"
                      if self.open_circuits >= limits.max_circuits
                      else f"target has {limits.max_circuits_per_peer} circuits already"
                      if self.circuits.get(target, 0) >= limits.max_circuits_per_peer
                      else f"dialers of your network hold {limits.max_circuits_per_group} circuits here already"
                      if self.group_circuits.get(group, 0) >= limits.max_circuits_per_group else "")
            if reason:
                await refuse(raw, reason)
                return
            now = trio.current_time()
            circuit = _Circuit(source, target, group, limits.circuit_bytes, limits.circuit_bytes_per_s,
                               float(limits.circuit_bytes_per_s), now, active=now)
            self.circuits[target] = self.circuits.get(target, 0) + 1
            self.group_circuits[group] = self.group_circuits.get(group, 0) + 1
            with trio.fail_after(CONTROL_TIMEOUT_S):
                stop = await self.host.new_stream(target, [STOP_PROTOCOL])
                await send_control(stop, {"source": source.to_base58()})
                answer = await recv_control(stop)
            if not answer.get("ok"):
                await refuse(raw, f"target refused: {answer.get('reason', '')}"[:200])
                return
            await send_control(raw, {"ok": True})
            await self._pipe(raw, stop, circuit)
        except Exception as exc:  # bad request, target gone, limits: only this circuit ends
            log.debug("relay: circuit %s -> %s ended: %r", source, circuit and circuit.target, exc)
        finally:
            if circuit is not None:
                for counts, key in ((self.circuits, circuit.target), (self.group_circuits, circuit.group)):
                    counts[key] -= 1
                    if not counts[key]:
                        del counts[key]
            await _reset(raw)
            if stop is not None:
                await _reset(stop)

    async def _pipe(self, a: Any, b: Any, circuit: _Circuit) -> None:
        """Copy both ways until either side ends or a limit is reached. Each direction delays its
        chunks by this node's emulated link latency toward the receiver (a relayed link is one more
        link) without holding back the chunks behind them."""
        with trio.move_on_after(self.limits.circuit_duration_s) as cut:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._copy, a, b, circuit.target, circuit, nursery.cancel_scope)
                nursery.start_soon(self._copy, b, a, circuit.source, circuit, nursery.cancel_scope)
                nursery.start_soon(self._cut_when_idle, circuit, nursery.cancel_scope)
        if cut.cancelled_caught:
            log.info("relay: circuit %s <-> %s reached its duration limit", circuit.source, circuit.target)

    async def _cut_when_idle(self, circuit: _Circuit, done: trio.CancelScope) -> None:
        idle_s = self.limits.circuit_idle_s
        while trio.current_time() < circuit.active + idle_s:
            await trio.sleep_until(circuit.active + idle_s)
        log.info("relay: circuit %s <-> %s idle for %g s: cut", circuit.source, circuit.target, idle_s)
        done.cancel()

    async def _copy(self, src: Any, dst: Any, dst_id: ID, circuit: _Circuit, done: trio.CancelScope) -> None:
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
                        circuit.bytes_left -= len(chunk)
                        if circuit.bytes_left < 0:
                            log.info("relay: circuit to %s reached its byte limit", dst_id)
                            break
                        await circuit.take(len(chunk))
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
                await refuse(raw, "no reservation with this relay")
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
