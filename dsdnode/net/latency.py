"""Per-link latency emulation in userspace.

This kernel has no netem, so the network layer emulates a link's one-way latency itself:
p2p.py asks `delay_s(peer)` before writing every outbound frame and sleeps that long in the
trio task that writes the frame. Only that task waits, so other streams (and other frames
sent concurrently on other tasks) keep flowing: two concurrent sends overlap their delays,
as on a real link, instead of queueing behind each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from ..errors import BadValue


@dataclass(frozen=True)
class LinkLatency:
    """One-way latency added before each outbound frame, in milliseconds.

    `default_ms` applies to every peer not listed in `per_peer_ms` (keyed by base58 peer id).
    A round trip over a link where both ends use the same setting therefore costs twice the
    value; with only one end configured it costs the value once.
    """

    default_ms: float = 0.0
    per_peer_ms: dict[str, float] | None = field(default=None)

    def __post_init__(self) -> None:
        values = [self.default_ms, *(self.per_peer_ms or {}).values()]
        for value in values:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"latency must be a number of milliseconds, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise BadValue(f"latency must be finite and >= 0 ms, got {value!r}")

    def delay_s(self, peer_id: str) -> float:
        """Seconds to wait before writing a frame to `peer_id`."""
        ms = (self.per_peer_ms or {}).get(peer_id, self.default_ms)
        return ms / 1000.0
