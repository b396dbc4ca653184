"""How long to wait for one pass of a block through the chain before suspecting a hop.

A fixed timeout is either too short for a slow chain or far too long for a fast one (a hung hop
cost 120 s with the old fixed step timeout). Deadlines come from the passes this client measured,
each scaled up when it carried fewer positions than the pass at hand (never down: fewer positions
are not assumed to be cheaper). There are two: a prompt one (slack x the median recent pass, plus a
margin) after which the client pings the hops, and a patient one (slack x the slowest recent pass,
plus a margin) that it waits out when every hop answers the ping. Suspecting too early therefore
costs a ping, not a failover, so the prompt deadline can be tight. Before anything is measured,
the first pass (which also warms up every server) gets a generous fixed deadline."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class DeadlineSettings:
    first_s: float = 60.0  # before any pass was measured
    slack: float = 3.0  # times the median (prompt deadline) or slowest (patient one) recent pass
    margin_s: float = 1.0  # added to every deadline
    max_s: float = 120.0  # never wait longer than this for one pass
    window: int = 16  # how many recent passes the estimate looks at

    def __post_init__(self) -> None:
        if not (0 < self.margin_s <= self.max_s and 0 < self.first_s <= self.max_s and self.slack >= 1
                and self.window >= 1):
            raise ValueError(f"inconsistent deadline settings: {self}")


class PassDeadline:
    """Deadline for the next chain pass, from measured (positions, seconds) of earlier passes."""

    def __init__(self, settings: DeadlineSettings = DeadlineSettings()):
        self.settings = settings
        self._passes: deque[tuple[int, float]] = deque(maxlen=settings.window)

    def observe(self, positions: int, elapsed_s: float) -> None:
        if positions >= 1 and elapsed_s >= 0:
            self._passes.append((positions, elapsed_s))

    def seconds(self, positions: int) -> float:
        """When to start suspecting a hop."""
        return self._deadline(positions, statistics.median)

    def patient_seconds(self, positions: int) -> float:
        """How long to wait when every hop still answers pings."""
        return self._deadline(positions, max)

    def _deadline(self, positions: int, summary) -> float:
        if not self._passes:
            return self.settings.first_s
        expected = summary([elapsed * max(1.0, positions / n) for n, elapsed in self._passes])
        return min(self.settings.max_s, self.settings.slack * expected + self.settings.margin_s)
