"""`dsdnode start` (serve layers) and `dsdnode swarm` (who serves what)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import click

from .cli_common import UserError, friendly, run_async, setting_type
from .cli_generate import DEVICE_HELP, DTYPE_HELP, DeviceType
from .config import NodeSettings, load_settings, read_peers_file

log = logging.getLogger(__name__)


def node_type(name: str) -> click.ParamType:
    """The type of the `start` flag for NodeSettings.`name`: the range its config key has."""
    return setting_type(NodeSettings, name)


def bootstrap_list(bootstrap, peers_file) -> list[str]:
    addrs = list(bootstrap)
    if peers_file:
        addrs += read_peers_file(peers_file)
    return addrs


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with a [node] table.")
@click.option("--model", default=None, help="Model to serve (registry name or directory).")
@click.option("--layers", default=None,
              help="START:END, 'auto' for the least-covered span, or 'none' for a DHT-only bootstrap peer.")
@click.option("--num-layers", type=node_type("num_layers"), default=None,
              help="With --layers auto: how many layers to take [default: as many as fit the device's memory].")
@click.option("--host", default=None, help="Listen address (default 127.0.0.1; 0.0.0.0 for all interfaces).")
@click.option("--port", type=node_type("port"), default=None, help="Listen port (default: any free port).")
@click.option("--announce-addr", "announce_addrs", multiple=True,
              help="Multiaddr to advertise instead of the listen address, e.g. /ip4/PUBLIC_IP/tcp/PORT (repeatable).")
@click.option("--bootstrap", multiple=True, help="Multiaddr of a swarm peer (repeatable).")
@click.option("--peers", "peers_file", default=None, help="File of bootstrap multiaddrs, one a line.")
@click.option("--identity", default=None, help="Key file for a stable peer id (created 0600 if missing).")
@click.option("--device", type=DeviceType(), default=None, help=DEVICE_HELP + " [default: auto]")
@click.option("--dtype", type=node_type("dtype"), default=None, help=DTYPE_HELP)
@click.option("--threads", type=node_type("threads"), default=None, help="torch threads (0: all cores).")
@click.option("--link-latency-ms", type=node_type("link_latency_ms"), default=None,
              help="Emulated delay before every outbound frame.")
@click.option("--cache-budget-mb", type=node_type("cache_budget_mb"), default=None,
              help="KV cache memory for all sessions.")
@click.option("--quant", type=node_type("quant"), default=None,
              help="Weight-only quantization of the layers (none, int8, int4; bitsandbytes); clients chain only "
                   "servers of their own quantization [default: none].")
@click.option("--max-memory", "max_memory_mb", type=node_type("max_memory_mb"), default=None,
              help="With --layers auto and no --num-layers: MB of memory for weights and KV cache together "
                   "(0: all the device has free).")
@click.option("--max-session-length", type=node_type("max_session_length"), default=None)
@click.option("--announce-interval", "announce_interval_s", type=node_type("announce_interval_s"),
              default=None, help="Seconds between announcements of this node's span record.")
@click.option("--metrics-port", type=node_type("metrics_port"), default=None,
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: off).")
@click.option("--batching/--no-batching", default=None,
              help="Run the blocks of sessions waiting together in one forward [default: on].")
@click.option("--batch-window-ms", type=node_type("batch_window_ms"), default=None,
              help="Longest a block waits for other sessions' blocks, only while other sessions are active "
                   "[default: 2].")
@click.option("--max-batch", type=node_type("max_batch"), default=None, help="Blocks per forward [default: 16].")
@click.option("--max-sessions-per-client", type=node_type("max_sessions_per_client"), default=None,
              help="Open sessions one client (peer id) may hold here; past it: busy [default: 16].")
@click.option("--max-queued-per-client", type=node_type("max_queued_per_client"), default=None,
              help="Positions one client may have waiting for compute here; past it: busy [default: 512].")
@click.option("--parent-pid", type=node_type("parent_pid"), default=None,
              help="Shut down (as on SIGTERM) once this process is gone; for launchers of local swarms.")
@click.option("--relay-service/--no-relay-service", "relay_service", default=None,
              help="Offer a circuit relay to peers behind NATs while this node is publicly reachable "
                   "[default: on].")
@click.option("--assume-private", "assume_private", is_flag=True, default=None,
              help="Skip the reachability check and act as a node nobody can dial: reserve relay slots and "
                   "announce only relay addresses (to measure relayed servers on one machine).")
@friendly
def start(config_file, peers_file, **flags):
    """Serve a span of a model's layers to the swarm until SIGTERM."""
    settings = load_settings(NodeSettings, config_file, peers_file=peers_file, **flags)
    run_async(run_node(settings))


async def run_node(s: NodeSettings) -> None:
    import torch

    from .devices import describe, resolve_device, resolve_dtype
    from .models.fetch import resolve_model_dir
    from .models.span import Span
    from .models.quantization import quantize_layers
    from .models.weights import load_config, weights_identity
    from .net.identity import load_or_create_identity
    from .net.latency import LinkLatency
    from .net.p2p import P2PNode
    from .net.protocol import DTYPE_NAMES
    from .server.batching import BatchSettings
    from .server.daemon import Server, install_stop_triggers
    from .server.sessions import ClientLimits
    from .server.placement import auto_width, choose_span, parse_layers

    if s.threads:
        torch.set_num_threads(s.threads)
    if s.layers == "none":
        await run_bootstrap_peer(s)
        return
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
    node = await P2PNode.start(identity=load_or_create_identity(s.identity), host=s.host, port=s.port,
                               bootstrap=bootstrap_list(s.bootstrap, s.peers_file),
                               latency=LinkLatency(s.link_latency_ms), announce=s.announce_addrs,
                               relay_service=s.relay_service, assume_private=s.assume_private)
    try:
        if s.layers == "auto":
            records = await node.dht.discover(s.model) if s.bootstrap or s.peers_file else []
            span_range = choose_span(records, num_layers, width)
            log.info("--layers auto: chose %d:%d", *span_range)
        span = Span.load(model_dir, *span_range, dtype=dtype, device=device)
        quantize_layers(span.layers, s.quant, dtype)
        log.info("serving layers %d:%d of %s on %s in %s", *span_range, s.model, describe(device), DTYPE_NAMES[dtype])
        server = Server(node, s.model, span, weights=weights_identity(model_dir, s.quant), cache_budget_bytes=s.cache_budget_mb << 20,
                        max_length=s.max_session_length, max_block=s.max_block, idle_s=s.session_idle_s,
                        announce_interval_s=s.announce_interval_s, record_ttl_s=s.record_ttl_s,
                        frame_body_timeout_s=s.frame_body_timeout_s,
                        batching=BatchSettings(s.max_batch if s.batching else 1, s.batch_window_ms / 1000),
                        client_limits=ClientLimits(s.max_sessions_per_client, s.max_queued_per_client))
        if s.metrics_port:
            server.metrics.serve(s.host, s.metrics_port)
    except BaseException:
        await node.stop()
        raise
    try:
        await server.serve(stop)
    finally:
        server.metrics.stop()


async def run_bootstrap_peer(s: NodeSettings) -> None:
    """A peer that serves no layers: it only keeps the DHT reachable (a stable public entry point)."""
    from .net.identity import load_or_create_identity
    from .net.latency import LinkLatency
    from .net.p2p import P2PNode
    from .server.daemon import install_stop_triggers
    from .server.metrics import bootstrap_metrics

    stop = asyncio.Event()
    install_stop_triggers(stop, s.parent_pid)
    node = await P2PNode.start(identity=load_or_create_identity(s.identity), host=s.host, port=s.port,
                               bootstrap=bootstrap_list(s.bootstrap, s.peers_file), announce=s.announce_addrs,
                               latency=LinkLatency(s.link_latency_ms), relay_service=s.relay_service)
    metrics = bootstrap_metrics(node)
    try:
        if s.metrics_port:
            metrics.serve(s.host, s.metrics_port)
        print(json.dumps({"event": "ready", "peer_id": node.peer_id, "addrs": node.addrs, "role": "bootstrap",
                          **node.reach_fields()}), flush=True)
        await stop.wait()
    finally:
        metrics.stop()
        await node.stop()


@click.command()
@click.option("--model", default=None, help="The model to show (default: every model the swarm's peers serve).")
@click.option("--bootstrap", multiple=True, help="Multiaddr of a swarm peer (repeatable).")
@click.option("--peers", "peers_file", default=None, help="File of bootstrap multiaddrs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
def swarm(model, bootstrap, peers_file, as_json):
    """Which peers serve which layers of MODEL (or of every model served), and whether every layer
    is covered. Exits non-zero when MODEL (or, without --model, any model) cannot be routed: nobody
    serves it or some of its layers are not served."""
    from .client.routing import describe_swarm

    report = run_async(describe_swarm(model, bootstrap_list(bootstrap, peers_file)))
    reports = [report] if model is not None else report["models"]
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        for r in reports:
            _print_model(r, peers=model is not None)
        if model is None and not reports:
            click.echo(f"no model is served: {report['peers_answered']} of the {report['peers_asked']} peers "
                       "asked answered and serve none")
    if model is not None and not report["served"]:
        raise UserError(f"no live peer serves {model!r}"
                        + ("" if report["peers"] else " (no peer announces it on the DHT)"))
    if model is None and not reports:
        raise UserError("no model is served in this swarm")
    broken = [r["model"] for r in reports if r["uncovered_layers"]]
    if broken:
        raise UserError(f"no route: layers missing for {', '.join(broken)}")


def _print_model(r: dict, peers: bool) -> None:
    """One model's coverage line, after its peers when `peers`."""
    from .client.routing import _ranges as layer_ranges

    if peers:
        for p in r["peers"]:
            alive = f"{p['rtt_ms']:.1f} ms" if p["rtt_ms"] is not None else "unreachable"
            ours = r["local_weights"] in (None, p["weights"])
            how = "via relay" if p["relayed"] else "direct"
            click.echo(f"{p['peer_id']}  layers {p['start']:>3}:{p['end']:<3} {p['throughput']:8.1f} tok/s  "
                       f"free {p['free_cache_tokens']:>7} tok  {p['device']:4}  "
                       f"load {p['active_sessions']} sessions, {p['queued_positions']} queued  "
                       f"weights {p['weights'][:12] or '?':12}{'' if ours else ' (not ours)'}  {alive}  "
                       f"{p['reachability'] or 'unknown'}, {how}" + ("  BANNED" if p["banned"] else ""))
        for peer, why in r["incompatible"].items():
            click.echo(f"{peer}  skipped: {why}")
    for b in r["banned"]:
        until = time.strftime("%Y-%m-%d %H:%M", time.localtime(b["until"]))
        click.echo(f"banned here until {until}: {b['peer_id']} (layers {b['layers'][0]}:{b['layers'][1]}): {b['reason']}")
    live = sum(p["rtt_ms"] is not None for p in r["peers"])
    missing = r["uncovered_layers"]
    state = ("not served" if not r["served"] else "fully covered" if not missing
             else f"NOT covered: layers {layer_ranges(missing)}")
    click.echo(f"{r['model']}: {r['num_layers']} layers, {live} live server{'s' * (live != 1)}, {state}")

