"""Is this node publicly reachable? Ask peers to dial it back (AutoNAT-style, dsdnode's own protocol).

A node asks a few peers it is connected to; each dials the asker's listen port(s) at the IP it sees
the request come from, over a fresh TCP connection, and runs the Noise handshake far enough to check
the asker's identity key, then hangs up and answers. Successful dial-backs from peers of at least
QUORUM_GROUPS different network groups (the /24 or /48 the asker's connection to each comes from,
net/groups.py: never what a peer claims) make the node `public` (at the address dialled, which is
how a node on 0.0.0.0 behind a forwarded port learns its public address too): one lying peer, or
any number of throw-away ids in one network, cannot make a NATed node believe it is public and keep
it from reserving a relay. Short of that quorum, failed dial-backs at least as many as successful
ones make it `private` (a lying "yes" beside an honest "no" must not keep a NATed node from its
relays; a public node taken for private still works, through relays, while a private one taken for
public is unreachable); otherwise, or with no answer, it is `unknown`: it listens, relays and asks
again later (turning private only when two checks in a row say so, so that one dial-back lost to a
slow moment does not make a serving node stop listening).

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
from typing import Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from .groups import network_group
from .host import Host, connection_ip
from .relay import connection_is_relayed, recv_control, send_control

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL = TProtocol("/dsdnode/dialback/1.0.0")
DIALBACK_TIMEOUT_S = 5.0  # one dial + Noise handshake
ASK_TIMEOUT_S = 2 * DIALBACK_TIMEOUT_S + 2.0
MAX_PORTS = 4
MAX_CONCURRENT_DIALBACKS = 4
PEERS_TO_ASK = 4
QUORUM_GROUPS = 2  # dial-backs from peers of this many network groups make a node public

PUBLIC, PRIVATE, UNKNOWN, CLIENT = "public", "private", "unknown", "client"


@dataclass(frozen=True)
class Reachability:
    """What this node learned about itself: `status` (public, private, unknown, client), the address a
    peer reached it at (public only), and how many peers answered out of how many were asked."""

    status: str
    addr: str = ""
    answered: int = 0
    asked: int = 0
    confirmed_groups: int = 0  # network groups of the peers that dialled back successfully

    def describe(self) -> str:
        answers = f"{self.answered} of {self.asked} peers answered, dial-backs from {self.confirmed_groups} network(s)"
        if self.status == PUBLIC:
            return f"public (dialled back at {self.addr}; {answers})"
        if self.status == PRIVATE:
            return f"private ({answers}, some failed; behind a NAT or firewall)"
        if self.status == CLIENT:
            return "client (listens nowhere)"
        return f"unknown ({answers}; {QUORUM_GROUPS} needed)"


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


async def check(host: Any, peers: list[ID], ports: list[int], local_swarm: bool = False) -> Reachability:
    """Ask up to PEERS_TO_ASK of `peers` (connected ones, not through a relay; one per network group
    first) to dial `ports` back. `local_swarm`: each loopback peer is a group of its own."""
    groups: dict[ID, str] = {}
    for peer in peers:
        seen = connection_ip(host, peer)
        if seen is not None and not seen[1] and not connection_is_relayed(host, peer):
            groups[peer] = network_group(seen[0], peer.to_base58(), local_swarm)
    by_group: dict[str, list[ID]] = {}
    for peer, group in groups.items():
        by_group.setdefault(group, []).append(peer)
    asked = [*(ps[0] for ps in by_group.values()), *(p for ps in by_group.values() for p in ps[1:])][:PEERS_TO_ASK]
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
    return judge([(groups[p], a) for p, a in answers.items()], len(asked))


def judge(answers: list[tuple[str, str | None]], asked: int) -> Reachability:
    """The verdict on dial-back answers, each (network group of the answering peer, the address it
    reached us at, or None if it could not)."""
    reached = [(g, a) for g, a in answers if a]
    confirmed = len({g for g, _ in reached})
    failed = len(answers) - len(reached)
    status = PUBLIC if confirmed >= QUORUM_GROUPS else PRIVATE if failed and failed >= len(reached) else UNKNOWN
    return Reachability(status, reached[0][1] if status == PUBLIC else "", len(answers), asked, confirmed)


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
