"""`dsdnode generate`: the client, over an in-process chain (--local) or the swarm."""

from __future__ import annotations

import sys

import click

from .cli_common import friendly, lookup_notice, run_async
from .cli_options import client_options, generate_options, generation_options
from .config import bootstrap_list

@click.command()
@click.argument("prompt")
@client_options
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the model's chat template.")
@click.option("--stats/--no-stats", default=False, help="Print per-round statistics.")
@generation_options
@friendly
def generate(prompt, model, draft, draft_int8, draft_vocab, local, hops, link_latency_ms, private_layers, bootstrap,
             peers_file, device, dtype, threads, raw, stats, **gen):
    """Generate text for PROMPT, streaming it, then print a summary line."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    options = generate_options(**gen)
    connect = dict(bootstrap=bootstrap_list(bootstrap, peers_file), local=local, hops=hops,
                   draft=(draft or True) if options.speculative else False, dtype=dtype, device=device,
                   link_latency_ms=link_latency_ms, draft_int8=draft_int8, draft_vocab=draft_vocab,
                   private_layers=private_layers)
    out = run_async(_generate(model, connect, prompt, not raw, options))
    click.echo()
    if out.unaudited_layers:
        click.echo(unaudited_warning(out.unaudited_layers), err=True)
    if stats:
        for i, r in enumerate(out.result.rounds):
            click.echo(f"round {i}: k={r.k} accepted={r.accepted} relaxed={r.relaxed} round={r.round_s*1e3:.1f}ms "
                       f"draft={r.draft_s*1e3:.1f}ms hops={[round(c*1e3, 1) for c in r.hop_compute_s]}ms", err=True)
    click.echo(out.result.summary(), err=True)


def unaudited_warning(layers: list[tuple[int, int]]) -> str:
    """The one line that tells a user some of the text was computed by servers no one checked."""
    spans = ", ".join(f"{a}:{b}" for a, b in layers)
    return (f"warning: layers {spans} were not audited (no server of another network group could recompute "
            f"them); --require-audit refuses instead")


async def _generate(model, connect, prompt, chat, options):
    from .client.library import AsyncClient

    async with await AsyncClient.connect(model, **connect) as client:
        if options.speculative and client.service.models.draft_fallback:
            click.echo(lookup_notice(client.service.models.draft_fallback), err=True)
        return await client.generate(prompt, options, chat=chat,
                                     on_text=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
