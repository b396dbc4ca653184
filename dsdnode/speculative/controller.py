"""Choosing the shape of the next round's draft: a tree's width and depth (a chain: width 1, k = depth).

Cost model of one round that drafts k tokens and sends k+1 through the chain:

    T(k) = L + (k+1)*c + k*d

L: fixed cost per round (link latencies of the N+1 links, each hop's fixed compute --
   on CPU a forward over a few tokens is dominated by reading the weights once -- and
   client overhead); c: compute per extra token summed over hops; d: draft time per token.
With per-token acceptance a (i.i.d. model) a round yields E(k) = (1 - a^(k+1)) / (1 - a)
tokens, so we pick k in [1, k_max] maximizing the throughput E(k) / T(k). A long link
(large L) pays for long blocks; low acceptance makes them wasteful.

Estimation (all online, O(1) per round):
- a: exponentially-weighted maximum likelihood. A round with k drafts and n accepted has
  likelihood a^n (1-a)^[n<k] (n successes, one failure unless the block was fully
  accepted), so the MLE over rounds is sum(n) / (sum(n) + #rounds with a rejection).
  Both sums decay by (1 - acceptance_ema) per round and start from prior pseudo-counts
  (prior_weight trials at prior_acceptance), which fade out the same way.
- d: EMA of draft_s / k.
- c: weighted least squares of the summed hop compute H against x = k+1 (H = h0 + c*x),
  with slow forgetting (compute per token is a property of hardware and model). The fit is
  only trusted when k has varied enough; until then c is assumed to be a quarter of H/x
  (H/x itself would lump all of h0 into c: measured on the CPU swarm, that made a cold
  start drop from k = 4 to k = 1-2 for several rounds, while the true per-token share of a
  block of 5 was a few percent -- small blocks cost about one token's pass on CPUs and GPUs
  alike). Usually the move away from k_initial already identifies the slope; if the model
  would repeat the k just observed before that, the controller probes k+-1. The last
  trusted slope is kept while k sits still.
- L: h0 plus an EMA of the residual round_s - H - draft_s (links, client, transfers).
  Latency lives only here, so a latency change never pollutes the compute slope.

Links (WAN): a round's residual holds the links' latency and the transfer of the block's bytes,
which grows with the block on a slow uplink (at 20 Mbit/s a 1536-wide bf16 position is 1.2 ms per
link). So the residual is fitted like compute, R = r0 + t*x, and t (transfer per position, summed
over the round's links) is added to c: wide trees cost their bytes. Jitter makes R noisy, so both
its level and its slope use its measured spread: the slope is trusted only once it stands out of
its own standard error (sigma / sqrt(Sxx) -- under heavy jitter that takes a wider spread of
block sizes, and until then t is 0, never a guess), and each residual enters the level clipped to
JITTER_CLIP standard deviations of the residuals so far, so one spike of a heavy-tailed link does
not swing k for the next rounds (two outliers in a row on the same side are a lasting change and
count whole); the spread itself is an EMA of squared deviations, which the spikes do raise.

Trees (width w > 1, width_max > 1). A tree of width w and depth k keeps the w best nodes of each
depth: it sends 1 + w*k positions (compute c each, as above) and costs k batched draft forwards
(d_w per depth, an EMA per width, never taken below the chain's d: a batch of w rows costs about
one row on a weight-bound CPU, more on a compute-bound one, and only measurement says which).
Its per-depth success is a_w = a + (1 - a) * g_w, where a is the top-1
acceptance above and g_w the share of top-1 misses that the other candidates at the node caught
(another draft, or a prompt-lookup branch: so g_1 > 0 with lookup). Verification reports, for each
node it visits that has children, the rank of the accepted child (-1: none), so a counts rank-0
visits against all others and g_w counts rank > 0 against rank -1, both with decaying counts from
prior pseudo-counts (g_w's prior: 1 - (1 - prior_catch)^(w-1), weighted prior_weight / (k_initial + 1):
as many rounds' worth as the acceptance prior, since a round has one or two catch trials). The shape maximising
E(a_w, k) / T(w, k) is chosen; width 1 is always a candidate, so the model never prefers a tree it
predicts to be slower than the best chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .tree import TreeShape

# Weighted sum of squares of k around its mean needed before the compute slope is trusted
# (about one probe one step away from the others, seen within the forgetting window).
_MIN_SXX = 0.4
# Forgetting factor per round of the compute regression (memory ~ 1 / 0.02 = 50 rounds).
_COMPUTE_FORGET = 0.02
# Until the slope is identified: the share of a block's compute H assumed to grow with its size x.
UNIDENTIFIED_TOKEN_SHARE = 0.25
# A link's per-position transfer cost is believed once it exceeds this many of its standard errors.
LINK_SLOPE_SIGNIFICANCE = 2.0
# A round's link time enters the fixed cost's level clipped to this many standard deviations.
JITTER_CLIP = 2.0


@dataclass
class RoundObservation:
    """What one round cost and yielded.

    round_s: wall time of the round; draft_s: drafting time on its critical path (drafting
    overlapped with the wait is free and should not be counted); hop_compute_s: each hop's
    compute for the block of k+1 tokens, one entry per hop.
    """

    k: int
    accepted: int
    round_s: float
    draft_s: float
    hop_compute_s: list[float]
    width: int = 1  # tree width (1: a chain)
    nodes: int | None = None  # tree nodes sent (drafts and lookups); None: k
    ranks: list[int] | None = None  # per visited node with children: rank of the accepted child, -1 none

    @property
    def block(self) -> int:
        """Positions the chain computed: the root plus the nodes."""
        return 1 + (self.k if self.nodes is None else self.nodes)


@dataclass(frozen=True)
class ControllerSettings:
    """k_max: longest block (bounds wasted work and message size).
    k_fixed: if set, always use this k (0 = no drafting); estimates still update.
    k_initial: k of the first round, before any timing is known (clamped to k_max).
    prior_acceptance / prior_weight: starting belief about a and how many pseudo-trials it
        is worth; higher weight = steadier start, slower to believe early rounds.
    acceptance_ema: per-round forgetting of the acceptance counts; higher tracks topic
        changes faster but makes a (and so k) noisier.
    ema: per-round smoothing of draft time and fixed cost; higher reacts faster to a
        latency change, lower averages out jitter.
    width_max: widest tree (1: chains only).
    prior_catch: starting belief about the share of top-1 misses the second candidate of a node
        catches (each further one catches that share of what is left); weighted like prior_weight.
    """

    k_max: int = 8
    k_fixed: int | None = None
    k_initial: int = 4
    prior_acceptance: float = 0.8
    prior_weight: float = 8.0
    acceptance_ema: float = 0.1
    ema: float = 0.2
    width_max: int = 1
    prior_catch: float = 0.3

    def __post_init__(self) -> None:
        if not isinstance(self.width_max, int) or self.width_max < 1:
            raise ValueError(f"width_max must be an int >= 1, got {self.width_max!r}")
        if not 0.0 <= self.prior_catch < 1.0:
            raise ValueError(f"prior_catch must be in [0, 1), got {self.prior_catch}")
        if not isinstance(self.k_max, int) or self.k_max < 1:
            raise ValueError(f"k_max must be an int >= 1, got {self.k_max!r}")
        if self.k_fixed is not None and (not isinstance(self.k_fixed, int) or self.k_fixed < 0):
            raise ValueError(f"k_fixed must be None or an int >= 0, got {self.k_fixed!r}")
        if not isinstance(self.k_initial, int) or self.k_initial < 1:
            raise ValueError(f"k_initial must be an int >= 1, got {self.k_initial!r}")
        if not 0.0 <= self.prior_acceptance <= 1.0:
            raise ValueError(f"prior_acceptance must be in [0, 1], got {self.prior_acceptance}")
        if not self.prior_weight > 0:
            raise ValueError(f"prior_weight must be > 0, got {self.prior_weight}")
        for name in ("acceptance_ema", "ema"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v}")


@dataclass(frozen=True)
class TimingEstimate:
    """Current cost model: T(k) = fixed_s + (k+1)*token_compute_s + k*draft_token_s."""

    fixed_s: float
    token_compute_s: float  # servers' compute and the links' transfer per position
    draft_token_s: float
    link_position_s: float = 0.0  # of token_compute_s: the links' transfer per position (bandwidth)
    link_spread_s: float = 0.0  # standard deviation of a round's link time (jitter)


def expected_tokens(a: float, k: int) -> float:
    """E(k) = 1 + a + ... + a^k: tokens per round with k drafts and acceptance a."""
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def round_cost(L: float, c: float, d: float, k: int, width: int = 1) -> float:
    """T: a tree of width*k nodes plus the root through the chain, and k draft depths (never 0)."""
    return max(L + (width * k + 1) * c + k * d, 1e-12)


def optimal_k(a: float, L: float, c: float, d: float, k_max: int, width: int = 1) -> int:
    """k in [1, k_max] maximizing E(k) / (L + (width*k+1)c + kd); the smallest k on ties.

    E is concave in k and T affine and positive, so the ratio is unimodal: the scan stops
    at the first decrease.
    """
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance a must be in [0, 1], got {a}")
    for name, v in (("L", L), ("c", c), ("d", d)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
    if not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be an int >= 1, got {k_max!r}")

    def rate(k: int) -> float:
        return expected_tokens(a, k) / round_cost(L, c, d, k, width)

    best_k, best, prev = 1, rate(1), rate(1)
    for k in range(2, k_max + 1):
        r = rate(k)
        if r < prev:
            break
        if r > best:
            best_k, best = k, r
        prev = r
    return best_k


class CostFit:
    """Exponentially weighted least squares H = h0 + c*x, with a fallback when x is constant.

    significance: with > 0, a slope is trusted only when it exceeds that many of its standard errors
    (noisy links); until then the fallback share applies (0 for links: no guessed transfer cost)."""

    def __init__(self, unidentified_share: float = UNIDENTIFIED_TOKEN_SHARE, significance: float = 0.0) -> None:
        self.s0 = self.sx = self.sxx = self.sy = self.sxy = self.syy = 0.0
        self.trusted_slope: float | None = None
        self.unidentified_share, self.significance = unidentified_share, significance

    def add(self, x: float, y: float) -> None:
        keep = 1.0 - _COMPUTE_FORGET
        self.s0 = keep * self.s0 + 1.0
        self.sx = keep * self.sx + x
        self.sxx = keep * self.sxx + x * x
        self.sy = keep * self.sy + y
        self.sxy = keep * self.sxy + x * y
        self.syy = keep * self.syy + y * y
        if self.spread() >= _MIN_SXX:
            slope = (self.sxy - self.sx * self.sy / self.s0) / self.spread()
            if self.significance <= 0 or slope > self.significance * self.slope_error(slope):
                self.trusted_slope = max(slope, 0.0)

    def slope_error(self, slope: float) -> float:
        """Standard error of the slope: residual spread around the line over sqrt(Sxx)."""
        syy = self.syy - self.sy * self.sy / self.s0
        sxy = self.sxy - self.sx * self.sy / self.s0
        residual = max(syy - slope * sxy, 0.0) / max(self.s0 - 2.0, 1.0)
        return math.sqrt(residual / self.spread())

    def spread(self) -> float:
        """Weighted sum of squared deviations of x: how well the slope is determined."""
        return self.sxx - self.sx * self.sx / self.s0 if self.s0 else 0.0

    def fit(self) -> tuple[float, float]:
        """(h0, c) with 0 <= c <= mean(H)/mean(x), so h0 >= 0."""
        x_bar, y_bar = self.sx / self.s0, self.sy / self.s0
        ratio = max(y_bar, 0.0) / x_bar
        slope = ratio * self.unidentified_share if self.trusted_slope is None else min(self.trusted_slope, ratio)
        return y_bar - slope * x_bar, slope


class DraftLengthController:
    """Online estimate of acceptance and round cost; picks k each round (see module doc)."""

    def __init__(self, s: ControllerSettings, n_hops: int):
        self.settings = s
        self.reset_acceptance()
        self.reset_timing(n_hops)

    def reset_acceptance(self) -> None:
        """Back to the prior belief about acceptance (a new text); keep the cost model."""
        s = self.settings
        self._acc = s.prior_weight * s.prior_acceptance
        self._rej = s.prior_weight * (1.0 - s.prior_acceptance)
        # per width: (caught, missed) counts of top-1 misses. A round shows about k + 1 acceptance trials
        # but only the one or two misses as catch trials: the prior is worth as many rounds as the
        # acceptance prior, not as many trials (as many trials, it outweighed a short answer's evidence
        # and kept the widest tree where it did not pay)
        weight = s.prior_weight / (s.k_initial + 1)
        self._catch = {w: [weight * (1.0 - (1.0 - s.prior_catch) ** (w - 1)),
                           weight * (1.0 - s.prior_catch) ** (w - 1)] for w in range(1, s.width_max + 1)}

    def reset_timing(self, n_hops: int) -> None:
        """Forget the cost model (e.g. after failover to another chain); keep acceptance."""
        if not isinstance(n_hops, int) or n_hops < 1:
            raise ValueError(f"n_hops must be an int >= 1, got {n_hops!r}")
        self.n_hops = n_hops
        self._compute = CostFit()
        self._link = CostFit(unidentified_share=0.0, significance=LINK_SLOPE_SIGNIFICANCE)
        self._residual: float | None = None
        self._residual_var = 0.0
        self._last_outlier = 0  # sign of the last round's residual if it lay beyond JITTER_CLIP sigmas
        self._draft: float | None = None
        self._draft_by_width: dict[int, float] = {}
        self._last_k: int | None = None

    @property
    def acceptance(self) -> float:
        """Current estimate of the per-token acceptance a."""
        return self._acc / (self._acc + self._rej)

    def width_acceptance(self, width: int) -> float:
        """a_w: the chance a depth of a width-`width` tree holds the target's token."""
        caught, missed = self._catch[width]
        a = self.acceptance
        return a + (1.0 - a) * caught / (caught + missed)

    @property
    def timing(self) -> TimingEstimate | None:
        """Current (L, c, d), or None before the first observation."""
        if self._residual is None:
            return None
        h0, c = self._compute.fit()
        _, t = self._link.fit()
        mean_x = self._link.sx / self._link.s0
        # the residual's level is its EMA at the mean block; the per-position transfer moves to c
        return TimingEstimate(fixed_s=max(h0 + self._residual - t * mean_x, 0.0), token_compute_s=c + t,
                              draft_token_s=self._draft or 0.0, link_position_s=t,
                              link_spread_s=math.sqrt(self._residual_var))

    def expected_round_s(self, k: int) -> float:
        """Predicted T(k) in seconds (NaN before the first observation)."""
        t = self.timing
        if t is None:
            return math.nan
        return t.fixed_s + (k + 1) * t.token_compute_s + k * t.draft_token_s

    def choose_k(self) -> int:
        """The depth of choose_shape() (a chain's k when width_max is 1)."""
        return self.choose_shape().depth

    def choose_shape(self) -> TreeShape:
        """The next round's tree: k_fixed (a chain), a chain of k_initial before any timing, else the
        (width, depth) maximising modelled tokens per second."""
        s = self.settings
        if s.k_fixed is not None:
            return TreeShape(1, s.k_fixed)
        t = self.timing
        if t is None:
            return TreeShape(1, min(s.k_initial, s.k_max))
        best, best_rate = TreeShape(1, 1), -1.0
        for w in range(1, s.width_max + 1):  # the narrower shape wins ties
            # a depth of w rows never costs less than one row: measured noise must not make a tree look cheaper
            a, d = self.width_acceptance(w), max(self._draft_by_width.get(w, t.draft_token_s), t.draft_token_s)
            k = optimal_k(a, t.fixed_s, t.token_compute_s, d, s.k_max, w)
            rate = expected_tokens(a, k) / round_cost(t.fixed_s, t.token_compute_s, d, k, w)
            if rate > best_rate * (1 + 1e-12):
                best, best_rate = TreeShape(w, k), rate
        k = best.depth
        if self._compute.trusted_slope is None and self._last_k == k and s.k_max > 1:
            k = k + 1 if k < s.k_max else k - 1  # probe: make the slope visible
        return TreeShape(best.width, k)

    def observe(self, obs: RoundObservation) -> None:
        """Fold one round into the estimates. Raises ValueError on inconsistent data."""
        self._validate(obs)
        keep = 1.0 - self.settings.acceptance_ema
        if obs.k > 0:
            ranks = obs.ranks if obs.ranks is not None else [0] * obs.accepted + [-1] * (obs.accepted < obs.k)
            self._acc = keep * self._acc + ranks.count(0)
            self._rej = keep * self._rej + (len(ranks) - ranks.count(0))
            caught = self._catch[obs.width]
            caught[0] = keep * caught[0] + sum(r > 0 for r in ranks)
            caught[1] = keep * caught[1] + ranks.count(-1)
            per_depth = obs.draft_s / obs.k
            if obs.width == 1:
                self._draft = per_depth if self._draft is None else \
                    self._draft + self.settings.ema * (per_depth - self._draft)
            old = self._draft_by_width.get(obs.width)
            self._draft_by_width[obs.width] = per_depth if old is None else \
                old + self.settings.ema * (per_depth - old)
        compute = math.fsum(obs.hop_compute_s)
        self._compute.add(obs.block, compute)
        residual = obs.round_s - compute - obs.draft_s
        self._link.add(obs.block, residual)
        if self._residual is None:
            self._residual = residual
        else:
            deviation = clipped = residual - self._residual
            bound = JITTER_CLIP * math.sqrt(self._residual_var)
            outlier = 0 if abs(deviation) <= bound else (1 if deviation > 0 else -1)
            if outlier and outlier != self._last_outlier:  # a lone spike moves the level by JITTER_CLIP sigmas;
                clipped = min(max(deviation, -bound), bound)  # a second in a row is a lasting change: taken whole,
            elif outlier:  # and the transfer fit starts over (block sizes chosen before it would confound it)
                self._link = CostFit(unidentified_share=0.0, significance=LINK_SLOPE_SIGNIFICANCE)
                self._link.add(obs.block, residual)
            self._last_outlier = outlier
            self._residual += self.settings.ema * clipped
            self._residual_var += self.settings.ema * (deviation * deviation - self._residual_var)
        self._last_k = obs.k

    def _validate(self, obs: RoundObservation) -> None:
        if not isinstance(obs.k, int) or obs.k < 0:
            raise ValueError(f"observation k must be an int >= 0, got {obs.k!r}")
        if not isinstance(obs.accepted, int) or not 0 <= obs.accepted <= obs.k:
            raise ValueError(f"accepted must be in [0, k={obs.k}], got {obs.accepted!r}")
        if not isinstance(obs.width, int) or not 1 <= obs.width <= self.settings.width_max:
            raise ValueError(f"width must be in [1, {self.settings.width_max}], got {obs.width!r}")
        if obs.nodes is not None and (not isinstance(obs.nodes, int) or obs.nodes < obs.k):
            raise ValueError(f"nodes must be an int >= k={obs.k}, got {obs.nodes!r}")
        if obs.ranks is not None and (len(obs.ranks) > obs.k + 1 or any(r < -1 for r in obs.ranks)):
            raise ValueError(f"ranks must be at most k+1 = {obs.k + 1} values >= -1, got {obs.ranks!r}")
        if len(obs.hop_compute_s) != self.n_hops:
            raise ValueError(f"expected {self.n_hops} hop compute times, "
                             f"got {len(obs.hop_compute_s)}")
        for name, v in (("round_s", obs.round_s), ("draft_s", obs.draft_s),
                        *(("hop_compute_s", h) for h in obs.hop_compute_s)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite time >= 0, got {v!r}")
