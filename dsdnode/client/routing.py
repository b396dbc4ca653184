"""Choosing a chain of servers that covers every layer with the least expected round time.

Candidates are the verified span records on the DHT whose peers answer a ping. A hop may serve
any sub-range of its announced span, so the chain is a shortest path over layer boundaries
0..L: from boundary p, a server holding layer p reaches any boundary up to its span's end at the
cost of one link (half its measured RTT) plus its compute for those layers, times its standing
penalty (client/standing.py: compute measured by this client where it has measured it, else the
announced throughput, capped; failures and false claims raise the penalty). The link back to the
client is added at the end. A server reached through a relay (its record lists only /p2p-circuit
addresses) pays the extra link in its measured RTT; at equal cost, the chain with fewer relayed
hops wins.

Load spread: a server's step cost grows with its sessions (LOAD_COST_PER_SESSION), and its pass
time counts as measured, a claim only capped by what this client measured (client/standing.py);
both sessions and pass time are read fresh from the server's load answer (`with_load`: a record is
up to an announce old). Each chain multiplies every server's cost by its own fixed random draw from
an exponential distribution (choice_factor: a hash of the chain's seed and the server's id). Of
replicas whose costs are c_1, c_2, ... a chain then picks replica i with probability
(1/c_i) / sum(1/c_j), in proportion to its estimated capacity: the minimum of independent
exponentials with rates 1/c_i. Clients that arrive together read the same loads (none sees the
others' sessions yet), so a deterministic choice, or a random preference narrower than the noise
between replicas' costs, sends them all to the one that looks fastest (with a preference of at
most 30 %, 75-80 % of 8 concurrent clients took one of two replicas of real servers on a loaded
machine: BENCHMARKS.md). Sampling in proportion to capacity splits equal replicas evenly, still
gives a replica twice as fast two thirds of the clients, and lets load seen meanwhile shift later
clients further; what a wave's coins leave uneven, the servers even out by refusing sessions a less
loaded replica can take (server/load.py). The seed is random per chain, so one node that runs many
chains at once (the HTTP API) spreads them too, while one chain keeps its choice when it re-routes."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import heapq
import logging
import math
from dataclasses import dataclass

from ..net.records import SpanRecord, coverage
from ..net.p2p import P2PNode, PeerInfo
from ..net.relay import is_circuit
from ..errors import BadValue, PeerError

log = logging.getLogger(__name__)
PING_TIMEOUT_S = 3.0
RELAYED_PING_TIMEOUT_S = 10.0  # a first ping through a relay also sets up the relayed connection
# added cost of a step per session active at a server, as a fraction of its own: one more block in a
# batched forward (docs/ARCHITECTURE.md, "Many clients")
LOAD_COST_PER_SESSION = 0.1
LOAD_TIMEOUT_S = 1.0  # a server that does not say its load this fast is routed by its record's


class NoRoute(PeerError, RuntimeError):
    """No set of live servers covers every layer."""


def relayed_only(record: SpanRecord) -> bool:
    """The server announces only relay (circuit) addresses: it is behind a NAT, and reaching it
    depends on relays that may come and go (net/relay.py)."""
    return bool(record.addrs) and all(is_circuit(a) for a in record.addrs)


@dataclass(frozen=True)
class Candidate:
    """s_per_layer: the client's estimate of one step's seconds per layer (None: the record's claim).
    penalty: multiplies this server's cost in a route (1: nothing against it)."""

    record: SpanRecord
    rtt_s: float
    s_per_layer: float | None = None
    penalty: float = 1.0

    @property
    def peer(self) -> PeerInfo:
        return PeerInfo(self.record.peer_id, tuple(self.record.addrs))

    @property
    def relayed(self) -> bool:
        """Reached only through a relay (see net/relay.py)."""
        return relayed_only(self.record)

    def compute_s(self, layers: int) -> float:
        """Decoding cost of `layers` of this span per step: measured by this client where it has
        measured it, else from the announced throughput (for the whole span); raised by
        LOAD_COST_PER_SESSION for each session active there, so that of two servers otherwise equal
        the less loaded one is chosen (a batching server serves more sessions at a small cost each)."""
        load = 1.0 + LOAD_COST_PER_SESSION * self.record.active_sessions
        if self.s_per_layer is not None:
            return self.s_per_layer * load * layers
        per_span = 1.0 / self.record.throughput if self.record.throughput > 0 else 1.0
        return per_span * load * layers / (self.record.end - self.record.start)


@dataclass(frozen=True)
class Hop:
    candidate: Candidate
    start: int
    end: int


async def live_candidates(node: P2PNode, model: str, weights: str) -> list[Candidate]:
    """Every verified record of `model`'s `weights` on the DHT whose peer answers a ping."""
    records, _other = same_weights(await node.dht.discover(model), weights)
    return await ping_records(node, records)


def same_weights(records: list[SpanRecord], weights: str) -> tuple[list[SpanRecord], dict[str, str]]:
    """The records of servers that hold `weights` (a digest), and why each other one is left out:
    one model name may stand for several checkpoints (quantizations, fine-tunes), and a chain that
    mixed them would compute garbage without any error."""
    same = [r for r in records if r.weights == weights]
    other = {r.peer_id: f"serves other weights of {r.model} (digest {r.weights or 'none'}, ours {weights})"
             for r in records if r.weights != weights}
    return same, other


async def ping_records(node: P2PNode, records: list[SpanRecord], timeout_s: float = PING_TIMEOUT_S) -> list[Candidate]:
    """The records whose peers answer a ping within timeout_s (RELAYED_PING_TIMEOUT_S for a peer
    reached only through a relay), with the measured round-trip time."""
    async def ping(rec: SpanRecord) -> Candidate | None:
        wait = max(timeout_s, RELAYED_PING_TIMEOUT_S) if relayed_only(rec) else timeout_s
        try:
            return Candidate(rec, await node.ping(PeerInfo(rec.peer_id, tuple(rec.addrs)), timeout=wait))
        except Exception as e:
            log.info("peer %s (layers %d:%d) does not answer: %r", rec.peer_id, rec.start, rec.end, e)
            return None

    records = [r for r in records if r.peer_id != node.peer_id]
    return [c for c in await asyncio.gather(*(ping(r) for r in records)) if c is not None]


async def with_load(node: P2PNode, records: list[SpanRecord], model: str,
                    timeout_s: float = LOAD_TIMEOUT_S) -> dict[str, SpanRecord]:
    """Each record (by peer id) with the load its server answers now in place of the announced one:
    open sessions, and the throughput of its pass time as served lately (net/peer_info.py). Both are
    claims like the record's, read fresher; routing still caps a claimed speed by what it measured
    and never costs a server below its measured pass (client/standing.py), so a server that claims to
    be idle gains nothing over what was measured of it. A server that does not answer keeps its record."""
    async def ask(rec: SpanRecord) -> SpanRecord:
        try:
            load = (await node.ask_load(PeerInfo(rec.peer_id, tuple(rec.addrs)), timeout_s)).get(model)
        except Exception as e:
            log.debug("peer %s did not say its load: %r", rec.peer_id, e)
            return rec
        if load is None or load[1] <= 0:
            return rec
        return dataclasses.replace(rec, active_sessions=load[0], throughput=1.0 / load[1])

    return {r.peer_id: r for r in await asyncio.gather(*(ask(r) for r in records))}


def choice_factor(seed: str, peer_id: str) -> float:
    """This chain's fixed cost factor for a server: an exponential draw (mean 1) from a hash of `seed`
    and the server's id, so that of replicas the chain picks each in proportion to its capacity (see
    the module docstring); 1 without a seed (a deterministic choice)."""
    if not seed:
        return 1.0
    digest = hashlib.blake2b(f"{seed}\x00{peer_id}".encode(), digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 1) / 2**64  # in (0, 1]
    return -math.log(uniform) or 2**-64  # an exact 1.0 draws 0: keep every cost positive


def best_chain(candidates: list[Candidate], num_layers: int, session_length: int = 0,
               seed: str = "", first_layer: int = 0) -> list[Hop]:
    """Least expected time for one decoding step through layers [first_layer, num_layers) (Dijkstra
    over boundaries; a client that runs the first layers itself routes from the end of them).

    `seed` (random per chain) spreads chains over replicas in proportion to their capacity (see the
    module docstring); without it, the cheapest route wins for every client.

    With session_length, a server is used for a sub-span only if the free cache it announced holds
    a session that long (its record counts free positions over its whole span, so a sub-span needs
    the same fraction of them). Records are up to one announce interval old: a server that filled up
    since answers "busy" when the session opens, and the client routes around it then."""
    factor = {c.record.peer_id: choice_factor(seed, c.record.peer_id) for c in candidates}
    best: dict[int, tuple[float, int, int, list[Hop]]] = {first_layer: (0.0, 0, 0, [])}
    heap = [(0.0, 0, 0, first_layer, [])]  # (cost, relayed hops, hops, boundary, chain)
    while heap:
        cost, relayed, n, p, chain = heapq.heappop(heap)
        if p == num_layers:
            return chain
        if best.get(p, (float("inf"),))[0] < cost:
            continue
        used = {h.candidate.record.peer_id for h in chain}
        for c in candidates:
            r = c.record
            if not r.start <= p < r.end or r.peer_id in used:  # one session per server in a chain
                continue
            for q in range(p + 1, min(r.end, num_layers) + 1):
                if session_length and r.free_cache_tokens * (r.end - r.start) < session_length * (q - p):
                    break
                step = (c.rtt_s / 2 + c.compute_s(q - p) + (c.rtt_s / 2 if q == num_layers else 0.0)) * c.penalty
                step *= factor[r.peer_id]
                new = (cost + step, relayed + c.relayed, n + 1)
                if new < best.get(q, (float("inf"), 0, 0))[:3]:
                    best[q] = (*new, chain)
                    heapq.heappush(heap, (*new, q, chain + [Hop(c, p, q)]))
    covered = sorted({i for c in candidates for i in range(c.record.start, min(c.record.end, num_layers))})
    missing = [i for i in range(first_layer, num_layers) if i not in covered]
    if missing:
        raise NoRoute(f"no live servers for layers {layer_ranges(missing)} of {num_layers}")
    raise NoRoute(f"no chain of live servers covers every layer with free cache for {session_length} positions"
                  if session_length else "no chain of live servers covers every layer")


def layer_ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


SURVEY_MAX_PEERS = 64  # peers asked what they serve when `dsdnode swarm` lists every model
SURVEY_TIMEOUT_S = 3.0


async def describe_swarm(model: str | None, bootstrap: list[str], num_layers: int | None = None) -> dict:
    """What `dsdnode swarm` prints: for `model` (or, if None, every model some peer serves) every
    announced span, its liveness, and layer coverage.

    A model is found by name on the DHT; to list models without a name, the peers themselves are
    asked (P2PNode.ask_info), starting from the bootstrap peers and following their routing tables, up
    to SURVEY_MAX_PEERS peers. Joins as a client: nothing is left behind in the swarm."""
    if not bootstrap:
        raise BadValue("give --bootstrap or --peers: a swarm is found through one of its peers")
    node = await P2PNode.start(bootstrap=bootstrap, require_bootstrap=True, client=True)
    try:
        if model is not None:
            return await describe_model(node, model, num_layers)
        survey = await survey_models(node)
        reports = [await describe_model(node, m, None) for m in sorted(survey.served)]
        return {"models": reports, "peers_asked": survey.asked, "peers_answered": survey.answered}
    finally:
        await node.stop()


async def describe_model(node: P2PNode, model: str, num_layers: int | None) -> dict:
    """One model's part of describe_swarm, through a node that is already running (the HTTP API's
    swarm view asks through the client's own node): its records, which peers answer a ping (with
    the RTT measured here), what each says of its reachability, coverage, and this client's bans."""
    records = await node.dht.discover(model)
    live_candidates = await ping_records(node, records)
    live = {c.record.peer_id: c.rtt_s for c in live_candidates}
    infos = await asyncio.gather(*(node.ask_info(c.peer, SURVEY_TIMEOUT_S) for c in live_candidates),
                                 return_exceptions=True)
    reach = {c.record.peer_id: i.reachability for c, i in zip(live_candidates, infos) if not isinstance(i, BaseException)}
    if num_layers is None:
        num_layers = _num_layers(model, records)
    counts = coverage([r for r in records if r.peer_id in live], num_layers)
    from .bans import BanList
    bans = {p: b for p, b in BanList().active().items() if b.model == model}
    return {
        "model": model, "num_layers": num_layers, "served": bool(live), "local_weights": _local_weights(model),
        "incompatible": node.dht.incompatible.copy(),
        "uncovered_layers": [i for i, n in enumerate(counts) if n == 0],
        "coverage": counts,
        "peers": [{"peer_id": r.peer_id, "start": r.start, "end": r.end, "addrs": r.addrs,
                   "throughput": r.throughput, "free_cache_tokens": r.free_cache_tokens, "version": r.version,
                   "device": r.device, "weights": r.weights, "active_sessions": r.active_sessions,
                   "queued_positions": r.queued_positions,
                   "expires": r.expires, "rtt_ms": live[r.peer_id] * 1e3 if r.peer_id in live else None,
                   "reachability": reach.get(r.peer_id), "relayed": relayed_only(r),
                   "banned": bans[r.peer_id].reason if r.peer_id in bans else None}
                  for r in records],
        # this client's ban list (client/bans.py): servers an audit caught, whether they announce now or not
        "banned": [{"peer_id": b.peer_id, "layers": list(b.layers), "reason": b.reason, "until": b.until}
                   for b in bans.values()],
    }


@dataclass(frozen=True)
class Survey:
    served: dict[str, set[str]]  # model name -> ids of the peers that say they serve it
    asked: int
    answered: int


async def survey_models(node: P2PNode) -> Survey:
    """Which models the swarm's peers say they serve, from asking up to SURVEY_MAX_PEERS peers
    (the node's routing table first, then the peers in theirs). A peer that does not answer is
    skipped: the caller checks every model on the DHT anyway."""
    served: dict[str, set[str]] = {}
    asked: set[str] = set()
    todo = await node.known_peers()
    answered = 0
    while todo and len(asked) < SURVEY_MAX_PEERS:
        fresh = {p.peer_id: p for p in todo if p.peer_id not in asked and p.peer_id != node.peer_id}
        batch = list(fresh.values())[:SURVEY_MAX_PEERS - len(asked)]
        asked.update(p.peer_id for p in batch)
        infos = await asyncio.gather(*(node.ask_info(p, SURVEY_TIMEOUT_S) for p in batch), return_exceptions=True)
        todo = []
        for peer, info in zip(batch, infos):
            if isinstance(info, BaseException):
                log.info("peer %s did not say what it serves: %s", peer.peer_id, info)
                continue
            answered += 1
            for name in info.models:
                served.setdefault(name, set()).add(peer.peer_id)
            todo.extend(info.peers)
    return Survey(served, len(asked), answered)


def _num_layers(model: str, records: list[SpanRecord]) -> int:
    try:
        from ..models.fetch import resolve_model_dir
        from ..models.weights import load_config
        return load_config(resolve_model_dir(model)).num_hidden_layers
    except Exception:  # model not pulled here: the highest announced layer is the best guess
        return max((r.end for r in records), default=0)


def _local_weights(model: str) -> str | None:
    """The digest of this machine's copy of `model`, if it has one: `dsdnode swarm` marks servers of
    other weights, which a client here would not chain."""
    try:
        from ..models.fetch import resolve_model_dir
        from ..models.weights import weights_digest
        return weights_digest(resolve_model_dir(model))
    except Exception:  # not pulled here (or unreadable): nothing to compare with
        return None
