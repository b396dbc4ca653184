"""`dsdnode demo` (what `make demo` runs): a local swarm of the default pair, DSD vs plain decoding.

Greedy DSD returns exactly the target's tokens in float32. The demo runs in the device's default
dtype (bfloat16 on a CPU), where a block of drafts and a single token are computed by different
kernels and round differently; where the target's two best next tokens are nearly tied, that can
flip the choice, and the texts part from there on. So where they part, the demo does not assume a
near-tie: it runs the target once more on the prompt and the plain text up to that token and prints
its two best logits there, and says whether they are within NEAR_TIE_LOGITS of each other."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

from .cli_common import FiniteFloatRange, friendly, run_async
from .cli_options import DEVICE_HELP, DeviceType

PROMPTS = [
    ("code", "Write a Python function is_prime(n) that returns True when n is a prime number."),
    # asked plainly, the model answers step by step, its natural style
    ("math", "A baker makes 24 muffins and sells them in boxes of 4 for $6 per box. "
             "How much money does the baker make?"),
]
# bfloat16 keeps 8 significant bits: a logit near 20 is stored to 0.125, and a block and a single
# token, rounded differently through every layer, can move logits by a few of those steps
NEAR_TIE_LOGITS = 0.5


@click.command()
@click.option("--model", default="qwen2.5-coder-1.5b", show_default=True)
@click.option("--servers", type=click.IntRange(min=1), default=4, show_default=True, help="Server processes in the local swarm.")
@click.option("--link-latency-ms", type=FiniteFloatRange(min=0), default=50.0, show_default=True, help="Emulated latency per link.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@click.option("--device", type=DeviceType(), default="auto", show_default=True,
              help=DEVICE_HELP + " The client's and every server's.")
@friendly
def demo(model, servers, link_latency_ms, max_new_tokens, device):
    """Start a local swarm, stream a code and a math answer with DSD, compare with plain decoding."""
    import torch

    from .local_swarm import LocalSwarm
    from .client.loading import default_draft
    from .client.local import split_layers
    from .devices import default_dtype, describe, resolve_device
    from .dtypes import dtype_name
    from .models.fetch import pull
    from .models.weights import load_config

    resolved = resolve_device(device)  # a missing device: one error line before any work
    dtype = dtype_name(default_dtype(resolved))
    click.echo(f"device: {describe(resolved)}, {dtype}", err=True)
    draft = default_draft(model)
    paths = {name: pull(name) for name in dict.fromkeys([model, draft])}
    for name, path in paths.items():
        click.echo(f"model {name}: {path}", err=True)
    torch.set_num_threads(1)
    spans = split_layers(load_config(paths[model]).num_hidden_layers, servers)
    click.echo(f"starting {servers} servers over layers {spans} with {link_latency_ms:g} ms per link ...", err=True)
    with tempfile.TemporaryDirectory(prefix="dsdnode-demo-") as work, \
            LocalSwarm(model, spans, Path(work), link_latency_ms=link_latency_ms, dtype=dtype,
                       extra_args=["--device", device]) as swarm:
        outcomes = run_async(_demo(model, swarm.bootstrap_addrs, link_latency_ms, max_new_tokens, device, dtype))
    click.echo("swarm stopped.", err=True)
    click.echo("summary: " + "; ".join(o.summary() for o in outcomes), err=True)


@dataclass(frozen=True)
class Outcome:
    """One prompt's comparison: DSD's speed over plain decoding's, and where their texts part."""

    kind: str
    speedup: float
    parted_at: int | None  # None: identical tokens
    gap: float | None = None  # the target's top-2 logit gap where they part

    def summary(self) -> str:
        if self.parted_at is None:
            same = "identical text"
        else:
            tie = "a near-tie" if self.gap < NEAR_TIE_LOGITS else "NOT a near-tie"
            same = f"texts part at token {self.parted_at}, top-2 gap {self.gap:.3f} ({tie})"
        return f"{self.kind} {self.speedup:.2f}x ({same})"


async def _demo(model, bootstrap, link_latency_ms, max_new_tokens, device, dtype) -> list[Outcome]:
    from .client.library import AsyncClient

    def show(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    outcomes = []
    async with await AsyncClient.connect(model, bootstrap=bootstrap, link_latency_ms=link_latency_ms,
                                         device=device) as client:
        for kind, prompt in PROMPTS:
            click.echo(f"\n=== {kind}: {prompt}\n--- DSD (adaptive k):", err=True)
            dsd = (await client.generate(prompt, max_new_tokens=max_new_tokens, k="auto", on_text=show)).result
            click.echo(f"\n[{dsd.summary()}]", err=True)
            click.echo("--- plain decoding over the same swarm (not shown) ...", err=True)
            plain = (await client.generate(prompt, max_new_tokens=max_new_tokens, k=0)).result
            speedup = dsd.tokens_per_s / plain.tokens_per_s
            click.echo(f"[{plain.summary()}]\nspeedup: {speedup:.2f}x "
                       f"({dsd.tokens_per_s:.2f} vs {plain.tokens_per_s:.2f} tok/s)", err=True)
            if plain.tokens == dsd.tokens:
                click.echo("identical text", err=True)
                outcomes.append(Outcome(kind, speedup, None))
                continue
            at = _first_difference(plain.tokens, dsd.tokens)
            outcome = Outcome(kind, speedup, at, await _report_parting(client, prompt, plain.tokens, dsd.tokens, at, dtype))
            outcomes.append(outcome)
    return outcomes


async def _report_parting(client, prompt: str, plain: list[int], dsd: list[int], at: int, dtype: str) -> float:
    """Where the texts part: the target's logits there (recomputed on the prompt and the plain text
    before that token), its two best tokens and their gap; returns the gap."""
    import torch

    tokenizer = client.service.models.tokenizer
    logits = await client.service.next_token_logits(client.encode(prompt) + plain[:at])
    top = torch.topk(logits, 2)
    (a, b), (la, lb) = top.indices.tolist(), top.values.tolist()
    gap = la - lb

    def name(t: int | None) -> str:
        return "the end" if t is None else repr(tokenizer.decode([t]))

    chosen = [(label, tokens[at] if at < len(tokens) else None) for label, tokens in (("plain", plain), ("DSD", dsd))]
    picks = ", ".join(f"{label} chose {name(t)}" + (f" ({logits[t].item():.3f})" if t is not None else "")
                      for label, t in chosen)
    verdict = (f"a near-tie (under {NEAR_TIE_LOGITS}): in {dtype} a block and a single token round differently "
               "and can flip it; greedy DSD is exact in float32" if gap < NEAR_TIE_LOGITS else
               "NOT a near-tie: the texts should not part here (please report it)")
    click.echo(f"texts part at token {at}: {picks}; the target's top two there: {name(a)} {la:.3f}, {name(b)} "
               f"{lb:.3f}, gap {gap:.3f}: {verdict}", err=True)
    return gap


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
