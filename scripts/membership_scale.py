"""Membership at scale, with real processes in network namespaces: churn, departures and a flood.

Builds a core router namespace and one namespace per site, each site on its own /24
(documentation and private ranges only: 198.51.100/24, 203.0.113/24, 192.0.2/24, 10.1-3.0/24;
the flooder on 10.66.0/24), all routed through the core. Every peer is a lean P2PNode
(scripts/membership_peer.py, no torch), several per process. Then:

1. 3 bootstrap peers and `--peers` DHT peers in all, `--servers` announcing honest servers and a
   client-mode reader;
2. churn: kill -9 half of the DHT peers' processes, start as many new ones;
3. departures: each round starts 4 new servers in one process, measures the time from their first
   announce until the reader lists each of them, then kills the process (-9): after `--rounds`
   rounds, 4 x rounds servers have come and gone;
4. a flood: 50 throw-away ids from one /24 announce records for the same model; the reader must
   still list every honest server;
5. lookup latency: `--lookups` discover() calls by the reader.

Prints one JSON line of results (and writes it to --out). Needs root, `ip`. Removes every
namespace and process it made, whatever happens.

    sudo python scripts/membership_scale.py --peers 24 --rounds 6 --lookups 30     # CI size, ~3 min
    sudo python scripts/membership_scale.py --peers 64 --rounds 30 --lookups 100   # the targets
    sudo python scripts/membership_scale.py --peers 64 --soak-hours 4 --out bench-results/membership-soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SITES = ["198.51.100", "203.0.113", "192.0.2", "10.1.0", "10.2.0", "10.3.0"]
FLOOD_SITE = "10.66.0"
MODEL = "scale/model"
RECORD_TTL_S = 120.0
PEER_SCRIPT = str(Path(__file__).with_name("membership_peer.py"))
READY_TIMEOUT_S = 900.0  # a shared, oversubscribed 2-core machine took minutes to start 20 processes
LIST_TIMEOUT_S = 30.0


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


class Topology:
    """A core router namespace and one namespace per /24 site; close() removes them all."""

    def __init__(self) -> None:
        self.prefix = f"dsdms{os.getpid() % 100000}"
        self.logs = Path(tempfile.mkdtemp(prefix="membership-scale-"))  # one log per peer process
        self.namespaces: list[str] = []
        self.core = self._ns("core")
        sh("ip", "netns", "exec", self.core, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.sites: dict[str, str] = {}
        for i, net in enumerate([*SITES, FLOOD_SITE]):
            ns = self._ns(f"s{i}")
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"s{i}", "netns", self.core)
            sh("ip", "-n", self.core, "addr", "add", f"{net}.1/24", "dev", f"s{i}")
            sh("ip", "-n", self.core, "link", "set", f"s{i}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{net}.2/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"{net}.1")
            self.sites[net] = ns

    def _ns(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces.clear()


class Peers:
    """One membership_peer.py process (one or more nodes) inside a site's namespace."""

    live: list[Peers] = []
    count = 0

    def __init__(self, topo: Topology, site: str, *, nodes: int = 1, bootstrap: list[str] = (),
                 client: bool = False) -> None:
        config = {"host": f"{site}.2", "nodes": nodes, "bootstrap": list(bootstrap), "client": client}
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        Peers.count += 1
        self.log = topo.logs / f"peer{Peers.count}-{site}.log"
        with open(self.log, "w") as log_file:
            self.proc = subprocess.Popen(["ip", "netns", "exec", topo.sites[site], sys.executable, PEER_SCRIPT,
                                          json.dumps(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log_file, text=True, bufsize=1, env=env)
        Peers.live.append(self)
        self.site = site
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.nodes: list[dict] = []

    def wait_ready(self) -> Peers:
        line = self._next(READY_TIMEOUT_S)
        if line is None and self.proc.poll() is None:
            raise RuntimeError(f"peer process in {self.site} not ready within {READY_TIMEOUT_S:g} s")
        if not line or not line.startswith("READY "):
            tail = self.log.read_text()[-1500:]
            raise RuntimeError(f"peer process in {self.site} did not start: {line!r}; its log ends:\n{tail}")
        self.nodes = json.loads(line[6:])["nodes"]
        return self

    @property
    def ids(self) -> list[str]:
        return [n["peer_id"] for n in self.nodes]

    @property
    def addrs(self) -> list[str]:
        return [n["addrs"][0] for n in self.nodes]

    def request(self, op: str, timeout: float = 60.0, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self._next(timeout)
        if line is None:
            raise RuntimeError(f"{op}: no answer from the peer process")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{op} failed: {reply.get('error')}")
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self in Peers.live:
            Peers.live.remove(self)

    def _next(self, timeout: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("READY ") or line.startswith("{"):
                self._lines.put(line)
        self._lines.put(None)


def start_all(groups: list[Peers]) -> list[Peers]:
    return [g.wait_ready() for g in groups]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def time_until_listed(reader: Peers, wanted: set[str], since: float) -> dict[str, float]:
    """Seconds from `since` until the reader lists each of `wanted` (absent: not within LIST_TIMEOUT_S)."""
    found: dict[str, float] = {}
    while time.monotonic() - since < LIST_TIMEOUT_S and len(found) < len(wanted):
        listed = set(reader.request("discover", model=MODEL)["peers"])
        now = time.monotonic() - since
        for peer in wanted & listed:
            found.setdefault(peer, now)
        time.sleep(0.2)
    return found


def run(args: argparse.Namespace) -> dict:
    random.seed(args.seed)
    started = time.monotonic()
    topo = Topology()
    try:
        boot = start_all([Peers(topo, SITES[i]) for i in range(3)])
        bootstrap = [b.addrs[0] for b in boot]
        per = args.per_process
        dht_procs = start_all([Peers(topo, SITES[i % len(SITES)], nodes=per, bootstrap=bootstrap)
                               for i in range(max(1, (args.peers - 3 - args.servers) // per))])
        servers = start_all([Peers(topo, SITES[i % len(SITES)], nodes=min(per, args.servers - i), bootstrap=bootstrap)
                             for i in range(0, args.servers, per)])
        reader = Peers(topo, SITES[3], bootstrap=bootstrap, client=True).wait_ready()
        for s in servers:
            s.request("announce", model=MODEL, start=0, end=4, ttl=RECORD_TTL_S)
        honest = {pid for s in servers for pid in s.ids}
        peers_total = 3 + sum(len(p.nodes) for p in dht_procs) + len(honest)
        first = time_until_listed(reader, honest, time.monotonic())
        log(f"{peers_total} peers up; reader lists {len(first)}/{len(honest)} servers")

        # churn: half of the DHT peers die (-9), as many new ones join
        dying = random.sample(dht_procs, len(dht_procs) // 2)
        for p in dying:
            p.kill()
        dht_procs = [p for p in dht_procs if p not in dying]
        dht_procs += start_all([Peers(topo, SITES[i % len(SITES)], nodes=per, bootstrap=bootstrap)
                                for i in range(len(dying))])
        log(f"churn: killed {len(dying) * per} DHT peers, started {len(dying) * per}")

        # departures: 4 new servers a round, listed or not, then killed -9
        rounds = []
        departed = 0
        soak_until = time.monotonic() + args.soak_hours * 3600
        r = -1
        while (r := r + 1) < args.rounds or time.monotonic() < soak_until:
            group = Peers(topo, SITES[r % len(SITES)], nodes=4, bootstrap=bootstrap).wait_ready()
            group.request("announce", model=MODEL, start=0, end=4, ttl=RECORD_TTL_S)
            listed = time_until_listed(reader, set(group.ids), time.monotonic())
            rounds.append({"departed_before": departed, "listed_s": [listed.get(p) for p in group.ids]})
            group.kill()
            departed += 4
            log(f"round {r}: listed {sorted(round(v, 2) for v in listed.values())} after {departed - 4} departures")

        # flood: 50 throw-away ids from one /24
        flood = Peers(topo, FLOOD_SITE, nodes=args.flood, bootstrap=bootstrap).wait_ready()
        flood.request("announce", model=MODEL, start=0, end=4, ttl=RECORD_TTL_S, timeout=180)
        after_flood = [set(reader.request("discover", model=MODEL)["peers"]) for _ in range(5)]
        hidden = [len(honest - seen) for seen in after_flood]
        flood_listed = [len(set(flood.ids) & seen) for seen in after_flood]

        lookups = [reader.request("discover", model=MODEL)["seconds"] for _ in range(args.lookups)]
        trials = [t for rnd in rounds if rnd["departed_before"] >= args.trial_after for t in rnd["listed_s"]]
        result = {
            "peers": peers_total, "sites": len(SITES), "servers": len(honest), "churn_killed": len(dying) * per,
            "departures": departed,
            "initial_listed": f"{len(first)}/{len(honest)}",
            "trials_after": args.trial_after, "trials": len(trials),
            "trials_listed_within_10s": sum(1 for t in trials if t is not None and t <= 10.0),
            "trial_listed_s_max": max((t for t in trials if t is not None), default=None),
            "all_rounds_listed_s": [rnd["listed_s"] for rnd in rounds],
            "flood_ids": len(flood.ids), "honest_hidden_per_lookup": hidden, "flood_ids_listed": flood_listed,
            "lookups": len(lookups), "lookup_p50_s": round(statistics.median(lookups), 3),
            "lookup_p95_s": round(pct(lookups, 0.95), 3), "lookup_max_s": round(max(lookups), 3),
            "wall_s": round(time.monotonic() - started, 1),
        }
        return result
    finally:
        for p in list(Peers.live):
            p.kill()
        topo.close()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=64, help="peers in all (bootstrap, DHT, servers)")
    ap.add_argument("--servers", type=int, default=8, help="honest servers announcing the model throughout "
                    "(--per-process to a process, each process on another /24)")
    ap.add_argument("--per-process", type=int, default=4, help="DHT peers per OS process")
    ap.add_argument("--rounds", type=int, default=30, help="departure rounds (4 servers each)")
    ap.add_argument("--trial-after", type=int, default=100, help="count trials once this many servers departed")
    ap.add_argument("--flood", type=int, default=50, help="throw-away ids in the flood")
    ap.add_argument("--lookups", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--soak-hours", type=float, default=0.0, help="keep the departure rounds going this long")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("membership_scale: network namespaces need root")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("membership_scale: terminated"))  # cleanup still runs
    result = run(args)
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
