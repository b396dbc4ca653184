"""WAN profiles: which city each node of a local swarm sits in, and what its links are like.

A profile places the nodes of an emulated swarm in cities (the client in the first, the servers in
the next ones, cycling) and gives every ordered pair of nodes a one-way delay of half the pair's
measured round-trip time, from a small matrix of real city-to-city pings (wan_rtt.toml, source
named there). On top: jitter per frame and a per-node uplink cap (latency.py). `node_links` turns a
profile into each node's LinkLatency, keyed by the peer ids the nodes will have (their identity
keys are made before they start), which LocalSwarm writes as each node's --link-config.

Built-in profiles (`PROFILES`); a custom one is a TOML file with a [wan] table of the same fields
(and optionally its own [wan.rtt_ms.CITY] rows, which add to or replace the shipped matrix):

    [wan]
    sites = ["paris", "milan", "moscow"]     # or: uniform_rtt_ms = 5.0
    uplink_mbit = 20.0
    [wan.jitter]
    kind = "exponential"
    scale_ms = 3.0
"""

from __future__ import annotations

import statistics
import tomllib
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path

from ..errors import BadValue
from .latency import JitterSettings, LinkLatency


@cache
def rtt_matrix() -> tuple[str, dict[frozenset[str], float]]:
    """(source, RTT in ms per unordered city pair): pairs measured both ways are averaged."""
    data = tomllib.loads(resources.files("dsdnode.net").joinpath("wan_rtt.toml").read_text())
    return data["source"], _symmetric(data["rtt_ms"])


def _symmetric(rows: dict[str, dict[str, float]]) -> dict[frozenset[str], float]:
    both: dict[frozenset[str], list[float]] = {}
    for a, row in rows.items():
        for b, ms in row.items():
            if a == b or not isinstance(ms, (int, float)) or ms < 0:
                raise BadValue(f"bad RTT {a} -> {b}: {ms!r}")
            both.setdefault(frozenset((a, b)), []).append(float(ms))
    return {pair: statistics.fmean(values) for pair, values in both.items()}


@dataclass(frozen=True)
class WanProfile:
    """sites: cities of the matrix, in the order nodes take them (the client first); or, without
    sites, uniform_rtt_ms between every pair. uplink_mbit: every node's uplink (0: unlimited)."""

    name: str
    sites: tuple[str, ...] = ()
    uniform_rtt_ms: float | None = None
    jitter: JitterSettings = field(default_factory=JitterSettings)
    uplink_mbit: float = 0.0
    extra_rtt_ms: dict[frozenset[str], float] = field(default_factory=dict)  # a custom file's own rows
    note: str = ""

    def __post_init__(self) -> None:
        if bool(self.sites) == (self.uniform_rtt_ms is not None):
            raise BadValue(f"profile {self.name!r}: give either sites or uniform_rtt_ms")
        for a in self.sites:
            for b in self.sites:
                if a != b:
                    self.rtt_ms(a, b)  # every pair must be known
        LinkLatency(jitter=self.jitter, uplink_mbit=self.uplink_mbit)  # validates both

    def rtt_ms(self, a: str, b: str) -> float:
        if self.uniform_rtt_ms is not None:
            return self.uniform_rtt_ms
        if a == b:
            return 0.0
        pair = frozenset((a, b))
        rtt = self.extra_rtt_ms.get(pair, rtt_matrix()[1].get(pair))
        if rtt is None:
            raise BadValue(f"profile {self.name!r}: no RTT between {a!r} and {b!r}")
        return rtt

    def site(self, index: int) -> str:
        """The city of node `index` (0: the client; 1..: servers, cycling through the sites)."""
        return self.sites[index % len(self.sites)] if self.sites else "anywhere"

    @property
    def mean_one_way_ms(self) -> float:
        """Mean one-way delay over the pairs of distinct sites (the uniform delay without sites)."""
        if not self.sites:
            return self.uniform_rtt_ms / 2
        pairs = [self.rtt_ms(a, b) for i, a in enumerate(self.sites) for b in self.sites[i + 1:] if a != b]
        return statistics.fmean(pairs) / 2 if pairs else 0.0

    def node_links(self, peer_ids: list[str], seed: int | None = None) -> list[LinkLatency]:
        """Each node's links: node i sits at site(i) and reaches node j after rtt(i, j) / 2 (peers
        not in the list, e.g. a relay: the profile's mean one-way delay)."""
        links = []
        for i, me in enumerate(peer_ids):
            per_peer = {peer: self.rtt_ms(self.site(i), self.site(j)) / 2
                        for j, peer in enumerate(peer_ids) if peer != me}
            links.append(LinkLatency(self.mean_one_way_ms, per_peer, self.jitter, self.uplink_mbit,
                                     seed=None if seed is None else seed + i))
        return links

    def describe(self) -> str:
        where = (" -> ".join(self.sites) if self.sites else f"{self.uniform_rtt_ms:g} ms RTT everywhere")
        jitter = "no jitter" if self.jitter.kind == "none" else \
            f"{self.jitter.kind} jitter (mean {self.jitter.mean_ms:.1f} ms)"
        uplink = f"{self.uplink_mbit:g} Mbit/s uplinks" if self.uplink_mbit else "unlimited uplinks"
        return f"{self.name}: {where}; {jitter}; {uplink}"


# The matrix's cities give continental and intercontinental RTTs; lan and metro are not in it (a
# uniform RTT of a LAN and of one metro area, assumptions stated as such).
PROFILES: dict[str, WanProfile] = {p.name: p for p in (
    WanProfile("lan", uniform_rtt_ms=0.5, uplink_mbit=1000.0, note="assumed: one LAN"),
    WanProfile("metro", uniform_rtt_ms=4.0, jitter=JitterSettings("exponential", 0.5), uplink_mbit=100.0,
               note="assumed: one metro area"),
    WanProfile("continental", sites=("paris", "milan", "zurich", "moscow"),
               jitter=JitterSettings("exponential", 2.0), uplink_mbit=100.0),
    WanProfile("intercontinental", sites=("new_york", "paris", "fremont", "sydney", "moscow"),
               jitter=JitterSettings("pareto", 10.0, 3.0), uplink_mbit=100.0),
    WanProfile("home-uplink", sites=("paris", "milan", "zurich", "moscow"),
               jitter=JitterSettings("exponential", 3.0), uplink_mbit=20.0,
               note="continental cities, 20 Mbit/s home uplinks"),
)}


def load_profile(name_or_path: str) -> WanProfile:
    """A built-in profile by name, or a custom TOML file; one ValueError saying what is wrong."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if not path.suffix == ".toml":
        raise BadValue(f"unknown WAN profile {name_or_path!r}: one of {', '.join(PROFILES)}, or a .toml file")
    try:
        table = tomllib.loads(path.read_text()).get("wan")
        if not isinstance(table, dict):
            raise BadValue("no [wan] table")
        known = {"name", "sites", "uniform_rtt_ms", "jitter", "uplink_mbit", "rtt_ms", "base"}
        if set(table) - known:
            raise BadValue(f"unknown keys {sorted(set(table) - known)} (known: {', '.join(sorted(known))})")
        base = PROFILES[table["base"]] if "base" in table else None
        fields = {k: v for k, v in table.items() if k in {"sites", "uniform_rtt_ms", "uplink_mbit"}}
        if "sites" in fields:
            fields["sites"] = tuple(fields["sites"])
            fields.setdefault("uniform_rtt_ms", None)
        if "jitter" in table:
            fields["jitter"] = JitterSettings(**table["jitter"])
        if "rtt_ms" in table:
            fields["extra_rtt_ms"] = _symmetric(table["rtt_ms"])
        name = table.get("name", path.stem)
        return replace(base, name=name, note=f"from {path}", **fields) if base else \
            WanProfile(name, note=f"from {path}", **fields)
    except (OSError, tomllib.TOMLDecodeError, TypeError, KeyError, ValueError) as e:
        raise BadValue(f"WAN profile {path}: {e}") from None
