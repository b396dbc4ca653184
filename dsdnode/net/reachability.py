"""Is this node publicly reachable? Ask peers to dial it back (AutoNAT-style, dsdnode's own protocol).

A node asks a few peers it is connected to; each dials the asker's listen port(s) at the IP it sees
the request come from, over a fresh TCP connection, and runs the Noise handshake far enough to check
the asker's identity key, then hangs up and answers. One successful dial-back makes the node
`public` (at the address dialled, which is how a node on 0.0.0.0 behind a forwarded port learns its
public address too); answers that all failed make it `private`; no answer leaves it `unknown`.

Why not py-libp2p 0.8.1's `host/autonat`: its dial-back calls `host.connect`, which returns at once
when any connection to the peer exists, and the asker is always connected to the peer it asks (it
asked over that connection), so every dial-back "succeeds" and every node behind a NAT would
believe it is public. Dialing only the IP the request came from (as the AutoNAT spec requires) keeps
the service from being used to make a node dial third parties; a request that arrives through a
relay is refused (its IP is the relay's), and a node runs a few dial-backs at once at most.

Everything here runs on the libp2p host's trio thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from .relay import connection_is_relayed, recv_control, send_control

if TYPE_CHECKING:
    from .host import Host

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL = TProtocol("/dsdnode/dialback/1.0.0")
DIALBACK_TIMEOUT_S = 5.0  # one dial + Noise handshake
ASK_TIMEOUT_S = 2 * DIALBACK_TIMEOUT_S + 2.0
MAX_PORTS = 4
MAX_CONCURRENT_DIALBACKS = 4
PEERS_TO_ASK = 3

PUBLIC, PRIVATE, UNKNOWN, CLIENT = "public", "private", "unknown", "client"


@dataclass(frozen=True)
class Reachability:
    """What this node learned about itself: `status` (public, private, unknown, client), the address a
    peer reached it at (public only), and how many peers answered out of how many were asked."""

    status: str
    addr: str = ""
    answered: int = 0
    asked: int = 0

    def describe(self) -> str:
        if self.status == PUBLIC:
            return f"public (dialled back at {self.addr}; {self.answered} of {self.asked} peers answered)"
        if self.status == PRIVATE:
            return f"private (none of {self.answered} peers could dial back; behind a NAT or firewall)"
        if self.status == CLIENT:
            return "client (listens nowhere)"
        return f"unknown ({self.answered} of {self.asked} peers answered)"


class DialbackService:
    """Answers other peers' dial-back requests."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self._slots = trio.Semaphore(MAX_CONCURRENT_DIALBACKS)

    async def serve(self, raw: Any) -> None:
        peer = raw.muxed_conn.peer_id
        try:
            body = await recv_control(raw)
            ports = [p for p in body.get("ports", [])[:MAX_PORTS] if type(p) is int and 0 < p < 65536]
            remote = raw.get_remote_address()
            if connection_is_relayed(self.host, peer) or not remote:
                await send_control(raw, {"ok": False, "reason": "request came through a relay"})
                return
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                await send_control(raw, {"ok": False, "reason": "busy"})
                return
            try:
                addr = await self._dial_back(peer, str(remote[0]), ports)
            finally:
                self._slots.release()
            await send_control(raw, {"ok": bool(addr), "addr": addr})
        except Exception as exc:  # whatever the asker sent or did, only its request ends
            log.debug("dial-back request from %s failed: %r", peer, exc)
        finally:
            with trio.move_on_after(2):
                try:
                    await raw.close()
                except Exception:
                    pass

    async def _dial_back(self, peer: ID, ip: str, ports: list[int]) -> str:
        """The first /ip4/ip/tcp/port at which `peer` itself answers (a Noise handshake proves it), or ''."""
        swarm = self.host.get_network()
        for port in ports:
            addr = multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{port}")
            transport = swarm.transport_manager.transport_for_dialing(addr)
            if transport is None:
                continue
            raw_conn = None
            try:
                with trio.fail_after(DIALBACK_TIMEOUT_S):
                    raw_conn = await transport.dial(addr)
                    secured = await swarm.upgrader.upgrade_security(raw_conn, True, peer)
                    await secured.close()
                return str(addr)
            except Exception as exc:
                log.debug("dial-back to %s at %s failed: %r", peer, addr, exc)
            finally:
                if raw_conn is not None:
                    with trio.move_on_after(1):
                        try:
                            await raw_conn.close()
                        except Exception:
                            pass
        return ""


async def check(host: Any, peers: list[ID], ports: list[int]) -> Reachability:
    """Ask up to PEERS_TO_ASK of `peers` (connected ones, not through a relay) to dial `ports` back."""
    asked = [p for p in peers if not connection_is_relayed(host, p)][:PEERS_TO_ASK]
    answers: dict[ID, str | None] = {}

    async def ask(peer: ID) -> None:
        with trio.move_on_after(ASK_TIMEOUT_S):
            try:
                raw = await host.new_stream(peer, [DIALBACK_PROTOCOL])
                try:
                    await send_control(raw, {"ports": ports[:MAX_PORTS]})
                    body = await recv_control(raw, ASK_TIMEOUT_S)
                finally:
                    with trio.move_on_after(1):
                        await raw.close()
                if body.get("reason"):  # busy or refused: no verdict from this peer
                    return
                answers[peer] = str(body.get("addr", "")) if body.get("ok") else None
            except Exception as exc:
                log.debug("dial-back request to %s failed: %r", peer, exc)

    async with trio.open_nursery() as nursery:
        for peer in asked:
            nursery.start_soon(ask, peer)
    reached = [a for a in answers.values() if a]
    if reached:
        return Reachability(PUBLIC, reached[0], len(answers), len(asked))
    return Reachability(PRIVATE if answers else UNKNOWN, "", len(answers), len(asked))


def dialback_candidates(host: Host, first: list[ID]) -> list[ID]:
    """Peers to ask for a dial-back: `first` (bootstrap peers), then other connected routing-table peers."""
    assert host.kad is not None
    connected = set(host.libp2p.get_connected_peers())
    ordered = [*first, *host.kad.routing_table.get_peer_ids()]
    return [p for i, p in enumerate(ordered) if p in connected and p not in ordered[:i]]


def listen_ports(host: Host) -> list[int]:
    """The TCP ports the host listens on (what a dial-back must reach)."""
    return sorted({int(a.value_for_protocol("tcp")) for a in host.libp2p.get_transport_addrs()})


async def stop_listening(host: Host) -> list[multiaddr.Multiaddr]:
    """Close the host's listeners and return the addresses they listened on.

    Nobody outside can dial a private node, so it stops listening: every peer then reaches it
    through its relays, also where its listen address would happen to be routable (a peer on the
    same home network; a node made private with --assume-private on one machine)."""
    closed = list(host.libp2p.get_transport_addrs())
    for listener in list(host.libp2p.get_network().listeners.values()):
        with trio.move_on_after(5):
            await listener.close()
    return closed
