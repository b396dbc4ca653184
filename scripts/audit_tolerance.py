"""How far an honest hop's outputs lie from an auditor's, and which perturbations an audit catches.

A hop computes its span block by block, with drafts that are rolled back; an auditor recomputes the
same positions as one catch-up block. Their outputs differ by rounding alone. This script measures
that honest spread per layer range on real text (the model's own embeddings of code prompts), in
float32 and bfloat16 -- from the second range on also chained (a chain of hops vs a chain of
auditors, the differences accumulated from layer 0: what a shadow route's comparisons see) -- then perturbs the hop's outputs by a relative L2 of 1 %, 2 % and 5 % per
position (a random direction) and reports how often each check catches it:
  - per position: relative L2 difference > the shipped tolerance (client/audit.py TOLERANCE);
  - window mean: the mean relative L2 difference over an audit window of positions > 2x the largest
    honest window mean measured here, and > the shipped window bound (client/audit.py WINDOW_TOLERANCE);
  - top-1 (the last range only): the LM head's top token of the final hidden state differs from the
    auditor's on some position of the window.
Run: PYTHONPATH=. python scripts/audit_tolerance.py --model smollm2-135m"""

from __future__ import annotations

import argparse
import random

import torch

from dsdnode.client.audit import TOLERANCE, WINDOW_TOLERANCE, relative_diff
from dsdnode.models.fetch import resolve_model_dir
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.models.weights import load_config

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def main():\n    for i in range(10):\n        print(i, fibonacci(i))\n",
    "import json\n\nclass Store:\n    def __init__(self, path):\n        self.path = path\n        self.items = {}\n\n"
    "    def save(self):\n        with open(self.path, 'w') as f:\n            json.dump(self.items, f)\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Let's think step by step.",
    "SELECT name, COUNT(*) AS n FROM orders JOIN customers ON orders.customer_id = customers.id "
    "GROUP BY name HAVING n > 3 ORDER BY n DESC;",
]


def as_hop(span: Span, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """A hop's outputs, computed in blocks of 1-6 after rolled-back drafts."""
    n = x.shape[1]
    hop = span.new_cache(n + 8)
    out = torch.zeros_like(x)
    first = min(8, n)
    out[:, :first] = span(x[:, :first], hop, 0)
    pos = first
    while pos < n:
        t = min(rng.randint(1, 6), n - pos)
        span(torch.randn_like(x[:, :t]), hop, pos)  # drafts that were rejected
        out[:, pos:pos + t] = span(x[:, pos:pos + t], hop, pos)
        pos += t
    return out


def hop_and_audit(span: Span, x: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """(a hop's outputs; an auditor's, one block) for the same inputs."""
    return as_hop(span, x, rng), span(x, span.new_cache(x.shape[1] + 8), 0)


def perturb(out: torch.Tensor, rel: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(out.shape, generator=gen).float()
    noise = noise / noise.norm(dim=-1, keepdim=True) * out.float().norm(dim=-1, keepdim=True) * rel
    return (out.float() + noise).to(out.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--hops", type=int, default=2)
    ap.add_argument("--window", type=int, default=30, help="positions per audit (about 10 rounds)")
    ap.add_argument("--trials", type=int, default=20, help="perturbed windows per setting")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    n_layers = load_config(model_dir).num_hidden_layers
    bounds = [round(i * n_layers / args.hops) for i in range(args.hops + 1)]
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        head = Head.load(model_dir, dtype)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_dir)
        rng, gen = random.Random(0), torch.Generator().manual_seed(0)
        xs = [head.embed_tokens(tok(p)["input_ids"]) for p in PROMPTS]
        hs = xs  # a chain of hops' outputs (what a shadow route's mirror of the next hop is compared with)
        for a, b in zip(bounds, bounds[1:]):
            span = Span.load(model_dir, a, b, dtype)
            pairs = [hop_and_audit(span, x, rng) for x in xs]
            hs = [h if a == 0 else as_hop(span, x, rng) for x, (h, _) in zip(hs, pairs)]
            xs = [au for _, au in pairs]  # the next range's input: this range's (auditor's) output
            if a > 0:  # hops chained on hops vs auditors chained on auditors: differences accumulated from layer 0
                chained = [relative_diff(h, au) for h, (_, au) in zip(hs, pairs)]
                cat = torch.cat(chained)
                means = [d[i:i + args.window].mean() for d in chained for i in range(0, d.shape[0] - args.window + 1, 5)]
                print(f"{args.model} {dtype_name} layers 0:{b} chained (what a shadow route compares): honest "
                      f"relative L2 per position max {float(cat.max()):.2e} p99 {float(cat.quantile(0.99)):.2e} "
                      f"median {float(cat.median()):.2e}; largest {args.window}-position window mean "
                      f"{float(max(means)) if means else float(cat.mean()):.2e}")
            diffs = torch.cat([relative_diff(h, au) for h, au in pairs])
            windows = [relative_diff(h, au)[i:i + args.window].mean() for h, au in pairs
                       for i in range(0, h.shape[1] - args.window + 1, 5)]
            honest_window = float(max(windows)) if windows else float(diffs.mean())
            last = b == n_layers
            top1_honest = ([bool((head.logits(h).argmax(-1) == head.logits(au).argmax(-1)).all()) for h, au in pairs]
                           if last else [])
            print(f"{args.model} {dtype_name} layers {a}:{b}: honest relative L2 per position max {float(diffs.max()):.2e} "
                  f"p99 {float(diffs.quantile(0.99)):.2e} median {float(diffs.median()):.2e}; "
                  f"largest {args.window}-position window mean {honest_window:.2e}"
                  + (f"; honest top-1 agreement on all positions in {sum(top1_honest)}/{len(top1_honest)} prompts"
                     if last else ""))
            for rel in (0.01, 0.02, 0.05):
                caught = {"position": 0, "window": 0, "shipped": 0, "top1": 0}
                for _ in range(args.trials):
                    h, au = pairs[rng.randrange(len(pairs))]
                    i = rng.randrange(max(1, h.shape[1] - args.window + 1))
                    hop_w, aud_w = perturb(h[:, i:i + args.window], rel, gen), au[:, i:i + args.window]
                    d = relative_diff(hop_w, aud_w)
                    caught["position"] += bool((d > TOLERANCE[dtype_name]).any())
                    caught["window"] += bool(d.mean() > 2 * honest_window)
                    caught["shipped"] += bool(d.mean() > WINDOW_TOLERANCE[dtype_name])
                    if last:
                        caught["top1"] += bool((head.logits(hop_w).argmax(-1) != head.logits(aud_w).argmax(-1)).any())
                print(f"  perturbation {rel:.0%}: caught per position (tolerance {TOLERANCE[dtype_name]:g}) "
                      f"{caught['position']}/{args.trials}, by window mean (> {2 * honest_window:.2e}) "
                      f"{caught['window']}/{args.trials}, by the shipped window bound (> {WINDOW_TOLERANCE[dtype_name]:g}) "
                      f"{caught['shipped']}/{args.trials}"
                      + (f", by top-1 {caught['top1']}/{args.trials}" if last else ""))


if __name__ == "__main__":
    main()
