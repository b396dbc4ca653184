"""Draft-length controller: the pure optimum, the estimators, and closed-loop behaviour
against a synthetic chain with known acceptance and costs."""

import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass, replace

import pytest

from dsdnode.speculative.controller import (UNIDENTIFIED_TOKEN_SHARE, ControllerSettings, DraftLengthController,
                                     RoundObservation, expected_tokens, optimal_k)


def brute_rate(a, L, c, d, k):
    return sum(a ** j for j in range(k + 1)) / max(L + (k + 1) * c + k * d, 1e-12)


def test_expected_tokens_is_geometric_sum():
    for a, k in itertools.product([0.0, 0.3, 0.8, 0.999, 1.0], range(0, 10)):
        assert math.isclose(expected_tokens(a, k), sum(a ** j for j in range(k + 1)), rel_tol=1e-9)


def test_optimal_k_matches_brute_force():
    grid = itertools.product([0.0, 0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0],
                             [0.0, 0.001, 0.01, 0.05, 0.2, 1.0], [0.0, 0.001, 0.01, 0.05],
                             [0.0, 0.002, 0.02], [1, 8, 16])
    for a, L, c, d, k_max in grid:
        k = optimal_k(a, L, c, d, k_max)
        rates = [brute_rate(a, L, c, d, j) for j in range(1, k_max + 1)]
        best = max(rates)
        assert 1 <= k <= k_max
        assert rates[k - 1] >= best * (1 - 1e-12), (a, L, c, d, k_max, k, rates)
        assert all(r < best * (1 - 1e-12) for r in rates[:k - 1])  # smallest k on ties


def test_optimal_k_extremes():
    assert optimal_k(0.0, 0.1, 0.01, 0.01, 8) == 1          # nothing is ever accepted
    assert optimal_k(0.99, 10.0, 0.001, 0.001, 8) == 8      # huge latency, near-perfect draft
    assert optimal_k(0.5, 0.0, 0.01, 0.05, 8) == 1          # no latency to amortize


@pytest.mark.parametrize("args", [(1.1, 0, 0, 0, 8), (0.5, -1, 0, 0, 8), (0.5, 0, math.nan, 0, 8),
                                  (0.5, 0, 0, math.inf, 8), (0.5, 0, 0, 0, 0)])
def test_optimal_k_rejects_bad_input(args):
    with pytest.raises(ValueError):
        optimal_k(*args)


@pytest.mark.parametrize("kwargs", [{"k_max": 0}, {"k_fixed": -1}, {"k_initial": 0},
                                    {"prior_acceptance": 1.5}, {"prior_weight": 0},
                                    {"ema": 0.0}, {"acceptance_ema": 1.5}])
def test_settings_validation(kwargs):
    with pytest.raises(ValueError):
        ControllerSettings(**kwargs)


@dataclass
class World:
    """A synthetic chain: i.i.d. acceptance a, link latency, per-hop fixed compute h0,
    compute c per token (summed over hops), draft time d per token, multiplicative noise."""

    a: float
    link: float
    c: float
    d: float
    h0: float = 0.0
    hops: int = 4
    noise: float = 0.03

    @property
    def L(self) -> float:
        return self.link + self.hops * self.h0

    def optimum(self, k_max: int = 8) -> int:
        return optimal_k(self.a, self.L, self.c, self.d, k_max)

    def rate(self, k: int) -> float:
        return brute_rate(self.a, self.L, self.c, self.d, k)

    def run(self, ctrl: DraftLengthController, rounds: int, rng: random.Random) -> list[int]:
        ks = []
        jitter = lambda x: max(0.0, x * (1 + self.noise * rng.gauss(0, 1)))  # noqa: E731
        for _ in range(rounds):
            k = ctrl.choose_k()
            n = 0
            while n < k and rng.random() < self.a:
                n += 1
            hops = [jitter(self.h0 + (k + 1) * self.c / self.hops) for _ in range(self.hops)]
            draft = jitter(k * self.d)
            ctrl.observe(RoundObservation(k, n, jitter(self.link) + sum(hops) + draft, draft, hops))
            ks.append(k)
        return ks


WORLDS = {
    "compute-linear": World(a=0.8, link=0.1, c=0.02, d=0.005),
    # CPU-like: each hop's forward is mostly a fixed cost, the extra tokens are cheap.
    "memory-bound": World(a=0.9, link=0.05, c=0.004, d=0.01, h0=0.03),
}


def efficiency(world: World, ks: list[int]) -> float:
    """Mean throughput of the chosen ks relative to the best fixed k."""
    return sum(world.rate(k) for k in ks) / len(ks) / world.rate(world.optimum())


@pytest.mark.parametrize("name", WORLDS)
def test_converges_to_analytic_optimum(name):
    world, rng = WORLDS[name], random.Random(0)
    ctrl = DraftLengthController(ControllerSettings(k_max=8), world.hops)
    ks = world.run(ctrl, 300, rng)
    opt = world.optimum()
    # The throughput curve is flat near its peak, so noise in the acceptance estimate moves
    # k by one now and then; what matters is that the throughput is near the optimum.
    assert abs(Counter(ks[-100:]).most_common(1)[0][0] - opt) <= 1
    assert efficiency(world, ks[-100:]) > 0.97
    t = ctrl.timing
    assert abs(ctrl.acceptance - world.a) < 0.15
    assert math.isclose(t.draft_token_s, world.d, rel_tol=0.05)
    assert math.isclose(t.fixed_s, world.L, rel_tol=0.25)
    # The compute slope is identified, not the fallback H/(k+1) that lumps h0 into it
    # (that would be 4.3x too large in the memory-bound world).
    assert 0.4 * world.c < t.token_compute_s < 2.0 * world.c
    assert math.isclose(ctrl.expected_round_s(5), t.fixed_s + 6 * t.token_compute_s + 5 * t.draft_token_s)


def test_probes_once_when_k_would_not_move():
    """Seen at one k only, per-token compute is assumed to be a quarter of H/(k+1). In this
    compute-bound world (no per-hop fixed cost) that underestimates it and makes the model pick
    k_initial again; one probe at k+1 identifies the slope and the controller moves to the true
    optimum."""
    h0, c, link, d, hops = 0.0, 0.005, 0.02, 0.005, 2
    ctrl = DraftLengthController(ControllerSettings(k_initial=4, prior_acceptance=0.8), hops)

    def observe(k: int, accepted: int) -> None:
        hop = [h0 + (k + 1) * c / hops] * hops
        ctrl.observe(RoundObservation(k, accepted, link + sum(hop) + k * d, k * d, hop))

    observe(ctrl.choose_k(), 3)
    t = ctrl.timing
    assert math.isclose(t.token_compute_s, UNIDENTIFIED_TOKEN_SHARE * c)  # the assumed share
    assert optimal_k(ctrl.acceptance, t.fixed_s, t.token_compute_s, t.draft_token_s, 8) == 4
    assert ctrl.choose_k() == 5
    observe(5, 3)
    t = ctrl.timing
    assert math.isclose(t.token_compute_s, c) and math.isclose(t.fixed_s, link + hops * h0, abs_tol=1e-12)
    assert ctrl.choose_k() == optimal_k(ctrl.acceptance, link + hops * h0, c, d, 8) == 2


def test_cold_start_keeps_long_blocks_when_blocks_cost_little():
    """The CPU swarm's case: a hop's forward is mostly fixed cost, so after the first round
    the controller must not fall back to short blocks (H/(k+1) as per-token cost would)."""
    world = WORLDS["memory-bound"]
    ctrl = DraftLengthController(ControllerSettings(k_initial=4), world.hops)
    ks = world.run(ctrl, 4, random.Random(5))
    assert world.optimum() == 8 and min(ks) >= 4


def test_latency_jump_lengthens_blocks():
    world, rng = World(a=0.8, link=0.005, c=0.02, d=0.004), random.Random(1)
    ctrl = DraftLengthController(ControllerSettings(k_max=8), world.hops)
    before = world.run(ctrl, 100, rng)[-20:]
    assert world.optimum() == 1 and Counter(before).most_common(1)[0][0] == 1
    slow = replace(world, link=0.2)
    after = slow.run(ctrl, 30, rng)
    assert slow.optimum() == 6
    assert max(after[:8]) >= 3  # reacts within a few rounds ...
    assert efficiency(slow, after[10:]) > 0.95  # ... and settles near the new optimum


def test_acceptance_drop_shortens_blocks():
    world, rng = World(a=0.95, link=0.05, c=0.01, d=0.005), random.Random(2)
    ctrl = DraftLengthController(ControllerSettings(k_max=8), world.hops)
    before = world.run(ctrl, 100, rng)[-20:]
    assert world.optimum() == 8 and Counter(before).most_common(1)[0][0] >= 7
    worse = replace(world, a=0.4)
    after = worse.run(ctrl, 30, rng)
    assert min(after[:6]) <= 6  # reacts within a few rounds ...
    assert worse.optimum() == 1 and max(after[-5:]) <= 2  # ... and ends at short blocks


def test_acceptance_estimate_accounts_for_truncation():
    """With k=2 and a=0.9, accepted/k averages 0.855; the truncated-geometric MLE gets 0.9."""
    world, rng = World(a=0.9, link=0.05, c=0.01, d=0.005), random.Random(3)
    ctrl = DraftLengthController(ControllerSettings(k_fixed=2, acceptance_ema=0.002), world.hops)
    ks = world.run(ctrl, 4000, rng)
    assert set(ks) == {2}
    assert abs(ctrl.acceptance - 0.9) < 0.015


def test_k_fixed_is_respected():
    for k_fixed in (0, 3, 12):
        ctrl = DraftLengthController(ControllerSettings(k_fixed=k_fixed, k_max=12), 2)
        ks = World(a=0.3, link=1.0, c=0.01, d=0.001, hops=2).run(ctrl, 30, random.Random(4))
        assert set(ks) == {k_fixed}


def test_initial_state_and_reset():
    assert DraftLengthController(ControllerSettings(k_max=2), 1).choose_k() == 2  # clamped
    ctrl = DraftLengthController(ControllerSettings(k_initial=3, prior_acceptance=0.7), 2)
    assert ctrl.choose_k() == 3 and ctrl.timing is None and math.isnan(ctrl.expected_round_s(3))
    assert math.isclose(ctrl.acceptance, 0.7)
    ctrl.observe(RoundObservation(k=3, accepted=3, round_s=0.2, draft_s=0.03, hop_compute_s=[0.04, 0.04]))
    assert ctrl.acceptance > 0.7
    # One observation at one k: per-token compute is the assumed share of H/(k+1); T(3) fits it.
    assert math.isclose(ctrl.timing.token_compute_s, UNIDENTIFIED_TOKEN_SHARE * 0.08 / 4)
    assert math.isclose(ctrl.expected_round_s(3), 0.2)
    a = ctrl.acceptance
    ctrl.reset_timing(3)
    assert ctrl.timing is None and ctrl.acceptance == a and ctrl.choose_k() == 3
    ctrl.observe(RoundObservation(k=0, accepted=0, round_s=0.1, draft_s=0.0, hop_compute_s=[0.01] * 3))
    assert ctrl.acceptance == a  # a round without drafts says nothing about acceptance


@pytest.mark.parametrize("obs", [
    RoundObservation(k=2, accepted=3, round_s=0.1, draft_s=0.0, hop_compute_s=[0.0, 0.0]),
    RoundObservation(k=-1, accepted=0, round_s=0.1, draft_s=0.0, hop_compute_s=[0.0, 0.0]),
    RoundObservation(k=2, accepted=1, round_s=0.1, draft_s=0.0, hop_compute_s=[0.0]),
    RoundObservation(k=2, accepted=1, round_s=math.nan, draft_s=0.0, hop_compute_s=[0.0, 0.0]),
    RoundObservation(k=2, accepted=1, round_s=0.1, draft_s=-1.0, hop_compute_s=[0.0, 0.0]),
    RoundObservation(k=2, accepted=1, round_s=0.1, draft_s=0.0, hop_compute_s=[0.0, math.inf]),
])
def test_bad_observations_raise(obs):
    ctrl = DraftLengthController(ControllerSettings(), 2)
    with pytest.raises(ValueError):
        ctrl.observe(obs)
    with pytest.raises(ValueError):
        DraftLengthController(ControllerSettings(), 0)


def tree_round(ctrl, width, k, ranks, round_s=0.5, draft_s=0.05, hops=(0.02, 0.02)):
    accepted = sum(1 for r in ranks if r >= 0)
    ctrl.observe(RoundObservation(k, accepted, round_s, draft_s, list(hops), width, width * k, ranks))


def test_trees_are_chosen_only_where_other_candidates_pay():
    """Weak top-1, other candidates catching most misses, cheap positions: a wide tree. The same
    costs with a draft that is always right: a chain (a tree would only add positions)."""
    s = ControllerSettings(k_max=8, width_max=4, prior_weight=2.0)
    weak = DraftLengthController(s, 2)
    for _ in range(30):
        tree_round(weak, 4, 4, [0, 2, 1, -1])  # top-1 right once, other candidates twice, then a miss
    assert weak.acceptance < 0.5 and weak.width_acceptance(4) > 0.6
    assert weak.choose_shape().width > 1
    strong = DraftLengthController(s, 2)
    for _ in range(30):
        tree_round(strong, 1, 4, [0, 0, 0, 0])
    assert strong.acceptance > 0.9 and strong.choose_shape().width == 1
    tree_round(strong, 4, 4, [0, 0, 0, 0], draft_s=0.01, hops=(0.07, 0.07))  # drafted faster (noise)
    assert strong.choose_shape().width == 1  # a batch of rows is never modelled cheaper than one row


def test_a_tree_never_models_slower_than_the_best_chain():
    """Whatever was observed, the chosen shape's modelled rate is at least the best chain's."""
    from dsdnode.speculative.controller import expected_tokens, round_cost
    rng = random.Random(5)
    s = ControllerSettings(k_max=8, width_max=4)
    for _ in range(50):
        ctrl = DraftLengthController(s, 3)
        for _ in range(10):
            w = rng.randint(1, 4)
            k = rng.randint(1, 8)
            ranks = [rng.choice([0, 0, 1, 2, -1]) for _ in range(rng.randint(1, k))]
            ranks = ranks[:next((i + 1 for i, r in enumerate(ranks) if r < 0), len(ranks))]
            tree_round(ctrl, w, k, ranks, round_s=rng.uniform(0.3, 1.0), draft_s=rng.uniform(0.01, 0.2),
                       hops=(rng.uniform(0.01, 0.1),) * 3)
        t, shape = ctrl.timing, ctrl.choose_shape()

        def rate(w, k):
            d = max(ctrl._draft_by_width.get(w, t.draft_token_s), t.draft_token_s)
            return expected_tokens(ctrl.width_acceptance(w), k) / round_cost(t.fixed_s, t.token_compute_s, d, k, w)
        best_chain = max(rate(1, k) for k in range(1, 9))
        if ctrl._compute.trusted_slope is not None:  # (an unidentified slope may probe k +- 1)
            assert rate(shape.width, shape.depth) >= best_chain * (1 - 1e-9)


def test_tree_observations_are_checked():
    ctrl = DraftLengthController(ControllerSettings(width_max=2), 1)
    for bad in (dict(width=3), dict(width=0), dict(nodes=1), dict(ranks=[0, 0, 0, 0, 0]), dict(ranks=[-2])):
        fields = dict(k=3, accepted=1, round_s=0.1, draft_s=0.0, hop_compute_s=[0.0], width=1, nodes=None, ranks=None)
        fields.update(bad)
        with pytest.raises(ValueError):
            ctrl.observe(RoundObservation(**fields))


# ---- links: bandwidth and jitter ------------------------------------------------------------------

def _wan_rounds(controller, rounds, link_s, rng, a=0.8):
    """Closed loop against a chain whose round link time is link_s(block, rng); compute and drafting
    are cheap and fixed, acceptance i.i.d. a per depth (chains: width_max 1)."""
    for _ in range(rounds):
        shape = controller.choose_shape()
        k = shape.depth
        accepted = next((i for i in range(k) if rng.random() > a), k)
        block = 1 + k
        controller.observe(RoundObservation(k, accepted, link_s(block, rng) + 0.01 + 0.001 * block + 0.002 * k,
                                            0.002 * k, [0.005 + 0.0005 * block] * 2))


def test_a_slow_uplink_is_measured_per_position_and_shortens_blocks():
    settings = ControllerSettings(k_max=16)
    fast, slow = DraftLengthController(settings, 2), DraftLengthController(settings, 2)
    rng = random.Random(3)
    _wan_rounds(fast, 200, lambda x, r: 0.3, rng)
    _wan_rounds(slow, 200, lambda x, r: 0.3 + 0.02 * x, rng)  # 20 ms a position over the round's links
    assert fast.timing.link_position_s < 1e-9
    assert slow.timing.link_position_s == pytest.approx(0.02, rel=0.25)
    assert slow.choose_k() < fast.choose_k()


def test_jitter_invents_no_transfer_cost_and_a_spike_barely_moves_the_level():
    settings = ControllerSettings(k_max=16)
    jittery = DraftLengthController(settings, 2)
    rng = random.Random(5)
    _wan_rounds(jittery, 150, lambda x, r: 0.3 + 0.05 * (r.paretovariate(2.5) - 1), rng)  # heavy tail, no bandwidth cost
    t = jittery.timing
    assert t.link_position_s < 0.002 and t.link_spread_s > 0.01
    before, k_before = t.fixed_s, jittery.choose_k()
    jittery.observe(RoundObservation(k_before, 0, 3.0, 0.0, [0.01, 0.01]))  # one 3 s stall
    assert jittery.timing.fixed_s - before < 0.2 * 3.0 / 2  # a plain EMA (0.2) would move it 0.6 s
    assert abs(jittery.choose_k() - k_before) <= 1
    for _ in range(25):  # a lasting change still comes through
        jittery.observe(RoundObservation(4, 2, 1.3, 0.0, [0.01, 0.01]))
    assert jittery.timing.fixed_s > 1.0
