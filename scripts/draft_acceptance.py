"""How a draft compression trades acceptance for draft time (models/compression.py).

Runs the target in this process (one span, no network) with a fixed chain of k drafts, greedy,
without overlap, over the first N problems of a dataset, and prints per problem the accepted drafts
per round, then the mean and the median draft time per token. Compare settings back to back:

    python scripts/draft_acceptance.py --dataset gsm8k --prompts 4 --no-draft-int8 --draft-vocab 0
    python scripts/draft_acceptance.py --dataset gsm8k --prompts 4   # the CPU default
    python scripts/draft_acceptance.py --dataset gsm8k --prompts 4 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

import torch

from dsdnode.bench.datasets import DEFAULT_GSM8K_STYLE, GSM8K_STYLES
from dsdnode.bench.runner import load_prompts
from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.loading import load_client_models
from dsdnode.client.local import LocalChain
from dsdnode.models.span import Span
from dsdnode.models.weights import load_config
from dsdnode.speculative.controller import ControllerSettings
from dsdnode.speculative.draft import Drafter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b")
    p.add_argument("--dataset", choices=["humaneval", "gsm8k"], default="gsm8k")
    p.add_argument("--gsm8k-style", choices=GSM8K_STYLES, default=DEFAULT_GSM8K_STYLE)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--draft-int8", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--draft-vocab", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the bench's client default is 1)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    m = load_client_models(a.model, a.draft, "bfloat16", "cpu", a.draft_int8, a.draft_vocab)
    target = [Span.load(m.target_dir, 0, load_config(m.target_dir).num_hidden_layers, m.dtype, "cpu")]
    settings = GenerationSettings(max_new_tokens=a.max_new_tokens, overlap=False,
                                  controller=ControllerSettings(k_fixed=a.k, k_max=max(a.k, 1)))
    accepted, full_rounds, per_token = 0, 0, []
    print(f"draft {a.draft} ({m.draft_compression.describe()}), target {a.model}, k = {a.k}, {a.dataset}")
    for prompt in load_prompts(m.tokenizer, (a.dataset,), a.prompts, a.gsm8k_style):
        drafter = Drafter(m.draft_head, m.draft_spans, len(prompt.ids) + a.max_new_tokens + a.k + 2, settings.sampling)
        result = asyncio.run(Generator(m.head, LocalChain(target), drafter, settings, m.eos_ids).generate(prompt.ids))
        rounds = [r for r in result.rounds[1:] if r.k == a.k]  # the first round's draft includes its warm-up
        accepted += sum(r.accepted for r in rounds)
        full_rounds += len(rounds)
        per_token += [r.draft_s / r.k for r in rounds]
        print(f"  {a.dataset}/{prompt.index}: {sum(r.accepted for r in rounds) / max(1, len(rounds)):.2f} "
              f"accepted per round of k = {a.k} ({len(rounds)} rounds)", flush=True)
    print(f"mean {accepted / max(1, full_rounds):.2f} accepted per round, draft "
          f"{1e3 * statistics.median(per_token):.1f} ms per token (median)")


if __name__ == "__main__":
    main()
