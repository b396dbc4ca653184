"""The target's top-2 logit gap at each token of its greedy answer to a chat prompt (transformers
alone, no swarm): where a gap is near 0, two decodings that round differently (a block of drafts vs
a single token in bfloat16) may part there. `dsdnode demo` checks the one token where its texts part;
this lists them all.

    python scripts/top2_gaps.py --model qwen2.5-coder-1.5b --dtype float32 --tokens 8 "A baker makes ..."
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsdnode.client.loading import encode_prompt
from dsdnode.models.fetch import resolve_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = encode_prompt(tokenizer, args.prompt, True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=args.tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    for i, logits in enumerate(out.logits):
        top = torch.topk(logits[0].float(), 2)
        first, second = (tokenizer.decode([int(t)]) for t in top.indices)
        print(f"token {i}: {first!r} {top.values[0]:.3f}, {second!r} {top.values[1]:.3f}, gap "
              f"{top.values[0] - top.values[1]:.3f}")


if __name__ == "__main__":
    main()
