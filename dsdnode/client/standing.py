"""What a client believes about servers: measured speed instead of claims, a standing that failures
and false claims lower, and limits on how many records one network group may place before it.

A span record is a claim its server signs about itself: the throughput in it can say anything
(a record claiming 1e6 tokens/s would win every route). The client therefore routes on what it
measured itself -- the ping RTT, and each hop's share of a pass from the times its output copies
arrive (see `hop_compute_s`) -- and uses a claim only for a server it has not measured yet, capped
at a small multiple of what the other servers of the model claim. A claim far above what was
measured, a refused or failed session, a wrong audit: each lowers the server's standing, which
multiplies its routing cost.

Sybil limits: one machine can run many peer ids, so records are grouped by network (IPv4 /24,
IPv6 /48, every loopback address one group) and at most `max_records_per_group` records of one
group are considered for each layer; a peer that re-announces faster than `min_reannounce_s` keeps
its older record. Records beyond the limits are ignored (logged at debug)."""

from __future__ import annotations

import ipaddress
import logging
import statistics
import time
from dataclasses import dataclass, field

from ..net.records import SpanRecord

log = logging.getLogger(__name__)

FAILURE_MEMORY_S = 600.0  # a failure lowers a server's standing for this long
EWMA = 0.3  # weight of a new measurement of a hop's compute
CLAIM_CAP = 2.0  # an unmeasured server's claimed throughput counts at most this x the median claim
MIN_OVERCLAIM_S = 0.005  # measured hop times below this are too noisy to call a claim false
OVERCLAIM_PENALTY = 4.0


@dataclass(frozen=True)
class TrustSettings:
    """audit_rate: fraction of rounds after which the client audits (0: never, not even at the end).
    max_records_per_group: records of one network group considered per layer (local swarms, where
    every server is on loopback, need as many as they have servers per layer)."""

    audit_rate: float = 0.1
    max_records_per_group: int = 3
    min_reannounce_s: float = 1.0
    overclaim_factor: float = 10.0  # a claim this many times faster than measured is a false claim

    def __post_init__(self) -> None:
        if not 0 <= self.audit_rate <= 1:
            raise ValueError(f"audit_rate must be in [0, 1], got {self.audit_rate!r}")
        if self.max_records_per_group < 1:
            raise ValueError(f"max_records_per_group must be >= 1, got {self.max_records_per_group!r}")


def ip_group(addr: str) -> str | None:
    """The network group of a multiaddr (/ip4/a.b.c.d/... -> a.b.c.0/24; /ip6 -> /48; loopback ->
    "loopback"); None for addresses without an IP (the peer is then a group of its own)."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    try:
        ip = ipaddress.ip_address(parts[2])
    except ValueError:
        return None
    if ip.is_loopback:
        return "loopback"
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def record_group(rec: SpanRecord) -> str:
    """The group a record counts against: that of its first IP address (the one dialled first)."""
    for addr in rec.addrs:
        group = ip_group(addr)
        if group is not None:
            return group
    return f"peer:{rec.peer_id}"


@dataclass
class _Peer:
    s_per_layer: float | None = None  # measured: seconds per layer of one pass
    failures: list[float] = field(default_factory=list)  # monotonic times
    overclaimed: bool = False
    record: SpanRecord | None = None  # the last record admitted (for the re-announce limit)


class Standing:
    """One per client process (shared by its chains), so what one generation learnt routes the next."""

    def __init__(self, settings: TrustSettings = TrustSettings()):
        self.settings = settings
        self.peers: dict[str, _Peer] = {}

    def _peer(self, peer_id: str) -> _Peer:
        return self.peers.setdefault(peer_id, _Peer())

    # ---- what the client saw ------------------------------------------------------------
    def failed(self, peer_id: str, why: str) -> None:
        """A refused or failed session, a hung hop, a wrong result: lowers the standing for a while."""
        self._peer(peer_id).failures.append(time.monotonic())
        log.debug("standing of %s lowered: %s", peer_id, why)

    def measured(self, rec: SpanRecord, layers: int, compute_s: float) -> None:
        """A hop's measured time for `layers` of its span in one pass; checked against its claim."""
        p = self._peer(rec.peer_id)
        per_layer = compute_s / layers
        p.s_per_layer = per_layer if p.s_per_layer is None else (1 - EWMA) * p.s_per_layer + EWMA * per_layer
        claimed = _claimed_s_per_layer(rec)
        if p.s_per_layer * layers > MIN_OVERCLAIM_S and p.s_per_layer > self.settings.overclaim_factor * claimed:
            if not p.overclaimed:
                log.info("%s claims %.0f tokens/s over layers %d:%d but measured %.1f ms per layer: a false claim",
                         rec.peer_id, rec.throughput, rec.start, rec.end, p.s_per_layer * 1e3)
            p.overclaimed = True

    # ---- what routing uses --------------------------------------------------------------
    def penalty(self, peer_id: str) -> float:
        """Multiplies the routing cost of a server: 1 for a clean standing."""
        p = self.peers.get(peer_id)
        if p is None:
            return 1.0
        now = time.monotonic()
        p.failures = [t for t in p.failures if now - t < FAILURE_MEMORY_S]
        return (1.0 + len(p.failures)) * (OVERCLAIM_PENALTY if p.overclaimed else 1.0)

    def s_per_layer(self, rec: SpanRecord, records: list[SpanRecord]) -> float:
        """The routing estimate of a server's seconds per layer: measured, else its claim capped at
        CLAIM_CAP x the median claim of `records` (so an outrageous claim cannot win a route)."""
        p = self.peers.get(rec.peer_id)
        if p is not None and p.s_per_layer is not None:
            return p.s_per_layer
        median = statistics.median(_claimed_s_per_layer(r) for r in records) if records else 0.0
        return max(_claimed_s_per_layer(rec), median / CLAIM_CAP)

    def admit(self, records: list[SpanRecord]) -> list[SpanRecord]:
        """The records routing may consider: re-announce limit, then at most max_records_per_group
        per layer from one network group (the best-standing, then longest-known, records first)."""
        records = [self._rate_limited(r) for r in records]
        known = list(self.peers)
        order = sorted(records, key=lambda r: (self.penalty(r.peer_id),
                                               known.index(r.peer_id) if r.peer_id in known else len(known),
                                               r.peer_id))
        used: dict[tuple[str, int], int] = {}
        out = []
        cap = self.settings.max_records_per_group
        for rec in order:
            group = record_group(rec)
            layers = range(rec.start, rec.end)
            if any(used.get((group, i), 0) >= cap for i in layers):
                log.debug("ignoring the record of %s (layers %d:%d): %d records of network %s already cover them",
                          rec.peer_id, rec.start, rec.end, cap, group)
                continue
            for i in layers:
                used[(group, i)] = used.get((group, i), 0) + 1
            out.append(rec)
        return out

    def _rate_limited(self, rec: SpanRecord) -> SpanRecord:
        p = self._peer(rec.peer_id)
        old = p.record
        if old is not None and old.issued < rec.issued < old.issued + self.settings.min_reannounce_s \
                and old.expires > time.time():
            log.debug("ignoring a re-announce of %s %.2f s after the last (limit %.1f s)",
                      rec.peer_id, rec.issued - old.issued, self.settings.min_reannounce_s)
            return old
        p.record = rec
        return rec


def _claimed_s_per_layer(rec: SpanRecord) -> float:
    return 1.0 / (max(rec.throughput, 1e-9) * max(1, rec.end - rec.start))


def hop_compute_s(sent_at: float, arrivals: list[float], rtts: list[float]) -> list[float]:
    """Each hop's share of a pass, from when the client sent the block (sent_at) and when each hop's
    output copy arrived (arrivals, in chain order), net of links estimated from ping RTTs: hop i's copy
    comes after hop i-1's by the link into hop i (~rtt_i / 2), hop i's compute, and the difference
    of their links back to the client (~rtt_i / 2 - rtt_{i-1} / 2)."""
    out, prev_t, prev_rtt = [], sent_at, 0.0
    for t, rtt in zip(arrivals, rtts):
        out.append(max(0.0, t - prev_t - rtt + prev_rtt / 2))
        prev_t, prev_rtt = t, rtt
    return out
