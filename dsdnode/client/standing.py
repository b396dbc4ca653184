"""What a client believes about servers: measured speed instead of claims, a standing that failures
and false claims lower, and limits on how many records one network group may place before it.

A span record is a claim its server signs about itself: the throughput in it can say anything
(a record claiming 1e6 tokens/s would win every route). The client therefore routes on what it
measured itself -- the ping RTT, and each hop's share of a pass from the times its output copies
arrive (see `hop_compute_s`) -- and uses a claim only for a server it has not measured yet, capped
at a small multiple of what this client measured of other servers (claims of servers it has not
measured cannot move the cap: six Sybils claiming 1e6 tokens/s would move a median of claims). A
claim far above what was measured, a refused or failed session, a wrong audit, a slow-walked pass:
each marks the server, which multiplies its routing cost; every mark expires after MARK_MEMORY_S.

Sybil limits: one machine can run many peer ids, so records are grouped by network (IPv4 /24,
IPv6 /48) -- the network of the address the client is actually connected to (the router's observed
group), not the addresses a record lists -- and at most `max_records_per_group` records of one group
are considered for each layer; a peer that re-announces faster than `min_reannounce_s` keeps its
older record. Records beyond the limits are ignored (logged at debug). The table of peers is bounded
(MAX_PEERS, pruned in batches: least recently seen peers without a live mark go first), and nothing
here scans records x peers."""

from __future__ import annotations

import ipaddress
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from ..net.records import SpanRecord

log = logging.getLogger(__name__)

MARK_MEMORY_S = 600.0  # a mark (failure, false claim, slow-walked pass) lowers a server's standing this long
MAX_MARKS = 16  # marks kept per peer (the penalty saturates long before)
MAX_PEERS = 4096  # peers whose standing is kept; beyond, the least recently seen unmarked ones are dropped
EWMA = 0.3  # weight of a new measurement of a hop's compute
CLAIM_CAP = 2.0  # an unmeasured server's claim counts at most this x faster than the median measured server
MIN_OVERCLAIM_S = 0.005  # measured hop times below this are too noisy to call a claim false
# a hop over fewer layers (of a longer span) is judged by its speed but not against its claim: its
# time is mostly what every hop costs (framing, queueing, a loaded machine), which a claim does not
# cover -- an honest server routed for 1 layer of its 15 measured 10x its claim on a loaded machine
MIN_JUDGED_LAYERS = 4
OVERCLAIM_PENALTY = 4.0


@dataclass(frozen=True)
class TrustSettings:
    """audit_rate: fraction of rounds after which the client audits (0: never, not even at the end).
    require_audit: with audits on, a generation whose outputs some layers' servers could not have
    audited by an independent server refuses instead of returning them.
    max_records_per_group: records of one network group considered per layer (local swarms, where
    every server is on loopback, need as many as they have servers per layer)."""

    audit_rate: float = 0.1
    require_audit: bool = False  # refuse (AuditsRequired) rather than release outputs no one could audit
    max_records_per_group: int = 3
    min_reannounce_s: float = 1.0
    overclaim_factor: float = 10.0  # a claim this many times faster than measured is a false claim

    def __post_init__(self) -> None:
        if not 0 <= self.audit_rate <= 1:
            raise ValueError(f"audit_rate must be in [0, 1], got {self.audit_rate!r}")
        if self.max_records_per_group < 1:
            raise ValueError(f"max_records_per_group must be >= 1, got {self.max_records_per_group!r}")


def ip_group(addr: str) -> str | None:
    """The network group of a multiaddr (/ip4/a.b.c.d/... -> a.b.c.0/24; /ip6 -> /48, loopback
    included: servers on 127.0.0.1 are one group, on 127.0.1.1 another); None for addresses without
    an IP (the peer is then a group of its own)."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    try:
        ip = ipaddress.ip_address(parts[2])
    except ValueError:
        return None
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def observed_group(ip: str, relayed: bool) -> str:
    """The group of a peer the client is connected to at `ip` (a relayed connection: the relay's IP,
    so peers behind one relay count as one group)."""
    group = ip_group(f"/ip{6 if ':' in ip else 4}/{ip}") or ip
    return f"relayed:{group}" if relayed else group


def record_group(rec: SpanRecord) -> str:
    """The group a record claims: that of its first IP address (the one dialled first). Only a hint:
    the router counts a peer against the group it observed (observed_group)."""
    for addr in rec.addrs:
        group = ip_group(addr)
        if group is not None:
            return group
    return f"peer:{rec.peer_id}"


@dataclass
class _Peer:
    order: int  # when the client first saw this peer (older first when records compete for a cap)
    seen: float = 0.0  # monotonic time of the latest mention (pruning drops the stalest)
    s_per_layer: float | None = None  # measured in this client's own sessions: seconds per layer of one pass
    marks: list[float] = field(default_factory=list)  # monotonic times of failures and slow passes
    overclaimed_at: float | None = None
    record: SpanRecord | None = None  # the last record admitted (for the re-announce limit)

    def live_marks(self, now: float) -> int:
        self.marks = [t for t in self.marks if now - t < MARK_MEMORY_S]
        return len(self.marks)

    def overclaimed(self, now: float) -> bool:
        return self.overclaimed_at is not None and now - self.overclaimed_at < MARK_MEMORY_S


class Standing:
    """One per client process (shared by its chains), so what one generation learnt routes the next."""

    def __init__(self, settings: TrustSettings = TrustSettings()):
        self.settings = settings
        self.peers: dict[str, _Peer] = {}
        self._seen = 0

    def _peer(self, peer_id: str) -> _Peer:
        p = self.peers.get(peer_id)
        if p is None:
            if len(self.peers) >= MAX_PEERS:
                self._prune()
            self._seen += 1
            p = self.peers[peer_id] = _Peer(self._seen)
        p.seen = time.monotonic()
        return p

    def _prune(self) -> None:
        """Drop the least recently seen half of the peers without a live mark (one O(n log n) pass per
        MAX_PEERS / 2 new peers); marked peers stay until their marks expire."""
        now = time.monotonic()
        marked = {k for k, p in self.peers.items() if p.live_marks(now) or p.overclaimed(now)}
        clean = sorted((k for k in self.peers if k not in marked), key=lambda k: self.peers[k].seen)
        drop = clean[:max(len(clean) // 2, len(self.peers) - MAX_PEERS + 1)]
        if len(self.peers) - len(drop) >= MAX_PEERS:  # all marked: the stalest marked go too
            drop += sorted(marked, key=lambda k: self.peers[k].seen)[:len(self.peers) - len(drop) - MAX_PEERS // 2]
        for k in drop:
            del self.peers[k]

    # ---- what the client saw ------------------------------------------------------------
    def failed(self, peer_id: str, why: str) -> None:
        """A refused or failed session, a hung or slow-walking hop, a wrong result: a mark that lowers
        the standing for MARK_MEMORY_S."""
        p = self._peer(peer_id)
        p.marks = p.marks[-(MAX_MARKS - 1):] + [time.monotonic()]
        log.debug("standing of %s lowered: %s", peer_id, why)

    def measured(self, rec: SpanRecord, layers: int, compute_s: float) -> None:
        """A hop's measured time for `layers` of its span in one pass of this client's session; checked
        against its claim."""
        p = self._peer(rec.peer_id)
        per_layer = compute_s / layers
        p.s_per_layer = per_layer if p.s_per_layer is None else (1 - EWMA) * p.s_per_layer + EWMA * per_layer
        claimed = _claimed_s_per_layer(rec)
        judged = layers >= min(MIN_JUDGED_LAYERS, rec.end - rec.start)
        if judged and p.s_per_layer * layers > MIN_OVERCLAIM_S and p.s_per_layer > self.settings.overclaim_factor * claimed:
            if not p.overclaimed(time.monotonic()):
                log.info("%s claims %.0f tokens/s over layers %d:%d but measured %.1f ms per layer: a false claim",
                         rec.peer_id, rec.throughput, rec.start, rec.end, p.s_per_layer * 1e3)
            p.overclaimed_at = time.monotonic()

    # ---- what routing and audits use ----------------------------------------------------
    def measured_s_per_layer(self, peer_id: str) -> float | None:
        p = self.peers.get(peer_id)
        return None if p is None else p.s_per_layer

    def has_history(self, peer_id: str) -> bool:
        """This client measured the peer serving its own sessions (an auditor without such a history
        cannot convict anyone: a fresh Sybil id has none)."""
        p = self.peers.get(peer_id)
        return p is not None and p.s_per_layer is not None

    def penalty(self, peer_id: str) -> float:
        """Multiplies the routing cost of a server: 1 for a clean standing."""
        p = self.peers.get(peer_id)
        if p is None:
            return 1.0
        now = time.monotonic()
        return (1.0 + p.live_marks(now)) * (OVERCLAIM_PENALTY if p.overclaimed(now) else 1.0)

    def s_per_layer(self, rec: SpanRecord, records: list[SpanRecord]) -> float:
        """The routing estimate of a server's seconds per layer: measured, else its claim capped at
        CLAIM_CAP x faster than the median measured server of `records` (no server measured yet: than
        the slowest claim), so neither an outrageous claim nor many of them can win a route."""
        p = self.peers.get(rec.peer_id)
        if p is not None and p.s_per_layer is not None:
            return p.s_per_layer
        measured = [q.s_per_layer for q in (self.peers.get(r.peer_id) for r in records)
                    if q is not None and q.s_per_layer is not None]
        ref = statistics.median(measured) if measured else max((_claimed_s_per_layer(r) for r in records), default=0.0)
        return max(_claimed_s_per_layer(rec), ref / CLAIM_CAP)

    def rate_limited(self, records: list[SpanRecord]) -> list[SpanRecord]:
        """The records as admitted under the re-announce limit (a too fast re-announce keeps the older)."""
        return [self._rate_limited(r) for r in records]

    def admit(self, records: list[SpanRecord], group_of: Callable[[SpanRecord], str] = record_group) -> list[SpanRecord]:
        """The records routing may consider: at most max_records_per_group per layer from one network
        group (group_of: the router passes the observed group), the best-standing, then longest-known,
        records first."""
        order = sorted(records, key=lambda r: (self.penalty(r.peer_id), self._peer(r.peer_id).order, r.peer_id))
        used: dict[tuple[str, int], int] = {}
        out = []
        cap = self.settings.max_records_per_group
        for rec in order:
            group = group_of(rec)
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
