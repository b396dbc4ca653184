"""`dsdnode start` (serve layers, or the DHT only: server/node.py) and `dsdnode swarm` (who serves what)."""

from __future__ import annotations

import json
import time

import click

from .cli_common import UserError, friendly, run_async, setting_type
from .cli_options import DEVICE_HELP, DTYPE_HELP, DeviceType
from .config import NodeSettings, bootstrap_list, load_settings


def node_type(name: str) -> click.ParamType:
    """The type of the `start` flag for NodeSettings.`name`: the range its config key has."""
    return setting_type(NodeSettings, name)


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
@click.option("--link-config", default=None,
              help="TOML file with a [links] table (per-peer delays, jitter, uplink cap) to emulate WAN links; "
                   "replaces --link-latency-ms. `dsdnode bench --wan` writes these.")
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
@click.option("--max-sessions-per-network", type=node_type("max_sessions_per_network"), default=None,
              help="Open sessions the peers of one /24 (IPv6: /48) may hold here; past it: busy [default: 32].")
@click.option("--max-cache-share", type=node_type("max_cache_share"), default=None,
              help="Share of the KV cache budget one client, and one /24 (/48), may hold [default: 0.5].")
@click.option("--local-swarm", "local_swarm", is_flag=True, default=None,
              help="A swarm on one machine or a private network: allow loopback and private next-hop and relay "
                   "addresses, and count each loopback peer as a network of its own (tests, bench, demo).")
@click.option("--parent-pid", type=node_type("parent_pid"), default=None,
              help="Shut down (as on SIGTERM) once this process is gone; for launchers of local swarms.")
@click.option("--relay-service/--no-relay-service", "relay_service", default=None,
              help="Offer a circuit relay to peers behind NATs while this node is publicly reachable "
                   "[default: on]; its limits are the relay_* keys of --config.")
@click.option("--assume-private", "assume_private", is_flag=True, default=None,
              help="Skip the reachability check and act as a node nobody can dial: reserve relay slots and "
                   "announce only relay addresses (to measure relayed servers on one machine).")
@friendly
def start(config_file, peers_file, **flags):
    """Serve a span of a model's layers to the swarm until SIGTERM."""
    from .server.node import run_node

    settings = load_settings(NodeSettings, config_file, peers_file=peers_file, **flags)
    run_async(run_node(settings))


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
    from .client.routing import layer_ranges

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

