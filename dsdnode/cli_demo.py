"""`dsdnode demo` (what `make demo` runs): a local swarm of the default pair, DSD vs plain decoding."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from .cli_common import FiniteFloatRange, friendly, run_async

PROMPTS = [
    ("code", "Write a Python function is_prime(n) that returns True when n is a prime number."),
    ("math", "A baker makes 24 muffins and sells them in boxes of 4 for $6 per box. "
             "How much money does the baker make? Answer with a short explanation."),
]


@click.command()
@click.option("--model", default="qwen2.5-coder-1.5b", show_default=True)
@click.option("--servers", type=click.IntRange(min=1), default=4, show_default=True, help="Server processes in the local swarm.")
@click.option("--link-latency-ms", type=FiniteFloatRange(min=0), default=50.0, show_default=True, help="Emulated latency per link.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@friendly
def demo(model, servers, link_latency_ms, max_new_tokens):
    """Start a local swarm, stream a code and a math answer with DSD, compare with plain decoding."""
    import torch

    from .bench.swarm import LocalSwarm
    from .client.local import split_layers
    from .client.loading import default_draft, load_client_models
    from .models.fetch import pull
    from .models.weights import load_config

    draft = default_draft(model)
    for name in dict.fromkeys([model, draft]):
        click.echo(f"model {name}: {pull(name)}", err=True)
    torch.set_num_threads(1)
    client = load_client_models(model, draft)
    spans = split_layers(load_config(client.target_dir).num_hidden_layers, servers)
    click.echo(f"starting {servers} servers over layers {spans} with {link_latency_ms:g} ms per link ...", err=True)
    with tempfile.TemporaryDirectory(prefix="dsdnode-demo-") as work, \
            LocalSwarm(model, spans, Path(work), link_latency_ms=link_latency_ms) as swarm:
        run_async(_demo(client, model, swarm.bootstrap_addrs, link_latency_ms, max_new_tokens))
    click.echo("swarm stopped.", err=True)


async def _demo(client, model, bootstrap, link_latency_ms, max_new_tokens):
    from .cli_generate import generation_settings, run_generation
    from .client.loading import DTYPES, encode_prompt
    from .client.swarm_chain import connect_chain

    def settings(k):
        return generation_settings(max_new_tokens, 0.0, 1.0, None, k, 8, False, 0.3, True)

    chain = await connect_chain(model, client.head.config, bootstrap, DTYPES["bfloat16"], link_latency_ms)
    try:
        for kind, prompt in PROMPTS:
            ids = encode_prompt(client.tokenizer, prompt)
            click.echo(f"\n=== {kind}: {prompt}\n--- DSD (adaptive k):", err=True)
            dsd = await run_generation(client, chain, settings("auto"), ids, sys.stdout)
            click.echo(f"\n[{dsd.summary()}]", err=True)
            click.echo("--- plain decoding over the same swarm (not shown) ...", err=True)
            plain = await run_generation(client, chain, settings("0"), ids, None)
            same = "identical text" if plain.tokens == dsd.tokens else (
                f"texts part at token {_first_difference(plain.tokens, dsd.tokens)}: in bfloat16 a block and a "
                f"single token round differently, so near-ties can flip; in float32 greedy DSD is exact")
            click.echo(f"[{plain.summary()}]\nspeedup: {dsd.tokens_per_s / plain.tokens_per_s:.2f}x "
                       f"({dsd.tokens_per_s:.2f} vs {plain.tokens_per_s:.2f} tok/s, {same})", err=True)
    finally:
        await chain.shutdown()


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
