"""A private node's side of relaying: hold RELAYS_WANTED reservations and advertise their circuits.

Nobody outside can dial a node behind a NAT, so it reserves a slot on public peers that offer a
relay (relay.py) and advertises the circuit addresses through them instead of its own. It holds
two, so losing one relay leaves it reachable, and replaces each one it loses. Runs on the host's
trio thread.
"""

from __future__ import annotations

import logging
import math

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as LibPeerInfo

from dsdnode.net import relay
from dsdnode.net.host import Host, PeerInfo, root_cause
from dsdnode.net.peer_info import trio_ask
from dsdnode.net.relay import Reservation

log = logging.getLogger(__name__)

RELAYS_WANTED = 2  # reservations a private node holds, so losing one relay leaves it reachable
RELAY_RETRY_S = 5.0  # a private node without a relay looks for one this often
RELAY_TOP_UP_S = 30.0  # one holding fewer than RELAYS_WANTED looks for more this often
RELAY_CANDIDATES_ASKED = 16  # peers asked per search whether they relay (bootstrap peers first)
RELAY_INFO_TIMEOUT_S = 5.0


class RelayClient:
    """Our reservations on relays (`reservations`: relay peer id -> reservation)."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self.reservations: dict[str, Reservation] = {}
        self._direct_addrs: list[str] = []
        self._wake: trio.Event | None = None

    def holds_reservation(self, relay_id: ID) -> bool:
        return relay_id.to_base58() in self.reservations

    async def trio_keep(self, boot: list[ID], direct_addrs: list[str], first: trio.Event) -> None:
        """Hold RELAYS_WANTED reservations for as long as the node runs; replace each lost one. `first`
        is set once the first search has ended, whether it found a relay or not (every relay may
        refuse, e.g. one that holds its limit of reservations from this node's network; start-up
        need not wait on that); `direct_addrs` are advertised while none is held."""
        self._direct_addrs = list(direct_addrs)
        self._wake = trio.Event()
        failed: dict[ID, float] = {}  # relay -> when it last refused or failed us
        warned = False
        while True:
            if len(self.reservations) < RELAYS_WANTED:
                for info in await self._candidates(boot, failed):
                    if len(self.reservations) >= RELAYS_WANTED:
                        break
                    try:
                        res = await relay.reserve(self._host.libp2p, info, self._host.bridge.nursery, self._lost)
                    except Exception as exc:
                        failed[info.peer_id] = trio.current_time()
                        log.info("relay %s refused or failed a reservation: %s", info.peer_id, root_cause(exc))
                        continue
                    self.reservations[res.relay_id] = res
                    log.info("reserved a relay slot on %s; reachable at %s", res.relay_id, res.circuit_addr)
                    self._advertise()
                first.set()
                if self.reservations:
                    warned = False
                elif not warned:  # once each time the node is left without a relay
                    log.warning("no relay found yet: nobody outside this network can reach this node")
                    warned = True
            with trio.move_on_after(RELAY_TOP_UP_S if self.reservations else RELAY_RETRY_S):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _candidates(self, boot: list[ID], failed: dict[ID, float]) -> list[LibPeerInfo]:
        """Known peers that say they offer a relay, bootstrap peers first; skips current relays and any
        that failed us in the last minute."""
        kad = self._host.kad
        assert kad is not None
        store = self._host.libp2p.get_peerstore()
        now = trio.current_time()
        ordered = [*boot, *kad.routing_table.get_peer_ids()]
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
                if (await trio_ask(self._host, PeerInfo(pid.to_base58()), RELAY_INFO_TIMEOUT_S)).relay:
                    offers.append(LibPeerInfo(pid, addrs[:1]))
            except Exception as exc:
                log.debug("asking %s whether it relays failed: %r", pid, exc)

        async with trio.open_nursery() as nursery:
            for pid in peers[:RELAY_CANDIDATES_ASKED]:
                nursery.start_soon(ask, pid)
        return sorted(offers, key=lambda i: ordered.index(i.peer_id))

    def _lost(self, res: Reservation) -> None:
        if self.reservations.get(res.relay_id) is res:
            del self.reservations[res.relay_id]
            self._advertise()
        if self._wake is not None:
            self._wake.set()

    def _advertise(self) -> None:
        """Advertise our circuit addresses (our own, unreachable ones only while we hold no relay)."""
        self._host.set_addrs([r.circuit_addr for r in self.reservations.values()] or self._direct_addrs)
