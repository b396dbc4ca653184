"""Turning logits into the distribution tokens are drawn from, and drawing from it.

The same `logits_to_probs` is applied to the draft's logits (to sample drafts) and to the
target's logits (inside verification). Rejection sampling is exact with respect to whatever
distribution the target side uses, so processing both sides identically is what makes the
speculative output distributed exactly like sampling the *processed* target (temperature +
nucleus) one token at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingSettings:
    """How tokens are chosen.

    temperature: 0 means greedy (argmax); larger values flatten the distribution.
    top_p: nucleus filtering; keep the smallest set of most likely tokens whose mass reaches
        top_p (1.0 keeps everything).
    seed: seeds the generator returned by `make_generator` (None: nondeterministic).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(s: SamplingSettings) -> torch.Generator | None:
    """A CPU generator seeded from the settings, or None (global RNG) when no seed is set."""
    if s.seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(s.seed)
    return g


def logits_to_probs(logits: Tensor, s: SamplingSettings) -> Tensor:
    """[..., V] logits -> float32 probabilities after temperature and top-p, renormalized.

    temperature 0 gives a one-hot row at the argmax (ties: lowest id, as torch.argmax), so
    rejection sampling against it reduces exactly to greedy verification.
    -inf logits (masked tokens) are allowed; NaN, +inf, or a row that is entirely -inf is not.
    """
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    x = logits.detach().to(torch.float32)
    if not torch.isfinite(x).all():  # slow path only when something is non-finite
        if torch.isnan(x).any() or torch.isposinf(x).any():
            raise ValueError("logits contain NaN or +inf")
        if torch.isneginf(x).all(dim=-1).any():
            raise ValueError("a logits row is entirely -inf: no token can be chosen")

    if s.greedy:
        out = torch.zeros_like(x)
        out.scatter_(-1, x.argmax(dim=-1, keepdim=True), 1.0)
        return out

    probs = torch.softmax(x / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        # Drop a token once the more likely ones already reach top_p; the top token has
        # mass_before == 0 < top_p, so at least one token always survives.
        sorted_p = sorted_p.masked_fill(mass_before >= s.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a 1-D probability vector (need not be exactly normalized)."""
    if not isinstance(probs, Tensor) or probs.dim() != 1 or probs.numel() < 1:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a 1-D tensor [V], got {shape}")
    p = probs.detach().to(torch.float32)
    total = float(p.sum())  # NaN or inf if any entry is
    if not math.isfinite(total) or float(p.min()) < 0:
        raise ValueError("probs must be finite and non-negative")
    if total <= 0:
        raise ValueError("probs sum to zero: nothing to sample")
    return int(torch.multinomial(p, 1, generator=generator).item())
