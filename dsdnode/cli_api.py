"""`dsdnode api`: serve a model through an OpenAI-compatible HTTP API, backed by the swarm."""

from __future__ import annotations

import logging

import click

from .cli_common import K_LIMIT, FiniteFloatRange, friendly, lookup_notice, run_async
from .cli_options import client_options
from .config import bootstrap_list


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (0.0.0.0 for all interfaces).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Listen port (0: any free port).")
@client_options
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Largest max_tokens a request may ask for (also the chat default).")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Longest prompt accepted, in tokens.")
@click.option("--k-max", type=click.IntRange(min=1, max=K_LIMIT), default=8, show_default=True,
              help="Longest draft block when a request uses dsd_k='auto'.")
@click.option("--tau", type=FiniteFloatRange(0, 1), default=0.3, show_default=True,
              help="Adaptive verification (requests with adaptive=true): accept a non-key token with "
                   "p >= tau * p(top).")
@click.option("--overlap/--no-overlap", default=True, show_default=True,
              help="Draft the next block while the current one is in flight.")
@click.option("--api-key", envvar="DSDNODE_API_KEY", show_envvar=True, default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health (401 without it). Prefer the "
                   "environment variable: a flag shows in the process list.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=4, show_default=True,
              help="Generations running at once; more wait in a queue.")
@click.option("--max-queued", type=click.IntRange(min=0), default=16, show_default=True,
              help="Generations waiting for a place; beyond it: 429 with Retry-After.")
@friendly
def api(host, port, model, draft, draft_int8, draft_vocab, local, hops, link_latency_ms, private_layers, bootstrap,
        peers_file, device, dtype, threads, max_tokens_limit, max_prompt_tokens, k_max, tau, overlap, api_key,
        max_concurrent, max_queued):
    """Serve MODEL at /v1/completions, /v1/chat/completions and /v1/models (OpenAI's API), with
    /health (liveness), /ready (a route through the swarm exists) and /metrics (Prometheus).

    Every request is its own session on the swarm (or on an in-process chain with --local);
    our knobs ride in the request body: dsd_k ("auto" or a draft length, 0 = no drafting) and
    adaptive (bool). A request with a seed and temperature > 0 is reproducible: it drafts without
    overlap and with a fixed draft length (dsd_k, or 4 for "auto")."""
    if api_key is not None and not api_key.strip():
        raise click.BadParameter("the API key is empty", param_hint="--api-key / DSDNODE_API_KEY")
    import torch

    from .api.engine import Engine, EngineSettings
    from .api.guard import GuardSettings
    from .api.server import serve
    from .client.service import build_service, check_context

    if threads:
        torch.set_num_threads(threads)
    service = build_service(model, bootstrap=bootstrap_list(bootstrap, peers_file), local=local, hops=hops,
                            draft=draft or True, dtype=dtype, device=device, link_latency_ms=link_latency_ms,
                            draft_int8=draft_int8, draft_vocab=draft_vocab, private_layers=private_layers)
    if service.models.draft_fallback:
        click.echo(lookup_notice(service.models.draft_fallback), err=True)
    check_context(service.models.head.config, max_prompt_tokens + max_tokens_limit,
                  f"--max-prompt-tokens {max_prompt_tokens} and --max-tokens-limit {max_tokens_limit}")
    settings = EngineSettings(k_max=k_max, tau=tau, overlap=overlap, max_tokens_limit=max_tokens_limit,
                              max_prompt_tokens=max_prompt_tokens)
    log_level = "info" if logging.getLogger().getEffectiveLevel() <= logging.INFO else "warning"
    guard = GuardSettings.for_prompts(max_prompt_tokens, api_key=api_key, max_concurrent=max_concurrent,
                                      max_queued=max_queued)
    run_async(serve(Engine(model, service, settings), host, port, log_level, guard))
