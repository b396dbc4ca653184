"""Per-link WAN emulation in userspace: one-way delay, jitter and an uplink bandwidth cap.

This kernel has no netem, so the network layer emulates a link itself, in the trio task that
writes each outbound frame (stream.py):

1. Uplink: the frame's bytes pass the node's token bucket (one per node, shared by all its
   streams, as a home uplink is): the sender waits until its last byte has "left", so a big frame
   on a slow uplink really costs its size / rate, and frames of concurrent streams queue behind
   each other's bytes.
2. Propagation: the frame is then delivered after the peer's one-way delay plus a jitter sample.
   The sender does not wait for this part (a real sender is free once its bytes are on the wire),
   so a hop that pushes a block on can compute the next one meanwhile. Frames of one stream are
   delivered in the order they were sent, as TCP does: a frame never overtakes an earlier one
   that drew a longer jitter.

`LinkLatency` is the typed setting (from --link-latency-ms, or a node's --link-config TOML that
`dsdnode bench --wan` writes from a WAN profile, net/wan.py); `LinkEmulator` is its running state
in one node (random numbers, the bucket).
"""

from __future__ import annotations

import math
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadValue

JITTER_KINDS = ("none", "exponential", "normal", "pareto")
DEFAULT_BURST_BYTES = 16 * 1024  # what an idle uplink sends at once (about a TCP initial window)


def _check_ms(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of milliseconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise BadValue(f"{name} must be finite and >= 0 ms, got {value!r}")


@dataclass(frozen=True)
class JitterSettings:
    """Extra one-way delay drawn for every frame, in milliseconds (added to the link's base delay).

    kind: none; exponential (mean `scale_ms`: queueing delay); normal (|N(0, scale_ms)|: the
    half-normal, mean scale_ms * sqrt(2/pi)); pareto (scale_ms * (Pareto(shape) - 1): rare long
    spikes, mean scale_ms / (shape - 1) for shape > 1, as measured RTTs have).
    """

    kind: str = "none"
    scale_ms: float = 0.0
    shape: float = 3.0  # pareto only; must be > 1 (a finite mean)

    def __post_init__(self) -> None:
        if self.kind not in JITTER_KINDS:
            raise BadValue(f"jitter kind must be one of {', '.join(JITTER_KINDS)}, got {self.kind!r}")
        _check_ms("jitter scale_ms", self.scale_ms)
        if not (isinstance(self.shape, (int, float)) and math.isfinite(self.shape) and self.shape > 1):
            raise BadValue(f"jitter shape must be > 1, got {self.shape!r}")

    def sample_ms(self, rng: random.Random) -> float:
        if self.kind == "none" or self.scale_ms == 0:
            return 0.0
        if self.kind == "exponential":
            return rng.expovariate(1.0 / self.scale_ms)
        if self.kind == "normal":
            return abs(rng.gauss(0.0, self.scale_ms))
        return self.scale_ms * (rng.paretovariate(self.shape) - 1.0)

    @property
    def mean_ms(self) -> float:
        if self.kind == "none":
            return 0.0
        if self.kind == "exponential":
            return self.scale_ms
        if self.kind == "normal":
            return self.scale_ms * math.sqrt(2 / math.pi)
        return self.scale_ms / (self.shape - 1.0)


@dataclass(frozen=True)
class LinkLatency:
    """How a node's outbound links behave.

    `default_ms` is the one-way delay to every peer not listed in `per_peer_ms` (keyed by base58
    peer id). A round trip over a link where both ends use the same setting therefore costs twice
    the value; with only one end configured it costs the value once. `uplink_mbit` caps the
    node's total outbound rate (0: unlimited); `burst_bytes` is what an idle uplink sends at once.
    `seed` fixes the jitter draws (None: a fresh seed per node).
    """

    default_ms: float = 0.0
    per_peer_ms: dict[str, float] | None = field(default=None)
    jitter: JitterSettings = field(default_factory=JitterSettings)
    uplink_mbit: float = 0.0
    burst_bytes: int = DEFAULT_BURST_BYTES
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_ms("latency", self.default_ms)
        for value in (self.per_peer_ms or {}).values():
            _check_ms("latency", value)
        if not isinstance(self.uplink_mbit, (int, float)) or not math.isfinite(self.uplink_mbit) or self.uplink_mbit < 0:
            raise BadValue(f"uplink_mbit must be finite and >= 0 (0: unlimited), got {self.uplink_mbit!r}")
        if not isinstance(self.burst_bytes, int) or self.burst_bytes < 1:
            raise BadValue(f"burst_bytes must be an int >= 1, got {self.burst_bytes!r}")

    def base_ms(self, peer_id: str) -> float:
        """The one-way delay to `peer_id` before jitter."""
        return (self.per_peer_ms or {}).get(peer_id, self.default_ms)

    def delay_s(self, peer_id: str) -> float:
        """Seconds of the base one-way delay to `peer_id` (no jitter: see LinkEmulator)."""
        return self.base_ms(peer_id) / 1000.0

    @property
    def emulates(self) -> bool:
        """Whether anything is emulated at all (a plain node skips every step)."""
        return bool(self.default_ms or self.per_peer_ms or self.uplink_mbit or self.jitter.kind != "none")

    # ---- TOML (the [links] table of a node's --link-config file) ------------------------------
    def to_toml(self) -> str:
        lines = ["[links]", f"default_ms = {self.default_ms!r}", f"uplink_mbit = {self.uplink_mbit!r}",
                 f"burst_bytes = {self.burst_bytes}"]
        if self.seed is not None:
            lines.append(f"seed = {self.seed}")
        lines += ["", "[links.jitter]", f'kind = "{self.jitter.kind}"', f"scale_ms = {self.jitter.scale_ms!r}",
                  f"shape = {self.jitter.shape!r}", "", "[links.per_peer_ms]"]
        lines += [f'"{peer}" = {ms!r}' for peer, ms in sorted((self.per_peer_ms or {}).items())]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_table(cls, table: dict) -> LinkLatency:
        """From a [links] table; unknown keys are an error (a typo must not silently mean 0)."""
        known = {"default_ms", "per_peer_ms", "jitter", "uplink_mbit", "burst_bytes", "seed"}
        if not isinstance(table, dict) or set(table) - known:
            raise BadValue(f"[links] may hold only {', '.join(sorted(known))}; got {sorted(table)}")
        jitter = table.get("jitter", {})
        if not isinstance(jitter, dict) or set(jitter) - {"kind", "scale_ms", "shape"}:
            raise BadValue(f"[links.jitter] may hold only kind, scale_ms, shape; got {jitter!r}")
        return cls(default_ms=table.get("default_ms", 0.0), per_peer_ms=dict(table.get("per_peer_ms", {})) or None,
                   jitter=JitterSettings(**jitter), uplink_mbit=table.get("uplink_mbit", 0.0),
                   burst_bytes=table.get("burst_bytes", DEFAULT_BURST_BYTES), seed=table.get("seed"))

    @classmethod
    def load(cls, path: str | Path) -> LinkLatency:
        """A --link-config file; any problem is one ValueError naming the file."""
        try:
            return cls.from_table(tomllib.loads(Path(path).read_text()).get("links", {}))
        except (OSError, tomllib.TOMLDecodeError, TypeError, ValueError) as e:
            raise BadValue(f"link config {path}: {e}") from None


class TokenBucket:
    """A byte rate with a burst allowance, in virtual time: `reserve` books a frame's bytes and
    says how long the sender must wait for its last byte to leave. Bookings queue in call order
    (the bucket may go into debt), so concurrent senders share the rate instead of each getting it."""

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int):
        if not (math.isfinite(rate_bytes_per_s) and rate_bytes_per_s > 0) or burst_bytes < 1:
            raise BadValue(f"need a rate > 0 and a burst >= 1, got {rate_bytes_per_s!r}, {burst_bytes!r}")
        self.rate, self.burst = float(rate_bytes_per_s), float(burst_bytes)
        self.tokens = self.burst
        self.at: float | None = None

    def reserve(self, n: int, now: float) -> float:
        """Book n bytes at time `now` (seconds, monotonic); returns the seconds to wait (>= 0)."""
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class LinkEmulator:
    """A node's running link emulation: jitter draws and the uplink bucket (used on the trio thread)."""

    def __init__(self, settings: LinkLatency):
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.uplink = TokenBucket(settings.uplink_mbit * 1e6 / 8, settings.burst_bytes) if settings.uplink_mbit else None

    def delay_s(self, peer_id: str) -> float:
        """This frame's one-way delay to `peer_id`: the base delay plus a jitter draw."""
        return (self.settings.base_ms(peer_id) + self.settings.jitter.sample_ms(self.rng)) / 1000.0

    def uplink_wait_s(self, n_bytes: int, now: float) -> float:
        """Seconds until n_bytes sent now have left the uplink (0 without a cap)."""
        return 0.0 if self.uplink is None else self.uplink.reserve(n_bytes, now)
