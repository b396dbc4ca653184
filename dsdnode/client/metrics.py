"""Prometheus metrics of a client (the HTTP API serves them at /metrics): what its users feel.

Observed once per generation by ClientService: request latency, time to first token, tokens per
second, and per round the draft length, the accepted drafts, the network time of the chain (the
round's time minus drafting and the hops' compute: links plus software overhead) and each link
between hops."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

from .generate import GenerationResult

SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
ROUND_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RATES = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)
COUNTS = tuple(range(0, 17))
RECENT_GENERATIONS = 120  # generations the web UI's live charts keep (ClientMetrics.recent)


@dataclass(frozen=True)
class GenerationPoint:
    """One finished generation as the web UI charts it: histograms sum generations up, the charts
    show how each one went (per-round figures are means over its rounds)."""

    at: float  # unix time it finished
    tokens: int
    tokens_per_s: float
    rounds: int
    accepted_per_round: float
    k: float  # mean draft length (the tree's depth)
    tree_nodes: float  # mean tree nodes sent per round (k for a chain of drafts)
    hop_link_ms: list[float]  # mean per link between consecutive hops, in round order
    failovers: int

    @classmethod
    def of(cls, result: GenerationResult, failovers: int) -> GenerationPoint:
        n = max(1, len(result.rounds))
        links = max((len(r.hop_link_s) for r in result.rounds), default=0)
        link_ms = [1e3 * sum(r.hop_link_s[i] for r in result.rounds if len(r.hop_link_s) > i)
                   / max(1, sum(len(r.hop_link_s) > i for r in result.rounds)) for i in range(links)]
        return cls(time.time(), len(result.tokens), result.tokens_per_s, len(result.rounds), result.mean_accepted,
                   result.mean_k, sum(r.nodes or r.k for r in result.rounds) / n, link_ms, failovers)

    def body(self) -> dict:
        return asdict(self)


class ClientMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.generations = Counter("dsdnode_client_generations", "Generations finished, by outcome.", ["outcome"],
                                   registry=r)
        self.latency = Histogram("dsdnode_client_generation_seconds", "Whole generation, prompt to last token.",
                                 buckets=SECONDS, registry=r)
        self.ttft = Histogram("dsdnode_client_time_to_first_token_seconds", "Prompt to the first generated token.",
                              buckets=SECONDS, registry=r)
        self.tokens_per_s = Histogram("dsdnode_client_tokens_per_second", "Decoding speed of a generation.",
                                      buckets=RATES, registry=r)
        self.tokens = Counter("dsdnode_client_tokens_generated", "Tokens generated.", registry=r)
        self.k = Histogram("dsdnode_client_draft_length", "Draft length k of a round.", buckets=COUNTS, registry=r)
        self.accepted = Histogram("dsdnode_client_accepted_drafts", "Drafts accepted in a round.", buckets=COUNTS,
                                  registry=r)
        self.drafts = Counter("dsdnode_client_drafts", "Draft tokens proposed, and accepted.", ["verdict"], registry=r)
        self.network = Histogram("dsdnode_client_round_network_seconds",
                                 "Per round: time not spent drafting or computing on a hop (links, overhead).",
                                 buckets=ROUND_SECONDS, registry=r)
        self.hop_link = Histogram("dsdnode_client_hop_link_seconds",
                                  "Per round: from one hop's send to the next hop's receive (their clocks).",
                                  ["link"], buckets=ROUND_SECONDS, registry=r)
        self.failovers = Counter("dsdnode_client_failovers", "Chains rebuilt around a fault.", registry=r)
        ProcessCollector(registry=r)
        self.recent: deque[GenerationPoint] = deque(maxlen=RECENT_GENERATIONS)

    def observe(self, result: GenerationResult, elapsed_s: float, ttft_s: float | None, failovers: int) -> None:
        self.generations.labels("ok").inc()
        self.latency.observe(elapsed_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if result.tokens:
            self.tokens_per_s.observe(result.tokens_per_s)
        self.tokens.inc(len(result.tokens))
        self.failovers.inc(failovers)
        self.recent.append(GenerationPoint.of(result, failovers))
        for r in result.rounds:
            self.k.observe(r.k)
            self.accepted.observe(r.accepted)
            self.drafts.labels("proposed").inc(r.k)
            self.drafts.labels("accepted").inc(r.accepted)
            self.network.observe(max(0.0, r.round_s - r.draft_s - sum(r.hop_compute_s)))
            for i, link in enumerate(r.hop_link_s):
                self.hop_link.labels(f"{i + 1}->{i + 2}").observe(link)

    def stopped(self, elapsed_s: float, ttft_s: float | None) -> None:
        """Ended early at a stop string (the caller's choice, not a failure)."""
        self.generations.labels("stopped").inc()
        self.latency.observe(elapsed_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)

    def failed(self) -> None:
        self.generations.labels("error").inc()
