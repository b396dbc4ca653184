"""Membership at scale, with real processes in network namespaces: churn, departures and a flood.

Every site is a namespace on its own /24 (documentation and private ranges only: 198.51.100/24,
203.0.113/24, 192.0.2/24, 10.1-3.0/24; the flooder on 10.66.0/24), all on one bridge
(tests/helpers/netns.py). Every peer is a lean P2PNode (scripts/membership_peer.py, no torch),
several per process, so peers of one process share an address as peers behind one NAT would.
Then:

1. 3 bootstrap peers and `--peers` DHT peers in all, `--servers` announcing honest servers and a
   client-mode reader;
2. churn: kill -9 half of the DHT peers' processes, start as many new ones;
3. departures: `--departures` servers announce and are killed (-9, no withdrawal) in batches of
   `--batch`: their records stay in the directory until they expire, their peers in routing tables
   until evicted;
4. trials: rounds of `--round-size` new servers announce; the reader discovers until it lists each
   (at most LIST_TIMEOUT_S), then the round is killed too: one trial per server, `--trials` in all;
5. lookup latency: `--lookups` discover() calls by the reader;
6. a flood: `--flood` throw-away ids from one /24 (client-mode nodes: they only send records)
   announce records for the same model; the reader must still list every honest server.

With `--generate N`, two real `dsdnode start` servers of a real model (half its layers each) are in
the swarm from step 1 on; N `dsdnode generate` runs follow step 5, and N more run during the flood,
whose ids then also claim the whole real model with records copied from an honest server's.

Prints one JSON line of results (and writes it to --out). Needs root and `ip`; run from the
repository root with PYTHONPATH=. (`make bench-membership`). Removes every namespace and process it
made, whatever happens.

    PYTHONPATH=. python scripts/membership_scale.py --peers 24 --departures 16 --trials 8 --lookups 30
    PYTHONPATH=. python scripts/membership_scale.py --peers 64 --departures 100 --trials 20 --lookups 100
    PYTHONPATH=. python scripts/membership_scale.py --peers 64 --soak-hours 4 --out bench-results/membership/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers.jsonl_rpc import RequestChannel, print_result
from tests.helpers.netns import Host, Internet

SITES = ["198.51.100", "203.0.113", "192.0.2", "10.1.0", "10.2.0", "10.3.0"]
FLOOD_SITE = "10.66.0"
MODEL = "scale/model"
RECORD_TTL_S = 120.0
PEER_SCRIPT = str(Path(__file__).with_name("membership_peer.py"))
READY_TIMEOUT_S = 900.0  # a shared, oversubscribed 2-core machine took minutes to start 20 processes
LIST_TIMEOUT_S = 30.0
ANNOUNCE_TIMEOUT_S = 300.0
# with --budget-s, the parts end by these shares of it (what is left is the flood and the teardown)
DEPARTURES_SHARE, TRIALS_SHARE, LOOKUPS_SHARE = 0.4, 0.65, 0.75
JOINING_AT_ONCE = 3  # peer processes started together
DISCOVER_TIMEOUT_S = 180.0


class Peers:
    """One membership_peer.py process (one or more nodes) inside a site's namespace."""

    live: list[Peers] = []
    count = 0
    verdicts: dict[str, int] = {}  # reachability verdict -> listening nodes that reached it, over the run
    debug = False  # peers log what they publish where and which peers the reader asks

    def __init__(self, site: Host, logs: Path, *, nodes: int = 1, bootstrap: list[str] = (),
                 client: bool = False) -> None:
        config = {"host": site.ip, "nodes": nodes, "bootstrap": list(bootstrap), "client": client, "debug": Peers.debug}
        Peers.count += 1
        self.site = site
        self.log = logs / f"peer{Peers.count}-{site.ip}.log"
        with open(self.log, "w") as log_file:
            self.proc = subprocess.Popen(["ip", "netns", "exec", site.ns, sys.executable, PEER_SCRIPT, json.dumps(config)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                         bufsize=1, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        site.processes.append(self.proc)
        Peers.live.append(self)
        self.channel = RequestChannel(self.proc, f"peer process {self.log.name}")
        self.nodes: list[dict] = []

    def wait_ready(self) -> Peers:
        """Wait for the process's READY line (once: later calls return at once, as it prints one)."""
        if self.nodes:
            return self
        ready = self.channel.ready(READY_TIMEOUT_S)
        if ready is None:
            raise RuntimeError(f"peer process {self.log.name} did not start; its log ends:\n{self.log.read_text()[-1500:]}")
        self.nodes = ready["nodes"]
        for n in self.nodes:
            Peers.verdicts[n["reachability"]] = Peers.verdicts.get(n["reachability"], 0) + 1
        return self

    @property
    def ids(self) -> list[str]:
        return [n["peer_id"] for n in self.nodes]

    @property
    def addrs(self) -> list[str]:
        return [n["addrs"][0] for n in self.nodes]

    def request(self, op: str, timeout: float = 60.0, **args) -> dict:
        return self.channel.request(op, timeout, **args)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self in Peers.live:
            Peers.live.remove(self)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def discover(reader: Peers) -> tuple[set[str], float | None]:
    """The servers the reader lists now and how long discover() took (None: no answer in time)."""
    try:
        reply = reader.request("discover", timeout=DISCOVER_TIMEOUT_S, model=MODEL)
    except TimeoutError:
        log(f"  discover: no answer within {DISCOVER_TIMEOUT_S:g} s")
        return set(), None
    return set(reply["peers"]), reply["seconds"]


class Announce:
    """The announce request of one peer process, sent from a thread: a client does not wait for a
    server's announce to end, so the reader asks while it runs."""

    def __init__(self, peers: Peers) -> None:
        self.started = time.monotonic()
        self.ended: float | None = None  # when it was answered (or failed)
        self._future = ThreadPoolExecutor(1).submit(self._send, peers)

    def _send(self, peers: Peers) -> None:
        try:
            peers.request("announce", model=MODEL, start=0, end=4, ttl=RECORD_TTL_S, timeout=ANNOUNCE_TIMEOUT_S)
        finally:
            self.ended = time.monotonic()

    def seconds(self) -> float:
        """How long the announce took (raises what it raised)."""
        self._future.result()
        return self.ended - self.started  # type: ignore[operator]


def time_until_listed(reader: Peers, wanted: set[str], announcing: Announce | None = None) -> dict[str, float]:
    """Seconds from `announcing` started (default: from now) until a discover() that lists each of
    `wanted` returned (absent: not listed in time). The reader asks again and again while the
    announce runs and for LIST_TIMEOUT_S after it ended, so a slow announce shows as a long time,
    not as never listed."""
    polling = time.monotonic()
    since = polling if announcing is None else announcing.started
    found: dict[str, float] = {}

    def asking() -> bool:
        ended = polling if announcing is None else announcing.ended
        return ended is None or time.monotonic() < ended + LIST_TIMEOUT_S

    while asking() and len(found) < len(wanted):
        listed, seconds = discover(reader)
        now = time.monotonic() - since
        for peer in wanted & listed:
            found.setdefault(peer, now)
        log(f"  discover {seconds if seconds is None else round(seconds, 2)} s: {len(found)}/{len(wanted)} listed")
        time.sleep(0.2)
    return found


def run(args: argparse.Namespace) -> dict:
    random.seed(args.seed)
    started = time.monotonic()

    def over(share: float) -> bool:
        """With --budget-s, whether this part of the run must end (its share of the budget is spent), so
        that a bounded run still measures the trials, the lookups and the flood, on fewer samples."""
        late = args.budget_s is not None and time.monotonic() - started > share * args.budget_s
        if late:
            log(f"budget: {share:.0%} of {args.budget_s:g} s spent, going on to the next part")
        return late

    logs = Path(tempfile.mkdtemp(prefix="membership-scale-"))  # one log per peer process
    log(f"peer logs in {logs}")
    net = Internet()
    try:
        sites = [net.public(f"s{i}", net=prefix) for i, prefix in enumerate(SITES)]
        flood_site = net.public("flood", net=FLOOD_SITE)

        def group(i: int, nodes: int, client: bool = False) -> Peers:
            return Peers(sites[i % len(sites)], logs, nodes=nodes, bootstrap=bootstrap, client=client)

        bootstrap: list[str] = []
        boot = [group(i, 1).wait_ready() for i in range(3)]
        bootstrap = [b.addrs[0] for b in boot]
        per = args.per_process
        # peers join a few processes at a time: 60 peers dialing 3 bootstrap peers in the same second
        # on a loaded 2-core machine timed every join out (a public swarm does not start at once)
        dht_procs: list[Peers] = []
        for i in range(max(1, (args.peers - 3 - args.servers) // per)):
            dht_procs.append(group(i, per))
            if len(dht_procs) % JOINING_AT_ONCE == 0:
                for p in dht_procs[-JOINING_AT_ONCE:]:
                    p.wait_ready()
        servers = [group(i, min(per, args.servers - i)) for i in range(0, args.servers, per)]
        reader = group(3, 1, client=True)
        for p in [*dht_procs, *servers, reader]:
            p.wait_ready()
        for s in servers:
            s.request("announce", model=MODEL, start=0, end=4, ttl=RECORD_TTL_S)
        honest = {pid for s in servers for pid in s.ids}
        peers_total = 3 + sum(len(p.nodes) for p in dht_procs) + len(honest)
        first = time_until_listed(reader, honest)
        log(f"{peers_total} peers up; reader lists {len(first)}/{len(honest)} servers")
        idle = idle_cpu(args.idle_s, [p.proc.pid for p in Peers.live], peers_total) if args.idle_s else None
        model_servers = ModelServers(args.generate_model, sites, bootstrap, logs) if args.generate else None

        # churn: half of the DHT peers die (-9), as many new ones join
        dying = random.sample(dht_procs, len(dht_procs) // 2)
        for p in dying:
            p.kill()
        dht_procs = [p for p in dht_procs if p not in dying]
        dht_procs += [group(i, per).wait_ready() for i in range(len(dying))]
        log(f"churn: killed {len(dying) * per} DHT peers, started {len(dying) * per}")

        # departures: servers that announce, then die (-9) without withdrawing
        departed = 0
        while departed < args.departures and not over(DEPARTURES_SHARE):
            batch = group(departed // args.batch, min(args.batch, args.departures - departed)).wait_ready()
            batch.request("announce", model=MODEL, start=0, end=4, ttl=RECORD_TTL_S, timeout=ANNOUNCE_TIMEOUT_S)
            batch.kill()
            departed += len(batch.nodes)
            log(f"departures: {departed}")

        # trials: new servers, listed or not, then killed -9 as well
        departed_before_trials = departed
        rounds = []
        soak_until = time.monotonic() + args.soak_hours * 3600
        r = -1
        while ((r := r + 1) * args.round_size < args.trials or time.monotonic() < soak_until) and not over(TRIALS_SHARE):
            trial = group(r, args.round_size).wait_ready()
            announcing = Announce(trial)  # listing is timed from the announce request, not its answer
            listed = time_until_listed(reader, set(trial.ids), announcing)
            announce_s = announcing.seconds()
            rounds.append({"departed_before": departed, "announce_s": round(announce_s, 2), "load_average": load_average(),
                           "reachability": [n["reachability"] for n in trial.nodes],
                           "routing_table_at_ready": [n["routing_table_peers"] for n in trial.nodes],
                           "listed_s": [listed.get(p) for p in trial.ids]})
            if len(listed) < len(trial.ids):
                log(f"  not listed: {[p for p in trial.ids if p not in listed]} ({trial.log.name})")
            trial.kill()
            departed += len(trial.nodes)
            log(f"trial round {r}: listed {sorted(round(v, 2) for v in listed.values())} of {len(trial.ids)} "
                f"after {departed - len(trial.nodes)} departures (announce took {announce_s:.2f} s; "
                f"reachability {rounds[-1]['reachability']}, routing tables at ready {rounds[-1]['routing_table_at_ready']})")

        lookups = []
        while len(lookups) < args.lookups and not over(LOOKUPS_SHARE):
            lookups.append(discover(reader))
        lookup_s = [s for _, s in lookups if s is not None]
        lookup_hidden = [len(honest - seen) for seen, _ in lookups]
        generated = model_servers.generate(args.generate, sites[4]) if model_servers else []

        # flood: throw-away ids from one /24
        flood = Peers(flood_site, logs, nodes=args.flood, bootstrap=bootstrap, client=True).wait_ready()
        flood.request("announce", model=MODEL, start=0, end=4, ttl=RECORD_TTL_S, timeout=600)
        if model_servers:  # records as good as the honest servers' (their version, weights, addresses), whole model
            honest_record = reader.request("discover", timeout=DISCOVER_TIMEOUT_S, model=args.generate_model)["records"][0]
            flood.request("announce", model=args.generate_model, start=0, end=model_servers.layers, ttl=RECORD_TTL_S,
                          version=honest_record["version"], weights=honest_record["weights"],
                          addrs=honest_record["addrs"], timeout=600)
        after_flood = [discover(reader)[0] for _ in range(5)]
        hidden = [len(honest - seen) for seen in after_flood]
        flood_listed = [len(set(flood.ids) & seen) for seen in after_flood]
        generated_in_flood = model_servers.generate(args.generate, sites[5]) if model_servers else []

        trials = [t for rnd in rounds for t in rnd["listed_s"]]
        return {
            "peers": peers_total + (2 if model_servers else 0), "sites": len(SITES), "servers": len(honest), "churn_killed": len(dying) * per,
            "departures_before_trials": departed_before_trials, "departures": departed,
            "initial_listed": f"{len(first)}/{len(honest)}",
            "trials": len(trials),
            "trials_listed_within_10s": sum(1 for t in trials if t is not None and t <= 10.0),
            "trials_listed_within_30s": sum(1 for t in trials if t is not None and t <= 30.0),
            "trials_listed_at_all": sum(1 for t in trials if t is not None),
            "trial_listed_s_max": max((t for t in trials if t is not None), default=None),
            "trial_listed_s": [rnd["listed_s"] for rnd in rounds],
            "lookups": len(lookups), "lookups_answered": len(lookup_s),
            "lookup_p50_s": round(statistics.median(lookup_s), 3) if lookup_s else None,
            "lookup_p95_s": round(pct(lookup_s, 0.95), 3) if lookup_s else None,
            "lookup_max_s": round(max(lookup_s), 3) if lookup_s else None,
            "honest_hidden_per_lookup_before_flood": lookup_hidden,
            "flood_ids": len(flood.ids), "honest_hidden_per_lookup": hidden, "flood_ids_listed": flood_listed,
            **(ModelServers.summary(generated, generated_in_flood) if model_servers else {}),
            "idle_cpu": idle,
            "reachability_verdicts": Peers.verdicts,
            "load_average_at_trials": [rnd["load_average"] for rnd in rounds],
            "wall_s": round(time.monotonic() - started, 1),
        }
    finally:
        for p in list(Peers.live):
            p.kill()
        net.close()


class ModelServers:
    """Two real `dsdnode start` servers of a real model (half its layers each, float32, on two
    sites), in the swarm from its start to its end, and `dsdnode generate` clients on other sites:
    whether a client still generates after the churn and the departures, and during the flood
    (whose records claim the whole model, copied from an honest server's, at its addresses)."""

    PROMPT = "def fibonacci(n):"
    NEW_TOKENS = 8
    TIMEOUT_S = 600.0  # a client imports torch, loads the model and routes, on a machine the swarm loads

    def __init__(self, model: str, sites: list[Host], bootstrap: list[str], logs: Path) -> None:
        from dsdnode.local_swarm import launch_node
        from dsdnode.models.fetch import pull

        self.model, self.logs = model, logs
        self.layers = json.loads((pull(model, progress=False) / "config.json").read_text())["num_hidden_layers"]
        self.boot_args = [arg for addr in bootstrap for arg in ("--bootstrap", addr)]
        half = self.layers // 2
        launched = []
        for site, span in ((sites[1], f"0:{half}"), (sites[2], f"{half}:{self.layers}")):
            node = launch_node(["--host", site.ip, "--model", model, "--layers", span, "--dtype", "float32",
                                *self.boot_args], logs / f"server-{span.replace(':', '-')}.log",
                               launcher=site.launcher())
            site.processes.append(node.proc)
            launched.append(node)
        for node in launched:
            node.wait_ready()
        log(f"model servers of {model} up (layers 0:{half} and {half}:{self.layers})")

    def generate(self, times: int, site: Host) -> list[dict]:
        """`times` greedy generations, one after another, each a fresh `dsdnode generate` in `site`."""
        runs = []
        for i in range(times):
            started = time.monotonic()
            log_path = self.logs / f"generate-{site.ns}-{i}.log"
            cmd = ["ip", "netns", "exec", site.ns, sys.executable, "-m", "dsdnode", "-v", "generate", "--model",
                   self.model, "--dtype", "float32", "--threads", "1", "--raw", "--no-audit", "--k", "4",
                   "--max-new-tokens", str(self.NEW_TOKENS), *self.boot_args, self.PROMPT]
            with open(log_path, "w") as err:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
                site.processes.append(proc)
                try:
                    text, _ = proc.communicate(timeout=self.TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    text, _ = proc.communicate()
            ok = proc.returncode == 0 and bool(text.strip())
            runs.append({"ok": ok, "seconds": round(time.monotonic() - started, 1), "text": text})
            log(f"  generate {i}: {'ok' if ok else f'failed (exit {proc.returncode}, {log_path.name})'} "
                f"in {runs[-1]['seconds']} s")
        return runs

    @staticmethod
    def summary(before: list[dict], during: list[dict]) -> dict:
        texts = {r["text"] for r in [*before, *during] if r["ok"]}
        return {"generated_after_departures": f"{sum(r['ok'] for r in before)}/{len(before)}",
                "generated_during_flood": f"{sum(r['ok'] for r in during)}/{len(during)}",
                "generate_s": [r["seconds"] for r in [*before, *during]],
                "generated_texts_identical": len(texts) == 1}


def idle_cpu(seconds: float, pids: list[int], peers: int) -> dict:
    """CPU the swarm spends at rest (upkeep, servers re-announcing, nobody joining or asking): CPU
    seconds of all peer processes over `seconds`, per peer and minute, from 30 s after the last peer
    joined (the joins' own lookups are over by then)."""
    def cpu_s() -> float:
        total = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    time.sleep(30)
    before, load_before = cpu_s(), load_average()
    time.sleep(seconds)
    spent = cpu_s() - before
    result = {"seconds": seconds, "cpu_s": round(spent, 1), "cpu_s_per_peer_minute": round(spent / peers * 60 / seconds, 3),
              "load_average": [round(load_before, 2), round(load_average(), 2)]}
    log(f"at rest: {result}")
    return result


def load_average() -> float:
    """The machine's 1-minute load average: every peer here shares its cores, so timings follow it."""
    return os.getloadavg()[0]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=64, help="peers in all (bootstrap, DHT, servers)")
    ap.add_argument("--servers", type=int, default=8, help="honest servers announcing the model throughout "
                    "(--per-process to a process, each process on another /24)")
    ap.add_argument("--per-process", type=int, default=4, help="DHT peers per OS process")
    ap.add_argument("--departures", type=int, default=100, help="servers that announce and die before the trials")
    ap.add_argument("--batch", type=int, default=10, help="departing servers per process")
    ap.add_argument("--trials", type=int, default=20, help="new servers timed until listed")
    ap.add_argument("--round-size", type=int, default=4, help="new servers per trial round (one process)")
    ap.add_argument("--flood", type=int, default=50, help="throw-away ids in the flood")
    ap.add_argument("--lookups", type=int, default=100)
    ap.add_argument("--generate", type=int, default=0, help="with two real servers of --generate-model in the "
                    "swarm throughout: generations after the departures, and as many during the flood")
    ap.add_argument("--generate-model", default="smollm2-135m", help="a model `dsdnode models pull` fetched")
    ap.add_argument("--idle-s", type=float, default=0.0, help="measure the CPU the swarm spends at rest this "
                    "long, once every peer is up")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--soak-hours", type=float, default=0.0, help="keep the trial rounds going this long")
    ap.add_argument("--budget-s", type=float, help="end departures, trials and lookups early so that the whole "
                    "run, flood included, takes about this long (the result says how many of each were done)")
    ap.add_argument("--debug-logs", action="store_true", help="peers log where they publish and whom the reader asks")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    Peers.debug = args.debug_logs
    if os.geteuid() != 0:
        sys.exit("membership_scale: network namespaces need root")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("membership_scale: terminated"))  # cleanup still runs
    print_result(run(args), args.out)


if __name__ == "__main__":
    main()
