"""Does compressing hidden states on the wire pay for itself? Real hidden states of a real model at
the hop boundaries of a 4-hop split, for a real prompt:

- lossless: zlib (levels 1 and 6) and lzma, on the raw bytes and on byte-planes (every value's
  high bytes first: the exponent bytes of bf16/fp32 repeat a lot): ratio and compress + decompress
  time, and the uplink rate below which the time saved sending fewer bytes exceeds the CPU time
  (break-even: saved_bytes / rate = compress + decompress time);
- lossy int8 blockwise (the opt-in `--wire int8`, net/wire.py: absmax scale per block of 64
  values, sent as float16): the bytes, the per-position relative L2 difference it makes at the
  boundaries (what audits must tolerate), and the accuracy cost: how often the target's greedy
  token (final logits' argmax) changes at the prompt's positions when every hop boundary's hidden
  states are rounded this way;
- with --agreement N: greedy decoding of N problems per dataset (HumanEval, GSM8K) for
  --new-tokens tokens over in-process spans whose links are exact and then int8 (client/local.py
  rounds at every link as a swarm session does), the tokens equal up to the first divergence and
  there the lossless target's top-2 logit gap; and the bytes a round's block takes per hop.

    PYTHONPATH=. python scripts/wire_compression.py --model smollm2-135m --dtype bfloat16
    PYTHONPATH=. python scripts/wire_compression.py --model smollm2-135m --dtype float32 --agreement 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import lzma
import sys
import time
import zlib

import torch

from dsdnode.bench.datasets import load_dataset
from dsdnode.bench.runner import load_prompts
from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.local import LocalChain, split_layers
from dsdnode.models.fetch import resolve_model_dir
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.models.weights import load_config
from dsdnode.net.wire import INT8_BLOCK, INT8_BLOCKS, TensorPayload, payload_bytes


def byte_planes(data: bytes, width: int) -> bytes:
    """The bytes of every value's most significant byte first, then the next (little-endian input)."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, width)
    return t.flip(1).t().contiguous().numpy().tobytes()


def int8_blockwise(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as the int8 wire delivers it, and its payload bytes."""
    payload = TensorPayload.int8_blocks(x)
    return payload.to_torch().to(x.dtype), len(payload.data)


def agreement(head, spans, tok, problems: int, new_tokens: int) -> dict:
    """Greedy text over exact links and over int8 links, problem by problem (module doc)."""
    def decode(wire: str, ids: list[int]) -> list[int]:
        settings = GenerationSettings(max_new_tokens=new_tokens, speculative=False)
        return asyncio.run(Generator(head, LocalChain(spans, wire=wire), None, settings, eos_ids=set()).generate(ids)).tokens

    def top2_gap(ids: list[int]) -> float:
        hidden = head.embed_tokens(ids)
        for span in spans:
            hidden = span(hidden, span.new_cache(len(ids)), 0)
        top = head.logits(hidden)[-1].float().topk(2).values
        return float(top[0] - top[1])

    rows = []
    for p in load_prompts(tok, ("humaneval", "gsm8k"), problems):
        exact, rounded = decode("exact", p.ids), decode("int8", p.ids)
        first = next((i for i, (a, b) in enumerate(zip(exact, rounded)) if a != b), None)
        rows.append({"problem": f"{p.problem.dataset}/{p.index}", "identical": first is None,
                     "first_divergence": first,
                     "top2_gap_there": None if first is None else round(top2_gap(p.ids + exact[:first]), 4)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    same = [r["first_divergence"] if r["first_divergence"] is not None else new_tokens for r in rows]
    return {"problems": len(rows), "new_tokens": new_tokens, "identical": sum(r["identical"] for r in rows),
            "tokens_before_divergence": sum(same), "tokens": new_tokens * len(rows), "rows": rows}


def round_bytes(hidden_size: int) -> dict:
    """A round's block per hop (the hidden payload only), by the positions it carries."""
    return {str(t): {"float32": payload_bytes("float32", (1, t, hidden_size)),
                     "bfloat16": payload_bytes("bfloat16", (1, t, hidden_size)),
                     "int8": payload_bytes(INT8_BLOCKS, (1, t, hidden_size))} for t in (1, 9, 33)}


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--hops", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--agreement", type=int, default=0, help="problems per dataset to decode both ways (0: none)")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    model_dir = resolve_model_dir(args.model)
    n_layers = load_config(model_dir).num_hidden_layers
    spans = [Span.load(model_dir, a, b, dtype) for a, b in split_layers(n_layers, args.hops)]
    head = Head.load(model_dir, dtype)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "".join(p.prompt for p in load_dataset("humaneval", 20))
    ids = tok(text, add_special_tokens=False)["input_ids"][:args.tokens]

    def run(rounding) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden, boundaries = head.embed_tokens(ids), []
        for i, span in enumerate(spans):
            hidden = span(hidden, span.new_cache(len(ids)), 0)
            if i < len(spans) - 1:
                boundaries.append(hidden)
                hidden = rounding(hidden)
        return head.logits(hidden)[0].argmax(-1), boundaries

    with torch.no_grad():
        exact, boundaries = run(lambda h: h)
        rounded, _ = run(lambda h: int8_blockwise(h)[0])
    agree = float((exact == rounded).float().mean())
    raw = b"".join(h.contiguous().view(torch.uint8).numpy().tobytes() for h in boundaries)
    width = boundaries[0].element_size()
    rows = []
    for name, pack, unpack in (("zlib-1", lambda b: zlib.compress(b, 1), zlib.decompress),
                               ("zlib-6", lambda b: zlib.compress(b, 6), zlib.decompress),
                               ("lzma-0", lambda b: lzma.compress(b, preset=0), lzma.decompress)):
        for planes in (False, True):
            data, t_planes = timed(byte_planes, raw, width) if planes else (raw, 0.0)
            packed, t_pack = timed(pack, data)
            _, t_unpack = timed(unpack, packed)
            cpu_s = t_pack + t_unpack + 2 * t_planes  # planes are undone at the other end too
            saved = len(raw) - len(packed)
            rows.append({"codec": name + ("+byte-planes" if planes else ""), "ratio": round(len(packed) / len(raw), 3),
                         "cpu_ms_per_mb": round(1e3 * cpu_s / (len(raw) / 1e6), 1),
                         "pays_below_mbit_s": round(8 * saved / cpu_s / 1e6, 1) if saved > 0 else 0.0})
    q_bytes = sum(int8_blockwise(h)[1] for h in boundaries)
    rel = torch.cat([((int8_blockwise(h)[0].float() - h.float()).norm(dim=-1) / h.float().norm(dim=-1))[0]
                     for h in boundaries])
    print(json.dumps({"model": args.model, "dtype": args.dtype, "hops": args.hops, "positions": len(ids),
                      "hidden_size": boundaries[0].shape[-1], "boundary_mb": round(len(raw) / 1e6, 3),
                      "lossless": rows,
                      "int8_blockwise": {"block": INT8_BLOCK, "ratio": round(q_bytes / len(raw), 3),
                                         "greedy_token_agreement": round(agree, 4),
                                         "positions_changed": int((exact != rounded).sum()),
                                         "relative_l2_max": round(float(rel.max()), 5),
                                         "relative_l2_mean": round(float(rel.mean()), 5)},
                      "round_bytes_per_hop": round_bytes(boundaries[0].shape[-1]),
                      "greedy_agreement": agreement(head, spans, tok, args.agreement, args.new_tokens)
                      if args.agreement else None}, indent=1))


if __name__ == "__main__":
    main()
