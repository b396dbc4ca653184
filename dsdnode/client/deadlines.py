"""How long to wait for one pass of a block through the chain before suspecting a hop.

A fixed timeout is either too short for a slow chain or far too long for a fast one (a hung hop
cost 120 s with the old fixed step timeout). The deadline for a pass of T positions comes from the
passes this client measured: the slowest recent pass, scaled up when it carried fewer positions
than this one (never down: fewer positions are not assumed to be cheaper), times a slack factor,
plus a margin for scheduling noise. Before anything is measured, the first pass (which also warms
up every server) gets a generous fixed deadline."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class DeadlineSettings:
    first_s: float = 60.0  # before any pass was measured
    slack: float = 3.0  # times the expected pass time
    margin_s: float = 2.0  # added to every deadline
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
        if not self._passes:
            return self.settings.first_s
        expected = max(elapsed * max(1.0, positions / n) for n, elapsed in self._passes)
        return min(self.settings.max_s, self.settings.slack * expected + self.settings.margin_s)
