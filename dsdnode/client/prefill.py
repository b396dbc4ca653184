"""Pipelined prefill: how long a prompt takes through a chain in chunks, and which chunk is best.

Sent whole, hop after hop, a long prompt costs every hop's compute and every link's latency and
transfer in a row. Sent as chunks back to back, the hops work as a pipeline: hop 2 computes chunk 1
while hop 1 computes chunk 2, and a link carries one chunk while the next is computed. With m
chunks of c positions over N hops, the model is

    T(c) = fill(c) + (m - 1) * bottleneck(c)
    fill(c) = N * (f + b*c) + (N + 1) * (L + s*c)          one chunk through every stage
    bottleneck(c) = max(f + b*c, hop_sends * s*c)          the slowest stage, once per further chunk

f, b: a hop's compute per block and per position; L: a link's one-way delay; s: a link's transfer
time per position (bytes per position / uplink rate); hop_sends: frames a hop's uplink carries per
block (the push to the next hop and the copy its client audits, client/swarm_chain.py). Small
chunks pay f and the per-frame overheads more often; big ones fill the pipeline slowly.
`choose_chunk` minimises T(c) over chunk sizes the servers accept. The costs come from what the
client measured (`PrefillMeter`), before any measurement from the route (pings, the servers'
advertised speed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Until the per-position compute is identified, a block's compute is assumed to grow by this share
# of a one-position block per further position (a forward over a few positions is weight-bound).
DEFAULT_POSITION_SHARE = 1 / 32
MIN_CHUNK = 4


@dataclass(frozen=True)
class PrefillCosts:
    n_hops: int
    hop_fixed_s: float  # f: a hop's compute for a block, beyond its positions
    hop_position_s: float  # b: a hop's compute per position
    link_s: float  # L: one link's one-way delay
    link_position_s: float  # s: one link's transfer time per position
    hop_sends: int = 2  # frames a hop's uplink carries per block (push + the client's copy)

    def __post_init__(self) -> None:
        if not isinstance(self.n_hops, int) or self.n_hops < 1:
            raise ValueError(f"n_hops must be an int >= 1, got {self.n_hops!r}")
        for name in ("hop_fixed_s", "hop_position_s", "link_s", "link_position_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")

    def fill_s(self, chunk: int) -> float:
        n = self.n_hops
        return n * (self.hop_fixed_s + self.hop_position_s * chunk) + (n + 1) * (self.link_s + self.link_position_s * chunk)

    def bottleneck_s(self, chunk: int) -> float:
        return max(self.hop_fixed_s + self.hop_position_s * chunk, self.hop_sends * self.link_position_s * chunk)

    def pipelined_s(self, positions: int, chunk: int) -> float:
        """Modelled prefill time of `positions` in chunks of `chunk`, sent back to back."""
        m = math.ceil(positions / chunk)
        return self.fill_s(chunk) + (m - 1) * self.bottleneck_s(chunk)

    def sequential_s(self, positions: int, chunk: int) -> float:
        """Modelled prefill time when each chunk waits for the one before to come back."""
        return math.ceil(positions / chunk) * self.fill_s(chunk)


def choose_chunk(costs: PrefillCosts, positions: int, max_chunk: int) -> int:
    """The chunk size (a power of two from MIN_CHUNK, or max_chunk) with the least modelled prefill
    time; the larger on ties (fewer frames)."""
    if positions < 1 or max_chunk < 1:
        raise ValueError(f"need positions >= 1 and max_chunk >= 1, got {positions}, {max_chunk}")
    top = min(max_chunk, positions)
    candidates = {top} | {c for c in (2 ** i for i in range(2, 16)) if MIN_CHUNK <= c < top}
    return min(sorted(candidates, reverse=True), key=lambda c: costs.pipelined_s(positions, c))


class _LineFit:
    """Least squares y = a + b*x over every sample (costs of one route barely drift in a generation)."""

    def __init__(self) -> None:
        self.n = self.sx = self.sxx = self.sy = self.sxy = 0.0

    def add(self, x: float, y: float) -> None:
        self.n += 1
        self.sx, self.sxx, self.sy, self.sxy = self.sx + x, self.sxx + x * x, self.sy + y, self.sxy + x * y

    def fit(self, default_slope_share: float) -> tuple[float, float] | None:
        """(a, b), both >= 0; with no spread in x, b is default_slope_share of the mean y per x."""
        if not self.n:
            return None
        x_bar, y_bar = self.sx / self.n, self.sy / self.n
        spread = self.sxx - self.sx * x_bar
        if spread > 1e-9 * max(1.0, self.sxx):
            b = (self.sxy - self.sx * y_bar) / spread
        else:
            b = default_slope_share * y_bar / max(x_bar, 1.0)
        b = min(max(b, 0.0), y_bar / max(x_bar, 1.0))
        return y_bar - b * x_bar, b


class PrefillMeter:
    """What the client measured of its chains' blocks: per-hop compute and per-link time against the
    block's positions. Only blocks that met no queue are folded in (rounds, a prefill's first chunk):
    a pipelined chunk's link time includes waiting for the chunk before it."""

    def __init__(self) -> None:
        self._compute, self._link = _LineFit(), _LineFit()

    def observe(self, positions: int, hop_compute_s: list[float], hop_link_s: list[float]) -> None:
        for c in hop_compute_s:
            self._compute.add(positions, c)
        for link in hop_link_s:
            self._link.add(positions, link)

    def costs(self, n_hops: int, fallback: PrefillCosts) -> PrefillCosts:
        """The measured costs, each falling back to `fallback` where nothing was measured yet."""
        compute = self._compute.fit(DEFAULT_POSITION_SHARE)
        link = self._link.fit(0.0)
        f, b = compute if compute else (fallback.hop_fixed_s, fallback.hop_position_s)
        latency, s = link if link else (fallback.link_s, fallback.link_position_s)
        return PrefillCosts(n_hops, f, b, latency, s, fallback.hop_sends)
