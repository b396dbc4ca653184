"""Does compressing hidden states on the wire pay for itself? Real hidden states of a real model at
the hop boundaries of a 4-hop split, for a real prompt:

- lossless: zlib (levels 1 and 6) and lzma, on the raw bytes and on byte-planes (every value's
  high bytes first: the exponent bytes of bf16/fp32 repeat a lot): ratio and compress + decompress
  time, and the uplink rate below which the time saved sending fewer bytes exceeds the CPU time
  (break-even: saved_bytes / rate = compress + decompress time);
- lossy int8 blockwise (absmax scale per block of 64 values, sent as float16): the bytes, and the
  accuracy cost: how often the target's greedy token (final logits' argmax) changes at the prompt's
  positions when every hop boundary's hidden states are rounded this way.

    PYTHONPATH=. python scripts/wire_compression.py --model smollm2-135m --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import lzma
import time
import zlib

import torch

from dsdnode.bench.datasets import load_dataset
from dsdnode.client.local import split_layers
from dsdnode.models.fetch import resolve_model_dir
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.models.weights import load_config

BLOCK = 64


def byte_planes(data: bytes, width: int) -> bytes:
    """The bytes of every value's most significant byte first, then the next (little-endian input)."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, width)
    return t.flip(1).t().contiguous().numpy().tobytes()


def int8_blockwise(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Round x through int8 with one float16 absmax scale per BLOCK values; (rounded x, wire bytes)."""
    flat = x.float().reshape(-1, BLOCK)
    scale = (flat.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12).half().float()
    q = (flat / scale).round().clamp(-127, 127)
    return (q * scale).reshape(x.shape).to(x.dtype), q.numel() + 2 * scale.numel()


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
    print(json.dumps({"model": args.model, "dtype": args.dtype, "hops": args.hops, "positions": len(ids),
                      "hidden_size": boundaries[0].shape[-1], "boundary_mb": round(len(raw) / 1e6, 3),
                      "lossless": rows,
                      "int8_blockwise": {"block": BLOCK, "ratio": round(q_bytes / len(raw), 3),
                                         "greedy_token_agreement": round(agree, 4),
                                         "positions_changed": int((exact != rounded).sum())}}, indent=1))


if __name__ == "__main__":
    main()
