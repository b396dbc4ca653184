"""`dsdnode bench`: throughput, speedup and accuracy of every decoding mode over a real local swarm."""

from __future__ import annotations

import shlex
import sys
from datetime import datetime
from pathlib import Path

import click

from .cli_common import K_LIMIT, FiniteFloatRange, friendly
from .cli_options import DEVICE_HELP, DTYPE_HELP, DeviceType, draft_compression_options
from .bench.datasets import DEFAULT_GSM8K_STYLE, GSM8K_STYLES
from .dtypes import HIDDEN_DTYPES

class ClientCounts(click.ParamType):
    """--clients: a comma list of client counts >= 1, e.g. 1,2,4,8."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            counts = tuple(int(x) for x in str(value).split(",") if x.strip())
        except ValueError:
            counts = ()
        if not counts or min(counts) < 1:
            self.fail(f"expected client counts >= 1 like 1,2,4,8, got {value!r}.", param, ctx)
        return counts


QUICK = dict(model="smollm2-135m", draft="smollm2-135m", servers=3, prompts=2, max_new_tokens=24,
             modes="ar-push,dsd-k4,dsd-auto", latencies=(10.0,), dtype="float32", draft_int8=False, draft_vocab=0)


@click.command()
@click.option("--model", default="qwen2.5-coder-1.5b", show_default=True, help="Target model, split across servers.")
@click.option("--draft", default="qwen2.5-coder-0.5b", show_default=True, help="Draft model, on the client.")
@click.option("--servers", type=click.IntRange(min=1), default=4, show_default=True, help="Server processes (contiguous even spans).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Servers per span (auditing needs at least 2; a third settles a disputed audit).")
@click.option("--link-latency-ms", "latencies", type=FiniteFloatRange(min=0), multiple=True,
              help="Emulated one-way latency of every link; repeat for a sweep (a fresh swarm each). [default: 50]")
@click.option("--wan", default=None, metavar="PROFILE",
              help="Emulate WAN links instead of --link-latency-ms: lan, metro, continental, intercontinental, "
                   "home-uplink, or a TOML file with a [wan] table (per-pair delays from a real city RTT matrix, "
                   "jitter, uplink caps; see dsdnode/net/wan.py).")
@click.option("--wire", type=click.Choice(["exact", "int8"]), default="exact", show_default=True,
              help="Hidden states between hops in every mode: exact (lossless), or int8 with a scale per 64 values "
                   "(lossy; the modes are then compared with ar-push over the same int8 wire).")
@click.option("--prefill", type=click.Choice(["pipelined", "sequential"]), default="pipelined", show_default=True,
              help="Send a prompt's chunks back to back (the hops overlap them) or each after the last came back "
                   "(to compare time to first token).")
@click.option("--dataset", type=click.Choice(["humaneval", "gsm8k", "both"]), default="both", show_default=True)
@click.option("--gsm8k-style", type=click.Choice(GSM8K_STYLES), default=DEFAULT_GSM8K_STYLE, show_default=True,
              help="How GSM8K answers are asked for: 'steps', the model's own step-by-step answer (the setting of "
                   "published speculative-decoding speeds; long answers, cut at --max-new-tokens), or 'brief', "
                   "the key calculations only (short whole answers, for accuracy runs).")
@click.option("--prompts", type=click.IntRange(min=1), default=20, show_default=True, help="Problems per dataset (the first N).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@click.option("--modes", default="ar-push,ar-relay,dsd-k2,dsd-k4,dsd-k8,dsd-auto,dsd-auto-av,dsd-tree,dsd-tree-av,"
                                 "hf-assisted",
              show_default=True, help="Comma list: ar-push (baseline), ar-relay, dsd-k<K>, dsd-auto, dsd-auto-noaudit, "
                                      "dsd-auto-av, dsd-tree, dsd-tree-av (token trees and prompt lookup), dsd-tree-ssd (dsd-tree "
                                      "drafting ahead for up to 2 likely rejections too, where the measured odds say it "
                                      "pays), dsd-tree-ssd-always (for 2 in every round), hf-assisted.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output directory [default: bench-results/<timestamp>].")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch threads per server process.")
@click.option("--client-threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch threads of the client.")
@click.option("--device", type=DeviceType(), default="auto", show_default=True,
              help=DEVICE_HELP + " The client's and every server's.")
@click.option("--dtype", type=click.Choice(HIDDEN_DTYPES), default=None, help=DTYPE_HELP)
@click.option("--k-max", type=click.IntRange(1, K_LIMIT), default=8, show_default=True, help="Longest block for the dsd-auto modes.")
@click.option("--tau", type=FiniteFloatRange(0, 1), default=0.3, show_default=True,
              help="Adaptive verification threshold (dsd-auto-av).")
@click.option("--clients", "clients", type=ClientCounts(), default=None,
              help="Many clients at once instead of the modes: for each count N (e.g. 1,2,4,8), N concurrent clients "
                   "(dsd-auto, or the one mode --modes names; the first --link-latency-ms), with batching on and "
                   "then off at the servers.")
@click.option("--relayed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Reach the last N servers only through a relay, as servers behind a NAT are (on loopback: "
                   "they act private with --assume-private; the relay adds one emulated link).")
@draft_compression_options
@click.option("--resume", is_flag=True,
              help="Continue the run saved in --out (cut short: killed, out of time) with the same options and the "
                   "same dsdnode code: prompts it finished in every mode are kept, the others run again.")
@click.option("--quick", is_flag=True, help="A small smoke run: smollm2-135m as target and draft, 3 servers, 2 prompts "
                                            "per dataset, 24 tokens, ar-push,dsd-k4,dsd-auto at 10 ms, float32, "
                                            "an uncompressed draft (options given with it override these).")
@click.option("--overhead", is_flag=True, help="Instead: the per-hop software overhead -- a block of 8 positions of "
                                               "--model's width through chains of 1..--overhead-hops real server "
                                               "processes (one layer each, 0 ms latency), compute subtracted.")
@click.option("--overhead-hops", type=click.IntRange(2, 16), default=6, show_default=True,
              help="Longest chain of --overhead.")
@friendly
def bench(model, draft, servers, replicas, latencies, wan, wire, prefill, dataset, gsm8k_style, prompts, max_new_tokens, modes, out, threads,
          client_threads, device, dtype, k_max, tau, clients, relayed, draft_int8, draft_vocab, resume, quick, overhead,
          overhead_hops):
    """Run every mode over a local swarm of real processes; write results.json, results.md and plots to --out."""
    from .bench.runner import BenchConfig, BenchRun
    from .devices import default_dtype, resolve_device
    from .dtypes import dtype_name

    if resume and (out is None or clients is not None or overhead):
        raise click.BadParameter("--resume continues a run of the modes saved in --out: give --out, without "
                                 "--clients or --overhead", param_hint="--resume")
    if overhead:
        from .bench.overhead import OverheadConfig, run_overhead
        out = Path(out) if out else Path("bench-results") / datetime.now().strftime("overhead-%Y%m%d-%H%M%S")
        result = run_overhead(OverheadConfig(out, model, overhead_hops, dtype=dtype or "bfloat16"))
        click.echo(result.markdown())
        return
    source = click.get_current_context().get_parameter_source

    def given(name: str) -> bool:
        return source(name) == click.core.ParameterSource.COMMANDLINE

    if quick:  # its settings, except those given on the command line
        args = dict(model=model, draft=draft, servers=servers, prompts=prompts, max_new_tokens=max_new_tokens,
                    modes=modes, dtype=dtype, draft_int8=draft_int8, draft_vocab=draft_vocab)
        model, draft, servers, prompts, max_new_tokens, modes, dtype, draft_int8, draft_vocab = (
            value if given(name) else QUICK[name]
            for name, value in args.items())
        latencies = latencies or (QUICK["latencies"] if wan is None else ())
    if wan is not None:
        from .net.wan import load_profile
        if latencies:
            raise click.BadParameter("give --wan or --link-latency-ms, not both", param_hint="--wan")
        try:
            latencies = (round(load_profile(wan).mean_one_way_ms, 2),)  # the runs' label: mean one-way delay
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--wan") from None
    resolved = resolve_device(device)  # a missing device: one line, before any work
    dtype = dtype or dtype_name(default_dtype(resolved))
    out = Path(out) if out else Path("bench-results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    config = BenchConfig(out=out, model=model, draft=draft, servers=servers, replicas=replicas, latencies_ms=tuple(latencies or (50.0,)),
                         datasets=("humaneval", "gsm8k") if dataset == "both" else (dataset,),
                         gsm8k_style=gsm8k_style, prompts=prompts,
                         max_new_tokens=max_new_tokens, modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
                         threads=threads, client_threads=client_threads, dtype=dtype, device=device, k_max=k_max,
                         tau=tau, relayed=relayed, draft_int8=draft_int8, draft_vocab=draft_vocab, wan=wan,
                         prefill_pipeline=prefill == "pipelined", wire=wire)
    command = " ".join(["dsdnode", *map(shlex.quote, sys.argv[1:])]) if "bench" in sys.argv[1:] else \
        f"dsdnode bench (called in-process) {config}"
    if clients is not None and wan is not None:
        raise click.BadParameter("--wan applies to the modes run, not to --clients", param_hint="--wan")
    if clients is not None and relayed:
        raise click.BadParameter("--relayed applies to the modes run, not to --clients", param_hint="--relayed")
    if clients is not None:
        from .bench.clients import ClientsConfig, ClientsRun
        mode = "dsd-auto"
        if given("modes"):
            if len(config.modes) != 1:
                raise click.BadParameter("--clients runs one mode: name one, e.g. --modes ar-push", param_hint="'--modes'")
            mode = config.modes[0]
        run = ClientsRun(ClientsConfig(out=out, clients=clients, model=model, draft=draft,
                                       servers=servers, latency_ms=config.latencies_ms[0], datasets=config.datasets,
                                       gsm8k_style=gsm8k_style,
                                       max_new_tokens=max_new_tokens, threads=threads, client_threads=client_threads,
                                       dtype=dtype, device=device, k_max=k_max, mode=mode, draft_int8=draft_int8,
                                       draft_vocab=draft_vocab), command)
    else:
        run = BenchRun(config, command, resume=resume)
    run.run()
    click.echo(f"results: {out / 'results.md'}")
    click.echo((out / "results.md").read_text())
