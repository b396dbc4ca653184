"""`dsdnode generate`: the client, over an in-process chain (--local) or the swarm."""

from __future__ import annotations

import asyncio
import sys

import click

from .cli_common import K_LIMIT, DraftLength, FiniteFloatRange, UserError, friendly, run_async
from .config import DTYPE_NAMES


def generation_options(fn):
    """Flags shared by every command that generates (generate, bench, api)."""
    options = [
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True),
        click.option("--temperature", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
                     help="0 = greedy."),
        click.option("--top-p", type=FiniteFloatRange(0, 1, min_open=True), default=1.0, show_default=True),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None),
        click.option("--k", "k", type=DraftLength(), default="auto", show_default=True,
                     help="Draft length: a number for fixed k, 'auto' to pick k each round, 0 for no drafting."),
        click.option("--k-max", type=click.IntRange(1, K_LIMIT), default=8, show_default=True),
        click.option("--adaptive/--strict", default=False, show_default=True,
                     help="Adaptive verification (lossy): relax acceptance for low-importance tokens."),
        click.option("--tau", type=FiniteFloatRange(0, 1), default=0.3, show_default=True,
                     help="Adaptive: accept a non-key draft token with p >= tau * p(top)."),
        click.option("--overlap/--no-overlap", default=True, show_default=True,
                     help="Draft the next block while the current one is in flight."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def generation_settings(max_new_tokens, temperature, top_p, seed, k, k_max, adaptive, tau, overlap):
    from .client.generate import GenerationSettings
    from .spec.controller import ControllerSettings
    from .spec.importance import AdaptiveSettings
    from .spec.sampling import SamplingSettings

    if k != "auto" and not str(k).isdigit():
        raise ValueError(f"--k must be a number or 'auto', got {k!r}")
    k_fixed = None if k == "auto" else int(k)
    return GenerationSettings(
        max_new_tokens=max_new_tokens,
        speculative=k_fixed != 0,
        overlap=overlap,
        sampling=SamplingSettings(temperature=temperature, top_p=top_p, seed=seed),
        controller=ControllerSettings(k_max=max(k_max, k_fixed or 1), k_fixed=k_fixed,
                                      k_initial=min(4, k_max) if k_fixed is None else 1),
        adaptive=AdaptiveSettings(enabled=adaptive, tau=tau),
    )


def client_options(fn):
    """Flags of every command that runs a client: which models, which chain (local or swarm)."""
    options = [
        click.option("--model", default="qwen2.5-coder-1.5b", show_default=True,
                     help="Target model (name or directory)."),
        click.option("--draft", default=None, help="Draft model (default: the registry's pairing)."),
        click.option("--local", is_flag=True, help="Run the target in this process as a chain of spans (no network)."),
        click.option("--hops", type=click.IntRange(min=1), default=4, show_default=True,
                     help="With --local: number of spans in the chain."),
        click.option("--link-latency-ms", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
                     help="Emulated latency of every link of the chain (N+1 links a round)."),
        click.option("--bootstrap", multiple=True, help="Multiaddr of a swarm peer (repeatable)."),
        click.option("--peers", "peers_file", type=click.Path(dir_okay=False), help="File of bootstrap multiaddrs."),
        click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="bfloat16", show_default=True),
        click.option("--threads", type=click.IntRange(min=0), default=0, help="torch threads (0: all cores)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command()
@click.argument("prompt")
@client_options
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the model's chat template.")
@click.option("--stats/--no-stats", default=False, help="Print per-round statistics.")
@generation_options
@friendly
def generate(prompt, model, draft, local, hops, link_latency_ms, bootstrap, peers_file, dtype, threads, raw, stats,
             **gen):
    """Generate text for PROMPT, streaming it, then print a summary line."""
    import torch

    from .client.loading import default_draft, encode_prompt, load_client_models

    if threads:
        torch.set_num_threads(threads)
    settings = generation_settings(**gen)
    draft = draft or default_draft(model)
    if settings.speculative and not draft:
        raise ValueError(f"no draft model for {model!r}: pass --draft or --k 0")
    client = load_client_models(model, draft if settings.speculative else None, dtype)
    ids = encode_prompt(client.tokenizer, prompt, chat=not raw)
    check_context(model, client.head.config, len(ids) + settings.max_new_tokens,
                  f"the prompt ({len(ids)} tokens) and --max-new-tokens {settings.max_new_tokens}")
    if local:
        chain = local_chain(client.target_dir, hops, link_latency_ms, dtype)
    else:
        from .cli_node import bootstrap_list
        from .client.loading import DTYPES
        from .client.swarm_chain import connect_chain
        chain = connect_chain(model, client.head.config, bootstrap_list(bootstrap, peers_file), DTYPES[dtype],
                              link_latency_ms)
    result = run_async(_generate(client, chain, settings, ids))
    click.echo()
    if stats:
        for i, r in enumerate(result.rounds):
            click.echo(f"round {i}: k={r.k} accepted={r.accepted} relaxed={r.relaxed} round={r.round_s*1e3:.1f}ms "
                       f"draft={r.draft_s*1e3:.1f}ms hops={[round(c*1e3, 1) for c in r.hop_compute_s]}ms", err=True)
    click.echo(result.summary(), err=True)


def check_context(model: str, config, tokens: int, what: str) -> None:
    """Refuse a generation longer than the model's context before any server is asked.

    `what` names the flags that add up to `tokens`. Servers may cap sessions shorter still: they
    refuse the session, and the client reports that."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and tokens > context:
        raise UserError(f"{what} come to {tokens} tokens, more than the context of {model} ({context} tokens)")


def local_chain(target_dir, hops, link_latency_ms, dtype):
    """The target split into `hops` in-process spans with emulated link latency (--local)."""
    from .client.loading import DTYPES
    from .client.local import LocalChain, split_layers
    from .models.span import Span
    from .models.weights import load_config

    n = load_config(target_dir).num_hidden_layers
    spans = [Span.load(target_dir, a, b, DTYPES[dtype]) for a, b in split_layers(n, hops)]
    return LocalChain(spans, link_latency_ms / 1000)


async def _generate(client, chain, settings, ids):
    if asyncio.iscoroutine(chain):  # a swarm chain joins the swarm inside the event loop
        chain = await chain
    try:
        return await run_generation(client, chain, settings, ids, sys.stdout)
    finally:
        if hasattr(chain, "shutdown"):
            await chain.shutdown()


async def run_generation(client, chain, settings, ids, out=None):
    """One generation over `chain` with a fresh drafter, streaming text to `out` if given."""
    from .client.generate import Generator
    from .client.streaming import TextStream
    from .spec.draft import Drafter

    drafter = None
    if settings.speculative:
        capacity = len(ids) + settings.max_new_tokens + settings.controller.k_max + 2
        drafter = Drafter(client.draft_head, client.draft_spans, capacity, settings.sampling)
    importance = client.importance() if settings.adaptive.enabled else None
    on_tokens = None
    if out is not None:
        on_tokens = TextStream(client.tokenizer, lambda text: (out.write(text), out.flush())).push
    gen = Generator(client.head, chain, drafter, settings, client.eos_ids, importance)
    return await gen.generate(ids, on_tokens=on_tokens)
