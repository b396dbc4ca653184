"""Slow-walking: a hop that returns correct outputs ever more slowly is replaced mid-generation.

A pass deadline (client/deadlines.py) grows with the passes it measured, so a hop that delays each
block a little more than the last never misses one (measured: 0.34 s a pass grew to 32 s with 0
failovers while an honest replica sat idle). The pace watch keeps, per hop of the session, the
baseline of its first decode passes (the median of BASELINE_PASSES; it never rises after) and calls
a hop slow when SLOW_STRIKES passes in a row exceed SLOW_FACTOR x the lesser of that baseline and
what an available replica of its layers was measured to cost, plus SLOW_MARGIN_S (room for a loaded
machine). Only decode-sized blocks count: a replay or a prompt costs more for honest reasons. A slow
hop is replaced only where other servers serve its layers (`Router.can_route_around`): without them a
slow route still beats none.

Who is slow is decided from evidence: the client measures each hop's share of a pass from when its
output copy arrived, and the hop stamps when it received the block and when it sent it on. A share
the hop's own stamps account for is the hop's; a share that passed before the hop says it received
the block was spent upstream -- its predecessor pushed late -- and is blamed there, unless the same
hop has shifted blame so before (a lying stamp then costs the hop itself)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

BASELINE_PASSES = 4  # decode passes whose median is a hop's own pace
DECODE_POSITIONS = 16  # blocks up to this many positions are decode passes
SLOW_FACTOR = 5.0
# room for a loaded machine: at a load average of 33 on 2 cores an honest hop's passes spiked past
# 5x its baseline + 0.25 s twice in a row (tests/client/test_attacks.py), so 1 s
SLOW_MARGIN_S = 1.0
SLOW_STRIKES = 2
# a hop's share of a pass (net of links) that its own stamps leave more than this unaccounted for, and
# more than they account for, passed before it says it received the block
UPSTREAM_SLACK_S = 0.25


def came_late(share: float, own: float) -> bool:
    """Whether a hop's stamps (`own`: from receiving the block to sending it on) put most of its
    measured share before it received the block -- its predecessor pushed late, or it says so. Such a
    share is not measured as the hop's speed: a hop that delays its pushes cannot get the next hop
    rated slow or called a false claimer, and a hop that says so gains no rating either."""
    return share - own > max(own, UPSTREAM_SLACK_S)



@dataclass
class HopPace:
    first: list[float] = field(default_factory=list)  # the first BASELINE_PASSES decode shares
    strikes: int = 0

    @property
    def baseline(self) -> float | None:
        return statistics.median(self.first) if len(self.first) >= BASELINE_PASSES else None


class PaceWatch:
    """The pace of every hop of one session; `observe` after each pass names the slow-walkers."""

    def __init__(self) -> None:
        self.hops: dict[str, HopPace] = {}
        self.shifted: dict[str, int] = {}  # peer -> passes whose delay its stamps put on its predecessor

    def reset(self, peers: list[str]) -> None:
        """A new session: paces start over (what a hop costs may differ on another route)."""
        self.hops = {p: HopPace() for p in peers}

    def observe(self, peers: list[str], shares: list[float], internal: list[float], positions: int,
                replica_s: list[float | None]) -> dict[str, str]:
        """One pass through `peers` (in chain order; peers[0] got the block from the client): each hop's
        measured share, its own stamped time from receiving to sending, and the measured cost of an
        available replica of its layers (None: none). Returns the peers to replace, and why."""
        if positions > DECODE_POSITIONS:
            return {}
        slow: dict[str, str] = {}
        for i, (peer, share, own, replica) in enumerate(zip(peers, shares, internal, replica_s)):
            pace = self.hops.setdefault(peer, HopPace())
            base = pace.baseline
            if base is None:
                pace.first.append(share)
                continue
            limit = SLOW_FACTOR * (base if replica is None else min(base, replica)) + SLOW_MARGIN_S
            pace.strikes = pace.strikes + 1 if share > limit else 0
            if pace.strikes < SLOW_STRIKES:
                continue
            pace.strikes = 0
            upstream = share - own > limit  # most of the share passed before the hop says it got the block
            if upstream and i > 0:
                self.shifted[peer] = self.shifted.get(peer, 0) + 1
                if self.shifted[peer] == 1:
                    slow[peers[i - 1]] = "pushed late to its next hop"
                    continue
            slow[peer] = "slow_walking"
        return slow
