"""A node assembled from its settings and run until told to stop: the library side of `dsdnode
start`, as `client/service.build_service` is of the client commands.

Two kinds of node:
- a server (`serve_span`): device and dtype, the model's config, the span (given, or with
  `--layers auto` the least-covered one that fits the device), the libp2p node, the span's
  weights, then `daemon.Server`, which announces and serves sessions;
- a DHT-only peer (`serve_dht_peer`, `--layers none`): a libp2p node that keeps the DHT reachable
  and relays, nothing else. It never imports torch or transformers (about 300 MB and seconds of
  start-up), so an operator's small machine can run several: everything torch-bound is imported
  inside `serve_span` only, and nothing this module or `net/` imports at the top needs it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from ..config import NodeSettings, bootstrap_list
from ..net.identity import load_or_create_identity
from ..net.latency import LinkLatency
from ..net.p2p import P2PNode, RelayLimits
from ..ready import print_ready

log = logging.getLogger(__name__)

PARENT_POLL_S = 1.0
_WATCHES: set[asyncio.Task] = set()


async def run_node(s: NodeSettings) -> None:
    """Serve what `s` asks for until SIGTERM/SIGINT (or until `s.parent_pid` is gone)."""
    if s.layers == "none":
        await serve_dht_peer(s)
    else:
        await serve_span(s)


async def start_p2p(s: NodeSettings, **extra) -> P2PNode:
    """The libp2p node both kinds of node run, from the settings they share."""
    return await P2PNode.start(identity=load_or_create_identity(s.identity), host=s.host, port=s.port,
                               bootstrap=bootstrap_list(s.bootstrap, s.peers_file), announce=s.announce_addrs,
                               latency=node_links(s), relay_service=s.relay_service, relay_limits=relay_limits(s),
                               local_swarm=s.local_swarm, **extra)


def relay_limits(s: NodeSettings) -> RelayLimits:
    """The relay's limits: RelayLimits' defaults, replaced by the relay_* settings given."""
    given = {"max_reservations": s.relay_max_reservations,
             "max_reservations_per_group": s.relay_max_reservations_per_network,
             "max_circuits": s.relay_max_circuits, "max_circuits_per_peer": s.relay_max_circuits_per_peer,
             "max_circuits_per_group": s.relay_max_circuits_per_network,
             "circuit_bytes": None if s.relay_circuit_mb is None else s.relay_circuit_mb << 20,
             "circuit_duration_s": s.relay_circuit_duration_s, "circuit_idle_s": s.relay_circuit_idle_s,
             "circuit_bytes_per_s": None if s.relay_circuit_mb_per_s is None else int(s.relay_circuit_mb_per_s * 2**20)}
    return RelayLimits(**{k: v for k, v in given.items() if v is not None})


def node_links(s: NodeSettings) -> LinkLatency:
    """The node's emulated links: its --link-config file (BadValue naming it if bad), else
    --link-latency-ms to every peer."""
    return LinkLatency.load(s.link_config) if s.link_config else LinkLatency(s.link_latency_ms)


async def serve_span(s: NodeSettings) -> None:
    """Load a span of `s.model` and serve it to the swarm (daemon.Server) until stopped."""
    import torch

    from ..devices import describe, resolve_device, resolve_dtype
    from ..dtypes import dtype_name
    from ..models.fetch import resolve_model_dir
    from ..models.span import Span
    from ..models.quantization import quantize_layers
    from ..models.weights import load_config, weights_identity
    from .batching import BatchSettings
    from .daemon import Server
    from .placement import auto_width, choose_span, parse_layers
    from .sessions import ClientLimits

    if s.threads:
        torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
    model_dir = resolve_model_dir(s.model)
    config = load_config(model_dir)
    num_layers = config.num_hidden_layers
    if s.layers != "auto":
        span_range = parse_layers(s.layers, num_layers)
    else:
        width = auto_width(config, device, dtype, num_layers=s.num_layers, cache_budget_mb=s.cache_budget_mb,
                           max_memory_mb=s.max_memory_mb, quant=s.quant)
    stop = asyncio.Event()
    install_stop_triggers(stop, s.parent_pid)
    node = await start_p2p(s, assume_private=s.assume_private)
    try:
        if s.layers == "auto":
            records = await node.dht.discover(s.model) if s.bootstrap or s.peers_file else []
            span_range = choose_span(records, num_layers, width)
            log.info("--layers auto: chose %d:%d", *span_range)
        span = Span.load(model_dir, *span_range, dtype=dtype, device=device)
        quantize_layers(span.layers, s.quant, dtype)
        log.info("serving layers %d:%d of %s on %s in %s", *span_range, s.model, describe(device), dtype_name(dtype))
        server = Server(node, s.model, span, weights=weights_identity(model_dir, s.quant),
                        cache_budget_bytes=s.cache_budget_mb << 20,
                        max_length=s.max_session_length, max_block=s.max_block, idle_s=s.session_idle_s,
                        announce_interval_s=s.announce_interval_s, record_ttl_s=s.record_ttl_s,
                        frame_body_timeout_s=s.frame_body_timeout_s,
                        batching=BatchSettings(s.max_batch if s.batching else 1, s.batch_window_ms / 1000),
                        client_limits=ClientLimits(s.max_sessions_per_client, s.max_queued_per_client,
                                                   s.max_sessions_per_network, s.max_cache_share),
                        local_swarm=s.local_swarm)
        if s.metrics_port:
            server.metrics.serve(s.host, s.metrics_port)
    except BaseException:
        await node.stop()
        raise
    try:
        await server.serve(stop)
    finally:
        server.metrics.stop()


async def serve_dht_peer(s: NodeSettings) -> None:
    """A peer that serves no layers: it keeps the DHT reachable (a stable public entry point) and
    relays for peers behind NATs. Imports no torch (see the module's docstring)."""
    from .metrics import bootstrap_metrics

    stop = asyncio.Event()
    install_stop_triggers(stop, s.parent_pid)
    node = await start_p2p(s)
    metrics = bootstrap_metrics(node)
    try:
        if s.metrics_port:
            metrics.serve(s.host, s.metrics_port)
        print_ready(peer_id=node.peer_id, addrs=node.addrs, role="bootstrap", **node.reach_fields())
        await stop.wait()
    finally:
        metrics.stop()
        await node.stop()


def install_stop_triggers(stop: asyncio.Event, parent_pid: int = 0) -> None:
    """Set `stop` on SIGTERM/SIGINT and, if parent_pid is set, once that process is gone.

    The parent watch is for launchers (tests, `dsdnode bench`, the demo) that start nodes in
    their own sessions: if the launcher is SIGKILLed it cannot signal them, and without the
    watch they would serve forever."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if parent_pid:
        task = loop.create_task(_stop_when_gone(parent_pid, stop))
        _WATCHES.add(task)  # the loop holds tasks only weakly
        task.add_done_callback(_WATCHES.discard)


async def _stop_when_gone(pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.warning("parent process %d is gone: shutting down", pid)
            stop.set()
            return
        except PermissionError:
            pass  # it exists, owned by someone else
        await asyncio.sleep(PARENT_POLL_S)
