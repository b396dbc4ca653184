"""Dialing a session's next hop on behalf of its opener, who must not be able to use it as a probe.

The opener names the next hop by peer id only, and the hop is dialled at the addresses of that
peer's own signed span record (daemon.py). But whoever makes a peer id signs its record, so those
addresses are the opener's choice. Therefore:

- only globally routable addresses are dialled (`net/groups.py`; a circuit address counts by its
  relay's address), unless the node serves a local swarm (`local_swarm`), and only those: not the
  others the peerstore learnt for that peer id from the DHT;
- every failed dial is answered with one text after the same time (DIAL_S from the start of the
  dial, whatever happened: refused, reset, timed out, wrong peer), so an opener cannot tell an open
  port from a closed one;
- each opener, and each network group of openers, may make a server dial at most DIALS_PER_WINDOW
  (GROUP_DIALS_PER_WINDOW) next hops per WINDOW_S; past it: "busy"."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from ..net.groups import dialable_addrs
from ..net.p2p import P2PNode, PeerInfo, Stream
from ..net.protocol import SESSION_PROTOCOL
from .sessions import SessionError

DIAL_S = 5.0  # a next hop must answer within this; every failure is reported this long after the dial began
WINDOW_S = 60.0
DIALS_PER_WINDOW = 30  # next-hop dials per opener (peer id) per window
GROUP_DIALS_PER_WINDOW = 60  # per network group of openers
UNREACHABLE = "cannot reach next hop {peer}"  # the one text of every failed dial


class DialRate:
    """Next-hop dials per opener and per network group in the last WINDOW_S (a sliding window)."""

    def __init__(self, per_opener: int = DIALS_PER_WINDOW, per_group: int = GROUP_DIALS_PER_WINDOW,
                 window_s: float = WINDOW_S) -> None:
        self.limits = {"opener": per_opener, "group": per_group}
        self.window_s = window_s
        self._times: dict[tuple[str, str], deque[float]] = {}

    def take(self, opener: str, group: str) -> None:
        """Count one dial, or raise "busy" if the opener or its group used up its window."""
        now = time.monotonic()
        keys = [("opener", opener), ("group", group)]
        for key in keys:
            times = self._times.get(key)
            while times and now - times[0] > self.window_s:
                times.popleft()
            if times and len(times) >= self.limits[key[0]]:
                raise SessionError("busy", f"too many next hops dialled for this {key[0]} (at most "
                                           f"{self.limits[key[0]]} a minute); try again later",
                                   self.window_s - (now - times[0]))
        for key in keys:
            self._times.setdefault(key, deque()).append(now)
        if len(self._times) > 4 * (self.limits["opener"] + self.limits["group"]) * 64:
            self._times = {k: v for k, v in self._times.items() if v and now - v[-1] <= self.window_s}


def allowed_hop(peer: PeerInfo, local_swarm: bool) -> PeerInfo:
    """`peer` with only the addresses this node may dial; "bad_next_hop" if none is left."""
    addrs = dialable_addrs(peer.addrs, local_swarm)
    if not addrs:
        raise SessionError("bad_next_hop", f"next peer {peer.peer_id} lists no globally routable address")
    return PeerInfo(peer.peer_id, tuple(addrs))


async def open_next_hop(node: P2PNode, peer: PeerInfo) -> Stream:
    """A session stream to `peer`, or "bad_next_hop" with UNREACHABLE exactly DIAL_S after the start."""
    began = time.monotonic()
    try:
        return await node.open_stream(peer, SESSION_PROTOCOL, timeout=DIAL_S, only_given_addrs=True)
    except Exception:  # whatever failed, the opener learns only that it failed
        await asyncio.sleep(max(0.0, DIAL_S - (time.monotonic() - began)))
        raise SessionError("bad_next_hop", UNREACHABLE.format(peer=peer.peer_id)) from None
