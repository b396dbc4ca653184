"""Which servers a chain may use and which chain it takes: candidates, exclusions, standing, the route.

A Router belongs to one chain (client/swarm_chain.py), which keeps the sessions, the blocks and
failover. The Router keeps what decides a route: the span records of servers of the chain's weights
(re-read from the DHT when they are older than RECORDS_MAX_AGE_S), the peers excluded for the life of
the chain and why, busy peers and when to try them again, the client's standing of every server
(client/standing.py, shared by the chains of one client) and its ban list (client/bans.py). The chain
reports faults to it (`blame`) and asks it for a route (`route`) and for who may audit a hop
(`audit_pool`).

Network groups are observed, not claimed: after pinging the candidates, the router asks the
transport which IP address each connection goes to (P2PNode.connected_ip) and counts the peer
against that address's group (client/standing.py), for the per-group record caps, for auditor
independence and for bans. A record whose first address (the group it claims) is not the one the
client reached is flagged: logged once, and it may not audit. A peer observed in the group of a
banned peer starts with BANNED_GROUP_PENALTY and may not audit either."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time

from ..net.records import SpanRecord, coverage
from ..net.p2p import P2PNode
from .bans import BanList
from .routing import Candidate, Hop, NoRoute, best_chain, ping_records, relayed_only, same_weights, with_load
from .standing import Standing, observed_group, record_group

log = logging.getLogger(__name__)

BUSY_RETRY_S = 2.0  # a busy server without a retry hint is tried again after this long
MAX_BUSY_WAIT_S = 30.0  # longest wait for busy servers when no other route exists
RECORDS_MAX_AGE_S = 60.0  # re-read the DHT when the records we route with are older
# a look at the DHT may answer in part (a client that just joined has an empty routing table; under
# load, some shard's directory peers do not answer in time: seen in a 63-peer swarm under a 50-id
# flood, where fresh clients failed at once with "no live servers" while every record was stored):
# a route that misses layers after such a look is looked for again, with growing pauses, for this
# long in all (and while the node is this young, for any reason the DHT answered in part)
DISCOVERY_WAIT_S = 20.0
# a server behind a NAT that does not answer may have lost the relay it was reached through; it
# reserves a slot on another and re-announces within seconds, so a route that needs it is looked
# for again, with growing pauses, for this long (a direct server that does not answer is gone)
RELAY_LOSS_WAIT_S = 20.0
# a stall at a hop whose predecessor may have withheld the push (client/swarm_chain.py `_stalled`):
# "stalled" pauses the hop this long; "stalled again" (the same two hops again) and a stall at the first
# hop of a pass exclude it for the chain; none is evidence enough to lower its standing
STALL_PAUSE_S = 10.0
UNPROVEN = frozenset({"stalled", "stalled again", "stalled on the client's block"})
BANNED_GROUP_PENALTY = 4.0  # routing cost factor of a peer observed in the network group of a banned one


class Router:
    def __init__(self, node: P2PNode, model: str, num_layers: int, weights: str, standing: Standing, bans: BanList,
                 first_layer: int = 0):
        """first_layer: routes start there (the client runs the layers before it: client/private.py)."""
        self.node, self.model, self.num_layers, self.weights = node, model, num_layers, weights
        self.first_layer = first_layer
        self.standing, self.bans = standing, bans
        self.excluded: dict[str, str] = {}  # peer id -> why, for the life of this chain
        self.records: list[SpanRecord] = []  # of servers of our weights
        self.busy_until: dict[str, float] = {}  # busy peers: monotonic time to try them again
        self._busy_count: dict[str, int] = {}
        self._reasons: dict[str, str] = {}  # excluded peer -> the failure that excluded it, for error messages
        self._unusable: dict[str, str] = {}  # providers we cannot chain (other weights or protocol) -> why
        self._records_at = -RECORDS_MAX_AGE_S
        self.groups: dict[str, str] = {}  # peer id -> the network group of the address we are connected to
        self.flagged: dict[str, str] = {}  # peer id -> how its record's addresses disagree with what we saw
        # this chain's draws for spreading over replicas (routing.choice_factor): random per chain, so
        # concurrent chains, of one node or many, spread; fixed for the chain, so a re-route keeps them
        self.seed = secrets.token_hex(8)

    # ---- what the chain reports -----------------------------------------------------------
    def exclude(self, peer: str, why: str, reason: str) -> None:
        """Avoid `peer` for the life of the chain; `reason` is what an error message says about it."""
        self.excluded[peer] = why
        self._reasons[peer] = reason

    def blame(self, suspects: dict[str, str], message: str, retry_after_s: float | None = None) -> None:
        """A chain failure blamed on `suspects` (peer -> why): a busy one waits out its hint, doubled each
        time the same server is still full, a stalled one STALL_PAUSE_S; any other is excluded, and its
        standing lowered unless the blame cannot tell two hops apart (UNPROVEN)."""
        now = time.monotonic()
        for peer, why in suspects.items():
            if why == "stalled":
                self.busy_until[peer] = now + STALL_PAUSE_S
            elif why == "busy":
                times = self._busy_count[peer] = self._busy_count.get(peer, 0) + 1
                wait = (retry_after_s if retry_after_s is not None else BUSY_RETRY_S) * 2 ** (times - 1)
                self.busy_until[peer] = now + min(max(wait, 0.5), MAX_BUSY_WAIT_S)
            else:
                self.exclude(peer, why, message[:300])
                if why not in UNPROVEN:
                    self.standing.failed(peer, why)
        log.info("chain failure (%s); avoiding %s and re-routing", message, sorted(suspects))

    # ---- what the chain asks --------------------------------------------------------------
    def group_of(self, peer: str) -> str:
        """The observed network group of `peer` (its own id while unobserved: then a group of its own)."""
        return self.groups.get(peer, f"peer:{peer}")

    def audit_pool(self, peer: str, start: int, end: int) -> list[tuple[SpanRecord, str]]:
        """Servers (record, observed group) that may sit on a panel auditing `peer`'s layers start:end:
        serving some of them, observed in another group than `peer`'s, not in this chain's exclusions,
        banned, of a banned group or flagged, and not this client."""
        bans = self.bans.active()
        banned_groups = self.bans.groups(bans)
        hop_group = self.group_of(peer)
        return [(r, self.groups[r.peer_id]) for r in self.records
                if r.start < end and start < r.end and r.peer_id in self.groups
                and self.groups[r.peer_id] not in (hop_group, *banned_groups)
                and r.peer_id not in self.excluded and r.peer_id not in bans and r.peer_id not in self.flagged
                and r.peer_id != peer and r.peer_id != self.node.peer_id]

    def can_route_around(self, peer: str, start: int, end: int) -> bool:
        """Whether other servers (not excluded or banned) together serve layers start:end: replacing a
        slow `peer` without them would end the generation, not speed it up."""
        bans = self.bans.active()
        others = [r for r in self.records
                  if r.peer_id != peer and r.peer_id not in self.excluded and r.peer_id not in bans]
        return all(coverage(others, self.num_layers)[start:end])

    def replica_s(self, peer: str, start: int, end: int) -> float | None:
        """The least measured cost of a pass over layers start:end on another server that serves them all
        and could be routed (None: no such server was measured)."""
        bans = self.bans.active()
        costs = [self.standing.measured_s_per_layer(r.peer_id) for r in self.records
                 if r.start <= start and end <= r.end and r.peer_id != peer
                 and r.peer_id not in self.excluded and r.peer_id not in bans]
        return min((c * (end - start) for c in costs if c is not None), default=None)

    async def _observe(self, records: list[SpanRecord]) -> None:
        """Note the observed group of each peer we hold a connection to (after a ping), and flag records
        whose claimed group is not where we reached them."""
        seen = await asyncio.gather(*(self.node.connected_ip(r.peer_id) for r in records), return_exceptions=True)
        for rec, ip in zip(records, seen):
            if not isinstance(ip, tuple):
                continue
            group = self.groups[rec.peer_id] = observed_group(*ip)
            claimed = record_group(rec)
            if not ip[1] and not relayed_only(rec) and claimed != group and rec.peer_id not in self.flagged:
                self.flagged[rec.peer_id] = f"its record lists network {claimed} first but it was reached in {group}"
                log.warning("%s: %s; counting it against %s", rec.peer_id, self.flagged[rec.peer_id], group)

    async def route(self, session_length: int) -> list[Hop]:
        """The best chain over peers not excluded nor busy; waits (bounded) for busy ones, and for
        servers behind a relay that do not answer (their relay may be gone), if needed."""
        waited = relay_waited = partial_waited = 0.0
        fresh = False
        pause = 1.0
        while True:
            now = time.monotonic()
            if now - self._records_at > RECORDS_MAX_AGE_S:
                found = self.standing.rate_limited(await self.node.dht.discover(self.model))
                self.records, self._unusable = same_weights(found, self.weights)
                self._unusable.update(self.node.dht.incompatible.copy())
                self._records_at, fresh = now, True
            busy = {p: t for p, t in self.busy_until.items() if t > now}
            banned = self.bans.active()
            usable = [r for r in self.records
                      if r.peer_id not in self.excluded and r.peer_id not in busy and r.peer_id not in banned]
            pinged, loads = await asyncio.gather(ping_records(self.node, usable),
                                                 with_load(self.node, usable, self.model))
            pinged = [dataclasses.replace(c, record=loads[c.record.peer_id]) for c in pinged]
            await self._observe([c.record for c in pinged])
            admitted = {r.peer_id for r in self.standing.admit([c.record for c in pinged],
                                                               lambda r: self.group_of(r.peer_id))}
            banned_groups = self.bans.groups(banned)
            candidates = [Candidate(c.record, c.rtt_s, self.standing.s_per_layer(c.record, self.records),
                                    self.standing.penalty(c.record.peer_id)
                                    * (BANNED_GROUP_PENALTY if self.group_of(c.record.peer_id) in banned_groups else 1.0))
                          for c in pinged if c.record.peer_id in admitted]
            answered = {c.record.peer_id for c in pinged}
            silent_relayed = [r for r in usable if r.peer_id not in answered and relayed_only(r)]
            try:
                try:
                    return best_chain(candidates, self.num_layers, session_length, self.seed, self.first_layer)
                except NoRoute:  # records may be stale: let the servers say whether they are full
                    return best_chain(candidates, self.num_layers, seed=self.seed, first_layer=self.first_layer)
            except NoRoute as e:
                if not fresh:  # servers may have joined since we last looked
                    self._records_at = -RECORDS_MAX_AGE_S
                    continue
                young = time.monotonic() + pause - self.node.started_at <= DISCOVERY_WAIT_S
                patient = young or partial_waited + pause <= DISCOVERY_WAIT_S
                partial = patient and self.node.dht.last_discovery_partial and not busy and not self.excluded
                relay_lost = bool(silent_relayed) and relay_waited + pause <= RELAY_LOSS_WAIT_S
                if partial or relay_lost:
                    why = ("the DHT answered in part" if partial else
                           f"{len(silent_relayed)} server(s) behind a relay do not answer: a relay may be gone")
                    log.info("%s yet (%s); looking again in %.0f s", e, why, pause)
                    await asyncio.sleep(pause)
                    relay_waited += 0.0 if partial else pause
                    partial_waited += pause if partial else 0.0
                    self._records_at, pause = -RECORDS_MAX_AGE_S, pause * 2
                    continue
                wait = min(busy.values(), default=now) - now
                if not busy or waited + wait > MAX_BUSY_WAIT_S:
                    raise NoRoute(f"{e}{self._why_excluded(busy, silent_relayed)}") from None
                log.info("every route needs a busy server; trying again in %.1f s", wait)
                await asyncio.sleep(wait)
                waited += wait

    def _why_excluded(self, busy: dict[str, float], silent_relayed: list[SpanRecord]) -> str:
        parts = ([self._reasons[p] for p in self.excluded] + [f"{p} is busy" for p in busy]
                 + [f"{r.peer_id} (behind a relay) does not answer" for r in silent_relayed]
                 + [f"{p} {why}" for p, why in self._unusable.items()]
                 + [f"{p} is banned: {b.reason}" for p, b in self.bans.active().items()
                    if any(r.peer_id == p for r in self.records)])
        return f"; servers avoided: {'; '.join(parts)}" if parts else ""
