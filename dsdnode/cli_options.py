"""Flags and flag types several `dsdnode` commands share: which models and chain a client uses,
how it generates, and where it computes."""

from __future__ import annotations

import click

from .cli_common import K_LIMIT, DraftLength, FiniteFloatRange
from .config import DEVICE_PATTERN, DEVICE_SYNTAX
from .dtypes import HIDDEN_DTYPES

DEVICE_HELP = "Where to compute: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."
DTYPE_HELP = "Compute dtype [default: bfloat16; on CUDA float16 where the card has no bfloat16; float16 on MPS]."


class DeviceType(click.ParamType):
    """--device: spelled like a device (whether it exists here is checked when the models load)."""

    name = "device"

    def get_metavar(self, *_args, **_kwargs) -> str:
        return "[auto|cpu|cuda|cuda:N|mps]"

    def convert(self, value, param, ctx):
        import re

        if isinstance(value, str) and re.fullmatch(DEVICE_PATTERN, value.strip().lower()):
            return value.strip().lower()
        self.fail(f"{value!r} is not one of {DEVICE_SYNTAX}.", param, ctx)


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
        click.option("--audit/--no-audit", default=True, show_default=True,
                     help="Have other servers recheck the swarm's work; tokens are shown once checked."),
        click.option("--require-audit", is_flag=True,
                     help="Refuse rather than return text some layers of which no independent server could audit."),
        click.option("--wire", type=click.Choice(["exact", "int8"]), default="exact", show_default=True,
                     help="Hidden states between hops: exact (lossless), or int8 with a scale per 64 values "
                          "(lossy: about a quarter of float32's bytes; the text may change, BENCHMARKS.md)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def generate_options(**flags):
    """The generation flags (already range-checked by click) as the library's typed GenerateOptions."""
    from .client.service import GenerateOptions

    return GenerateOptions(**flags)


def client_options(fn):
    """Flags of every command that runs a client: which models, which chain (local or swarm)."""
    options = [
        click.option("--model", default="qwen2.5-coder-1.5b", show_default=True,
                     help="Target model (name or directory)."),
        click.option("--draft", default=None, help="Draft model (default: the registry's pairing). With none that "
                     "shares the target's vocabulary, drafts come from prompt lookup."),
        click.option("--local", is_flag=True, help="Run the target in this process as a chain of spans (no network)."),
        click.option("--hops", type=click.IntRange(min=1), default=4, show_default=True,
                     help="With --local: number of spans in the chain."),
        click.option("--link-latency-ms", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
                     help="Emulated latency of every link of the chain (N+1 links a round)."),
        click.option("--private-layers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Run the target's first N layers in this process, so no server sees token embeddings "
                          "(swarm only; costs their memory and compute here: README, Privacy)."),
        click.option("--bootstrap", multiple=True, help="Multiaddr of a swarm peer (repeatable)."),
        click.option("--peers", "peers_file", type=click.Path(dir_okay=False), help="File of bootstrap multiaddrs."),
        click.option("--device", type=DeviceType(), default="auto", show_default=True, help=DEVICE_HELP),
        click.option("--dtype", type=click.Choice(HIDDEN_DTYPES), default=None, help=DTYPE_HELP),
        click.option("--threads", type=click.IntRange(min=0), default=0, help="torch threads (0: all cores)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return draft_compression_options(fn)


def draft_compression_options(fn):
    """--draft-int8 and --draft-vocab (models/compression.py): a cheaper draft, the same text."""
    fn = click.option("--draft-vocab", type=click.IntRange(min=0), default=None,
                      help="Draft only the N most frequent tokens (0: all) [default: 32768 on a CPU, else all].")(fn)
    return click.option("--draft-int8/--no-draft-int8", default=None,
                        help="Draft with int8 decoder layers [default: on a CPU]. The target checks every token: "
                             "the text stays the same, speed and acceptance change.")(fn)
