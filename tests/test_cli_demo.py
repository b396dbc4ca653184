"""`dsdnode demo`'s check of where the DSD and plain texts part: the target's top-2 gap there, from
the real SmolLM2 weights on an in-process chain (the demo itself needs a multi-process swarm of the
1.5B target: `make demo`)."""

from __future__ import annotations

import asyncio

import pytest

import dsdnode
from dsdnode.cli_demo import NEAR_TIE_LOGITS, Outcome, _first_difference, _report_parting

MODEL = "smollm2-135m"
PROMPT = "Count to five:"


def test_a_parting_is_reported_with_the_targets_top_two_gap_there(smollm2_dir, capsys):
    async def run():
        async with await dsdnode.connect_async(MODEL, local=True, hops=2, draft=False, dtype="float32") as client:
            plain = (await client.generate(PROMPT, max_new_tokens=4, k=0)).tokens
            logits = await client.service.next_token_logits(client.encode(PROMPT) + plain[:2])
            other = int(logits.topk(2).indices[1])  # a made-up DSD text that took the runner-up at token 2
            gap = await _report_parting(client, PROMPT, plain, plain[:2] + [other], 2, "float32")
            return plain, logits, gap
    plain, logits, gap = asyncio.run(run())
    top = logits.topk(2).values
    assert gap == pytest.approx(float(top[0] - top[1])) and gap >= 0
    said = capsys.readouterr().err
    assert said.startswith("texts part at token 2: plain chose") and f"gap {gap:.3f}" in said
    assert ("a near-tie" in said) == (gap < NEAR_TIE_LOGITS)


def test_the_summary_line_says_both_speedups_and_whether_the_texts_matched():
    line = "; ".join(o.summary() for o in (Outcome("code", 4.43, None), Outcome("math", 2.1, 0, 0.092),
                                           Outcome("other", 1.5, 3, 2.0)))
    assert line == ("code 4.43x (identical text); math 2.10x (texts part at token 0, top-2 gap 0.092 (a near-tie)); "
                    "other 1.50x (texts part at token 3, top-2 gap 2.000 (NOT a near-tie))")
    assert _first_difference([1, 2, 3], [1, 2, 4]) == 2 and _first_difference([1, 2], [1, 2, 3]) == 2
