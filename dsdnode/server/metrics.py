"""Prometheus metrics of a serving node: what an operator graphs and alerts on.

Counters and the compute histogram are updated by the daemon on its event loop; the exposition
endpoint (prometheus_client's HTTP server) reads them from its own thread. Values that already
live in the daemon's state -- open sessions, KV cache in use, errors by code (Server.errors) --
are read at scrape time instead of being mirrored, so they can never drift from the truth.
Each node has its own registry: nothing global, several nodes can share a process in tests.
Bootstrap peers (no layers) expose the DHT and process metrics only."""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from ..errors import BadValue

# Block compute on a CPU spans ~1 ms (one token, few layers) to seconds (a long prefill chunk).
COMPUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class NodeMetrics:
    def __init__(self, info: dict[str, str], sessions_open: Callable[[], int], cache_bytes_used: Callable[[], int],
                 errors: Callable[[], dict[str, int]], cache_budget_bytes: int = 0,
                 dht_stats: Callable[[], dict[str, int]] = dict):
        """info: constant labels of the node (peer id, model, span); the callables are read per scrape."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.sessions_opened = Counter("dsdnode_sessions_opened", "Inference sessions opened.",
                                       registry=self.registry)
        self.tokens_served = Counter("dsdnode_tokens_served", "Positions (tokens) run through this node's layers.",
                                     registry=self.registry)
        self.forward_compute = Histogram("dsdnode_forward_compute_seconds", "Compute time of one block on this node.",
                                         buckets=COMPUTE_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("dsdnode_forward_batch_blocks", "Blocks (of as many sessions) per forward.",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.bytes_in = Counter("dsdnode_received_bytes", "Frame bytes received on session streams.",
                                registry=self.registry)
        self.bytes_out = Counter("dsdnode_sent_bytes", "Frame bytes sent on session streams.",
                                 registry=self.registry)
        self.registry.register(_StateCollector(info, sessions_open, cache_bytes_used, errors, cache_budget_bytes,
                                               dht_stats))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self._http = None
        self._thread: threading.Thread | None = None

    def observe_block(self, tokens: int, compute_s: float) -> None:
        self.tokens_served.inc(tokens)
        self.forward_compute.observe(compute_s)

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics on host:port from a daemon thread (Prometheus text format)."""
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise BadValue(f"cannot serve metrics on {host}:{port}: {e.strerror}") from None

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _StateCollector:
    """Metrics read from the daemon's state at scrape time."""

    def __init__(self, info, sessions_open, cache_bytes_used, errors, cache_budget_bytes, dht_stats):
        self.info, self.sessions_open, self.cache_bytes_used, self.errors = info, sessions_open, cache_bytes_used, errors
        self.cache_budget_bytes, self.dht_stats = cache_budget_bytes, dht_stats

    def collect(self):
        yield InfoMetricFamily("dsdnode_node", "What this node serves.", value=self.info)
        yield GaugeMetricFamily("dsdnode_sessions_open", "Inference sessions open now.", value=self.sessions_open())
        yield GaugeMetricFamily("dsdnode_kv_cache_bytes", "KV cache memory held by open sessions.",
                                value=self.cache_bytes_used())
        yield GaugeMetricFamily("dsdnode_kv_cache_budget_bytes", "KV cache memory this node may hold for sessions.",
                                value=self.cache_budget_bytes)
        errors = CounterMetricFamily("dsdnode_errors", "Frames rejected, by error code.", labels=["kind"])
        for kind, count in sorted(dict(self.errors()).items()):
            errors.add_metric([kind], count)
        yield errors
        for name, value in sorted(self.dht_stats().items()):
            yield GaugeMetricFamily(f"dsdnode_dht_{name}", f"DHT: {name.replace('_', ' ')} on this node.", value=value)


def server_metrics(server) -> NodeMetrics:
    """The metrics of a daemon.Server: its session table and error counts, read at scrape time."""
    table = server.table
    info = {"peer_id": server.node.peer_id, "model": server.model, "layers": f"{server.span.start}:{server.span.end}"}
    return NodeMetrics(info, sessions_open=lambda: len(table.sessions),
                       cache_bytes_used=lambda: table.used_bytes, errors=lambda: server.errors,
                       cache_budget_bytes=table.budget, dht_stats=server.node.dht.stats)


def bootstrap_metrics(node) -> NodeMetrics:
    """A bootstrap peer's metrics: no sessions, its DHT and its process."""
    return NodeMetrics({"peer_id": node.peer_id, "model": "", "layers": "none"}, sessions_open=lambda: 0,
                       cache_bytes_used=lambda: 0, errors=dict, dht_stats=node.dht.stats)
