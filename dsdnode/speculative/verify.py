"""Deciding how much of a drafted block the target accepts.

All three verifiers take the target's logits for the block [last accepted token, draft_0 ..
draft_{k-1}]: row i predicts the position of draft[i], row k predicts the token after the
whole block (the bonus). Each returns the accepted draft prefix plus exactly one token chosen
by the target, so a round always makes progress (len(tokens) == accepted + 1 >= 1).

- verify_greedy: lossless for greedy decoding.
- verify_sampling: lossless for sampling (standard speculative rejection sampling).
- verify_adaptive: opt-in, lossy; relaxes mismatches on unimportant tokens (importance.py).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from .importance import AdaptiveSettings, ImportanceScorer
from .sampling import SamplingSettings, logits_to_probs, sample


@dataclass
class VerifyResult:
    """accepted: draft tokens accepted (0..k); tokens: those tokens plus one target token
    (correction at the first rejection, or the bonus after a full accept);
    relaxed: how many of the accepted tokens were accepted only by the adaptive rule."""

    accepted: int
    tokens: list[int]
    relaxed: int = 0


def _check_block(draft: list[int], target_logits: Tensor) -> tuple[list[int], int]:
    """Validate shapes and ids; return the draft as plain ints and the vocabulary size."""
    if not isinstance(target_logits, Tensor) or target_logits.dim() != 2:
        raise ValueError("target_logits must be a 2-D tensor [k+1, V]")
    if not target_logits.is_floating_point():
        raise ValueError(f"target_logits must be floating point, got {target_logits.dtype}")
    try:
        ids = [operator.index(t) for t in draft]
    except TypeError as e:
        raise ValueError(f"draft must be a list of integer token ids: {e}") from None
    rows, vocab = target_logits.shape
    if rows != len(ids) + 1:
        raise ValueError(f"target_logits has {rows} rows; a draft of {len(ids)} tokens "
                         f"needs {len(ids) + 1} (one per draft token plus the bonus)")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"draft token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    return ids, vocab


def verify_greedy(draft: list[int], target_logits: Tensor) -> VerifyResult:
    """Accept the longest prefix with draft[i] == argmax(row i), then emit the next argmax."""
    ids, _ = _check_block(draft, target_logits)
    top = target_logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(ids) and ids[n] == top[n]:
        n += 1
    return VerifyResult(accepted=n, tokens=ids[:n] + [top[n]])


def verify_sampling(draft: list[int], draft_probs: Tensor, target_logits: Tensor,
                    s: SamplingSettings, generator: torch.Generator | None) -> VerifyResult:
    """Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

    p = logits_to_probs(target_logits, s), q = draft_probs (the processed distributions the
    drafts were sampled from). draft[i] is accepted with probability min(1, p_i(x) / q_i(x));
    at the first rejection the token is drawn from norm(max(0, p_i - q_i)); after k accepts
    the bonus is drawn from p_k. Every emitted token is then distributed exactly as p.
    With temperature 0, p is one-hot and this reduces to greedy verification (used directly).
    """
    ids, vocab = _check_block(draft, target_logits)
    if not isinstance(draft_probs, Tensor) or tuple(draft_probs.shape) != (len(ids), vocab):
        got = tuple(draft_probs.shape) if isinstance(draft_probs, Tensor) else draft_probs
        raise ValueError(f"draft_probs must have shape ({len(ids)}, {vocab}), got {got}")
    if s.greedy:
        return verify_greedy(ids, target_logits)
    q = draft_probs.detach().to(torch.float32)
    if len(ids) and (not math.isfinite(float(q.sum())) or float(q.min()) < 0):
        raise ValueError("draft_probs must be finite and non-negative")
    u = torch.rand(len(ids), generator=generator).tolist()
    for i, x in enumerate(ids):
        # Rows are processed lazily: after a rejection the later rows are never needed.
        p = logits_to_probs(target_logits[i], s)
        # u < p/q without dividing: q == 0 (draft sampled an impossible token) accepts iff
        # p > 0, which is the limit of min(1, p/q).
        if u[i] * float(q[i, x]) < float(p[x]):
            continue
        residual = (p - q[i]).clamp_(min=0.0)
        if float(residual.sum()) <= 0:  # only when p == q up to rounding; residual is ~p
            residual = p
        return VerifyResult(accepted=i, tokens=ids[:i] + [sample(residual, generator)])
    bonus = logits_to_probs(target_logits[len(ids)], s)
    return VerifyResult(accepted=len(ids), tokens=ids + [sample(bonus, generator)])


def verify_adaptive(draft: list[int], target_logits: Tensor, importance: ImportanceScorer,
                    s: AdaptiveSettings) -> VerifyResult:
    """Greedy verification that also accepts unimportant near-misses (lossy, opt-in).

    At position i: draft[i] == argmax -> accept. Otherwise, with p = softmax(row i)
    (temperature 1), accept as *relaxed* if importance.relaxable(draft[i], p, s) (draft token
    and the target's choice both non-key, entropy <= s.max_entropy) and
    p(draft[i]) >= s.tau * p(argmax). Else reject and emit the argmax. Bonus: argmax of row k.
    enabled=False gives exactly verify_greedy.
    """
    if not s.enabled:
        return verify_greedy(draft, target_logits)
    ids, _ = _check_block(draft, target_logits)
    top = target_logits.argmax(dim=-1).tolist()
    relaxed = 0
    for i, x in enumerate(ids):
        if x == top[i]:
            continue
        if not importance.key(x):  # cheap table lookup before any softmax
            probs = torch.softmax(target_logits[i].detach().to(torch.float32), dim=-1)
            if importance.relaxable(x, probs, s) and float(probs[x]) >= s.tau * float(probs[top[i]]):
                relaxed += 1
                continue
        return VerifyResult(accepted=i, tokens=ids[:i] + [top[i]], relaxed=relaxed)
    return VerifyResult(accepted=len(ids), tokens=ids + [top[len(ids)]], relaxed=relaxed)
