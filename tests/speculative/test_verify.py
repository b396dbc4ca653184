"""Verification: greedy on hand-made logits, rejection sampling checked statistically
against the processed target distribution, and the relaxed (adaptive) mode."""

import math
import random
from collections import Counter

import pytest
import torch

from dsdnode.speculative.importance import AdaptiveSettings, ImportanceScorer
from dsdnode.speculative.sampling import SamplingSettings, logits_to_probs
from dsdnode.speculative.verify import VerifyResult, verify_adaptive, verify_greedy, verify_sampling

torch.set_num_threads(1)


def one_hot_logits(tops: list[int], vocab: int = 6) -> torch.Tensor:
    logits = torch.zeros(len(tops), vocab)
    logits[torch.arange(len(tops)), tops] = 5.0
    return logits


# --------------------------------------------------------------------------- greedy
def test_greedy_all_accepted_emits_bonus():
    r = verify_greedy([3, 1, 4], one_hot_logits([3, 1, 4, 5]))
    assert r == VerifyResult(accepted=3, tokens=[3, 1, 4, 5], relaxed=0, path=[0, 1, 2], ranks=[0, 0, 0])


def test_greedy_first_mismatch_emits_correction():
    r = verify_greedy([3, 1, 4], one_hot_logits([3, 2, 4, 5]))
    assert (r.accepted, r.tokens) == (1, [3, 2])


def test_greedy_none_accepted():
    r = verify_greedy([3, 1], one_hot_logits([0, 1, 4]))
    assert (r.accepted, r.tokens) == (0, [0])


def test_greedy_empty_draft_is_plain_decoding():
    assert verify_greedy([], one_hot_logits([2])).tokens == [2]


@pytest.mark.parametrize("draft,logits", [
    ([1, 2], torch.zeros(2, 6)),            # needs k+1 = 3 rows
    ([1, 9], torch.zeros(3, 6)),            # id outside vocabulary
    ([1, -1], torch.zeros(3, 6)),
    ([1, 2.5], torch.zeros(3, 6)),          # not an integer id
    ([1], torch.zeros(2, 6, 1)),            # wrong rank
    ([1], torch.zeros(2, 6, dtype=torch.long)),
])
def test_bad_blocks_raise(draft, logits):
    with pytest.raises(ValueError):
        verify_greedy(draft, logits)


# --------------------------------------------------------------------------- sampling
def chi2_critical(dof: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square(dof), Wilson-Hilferty approximation."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


def chi2_stat(counts: Counter, expected: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson statistic over cells with positive expectation; cells with zero expectation
    must be empty (asserted). Returns (statistic, degrees of freedom)."""
    stat, cells = 0.0, 0
    flat = expected.flatten()
    for cell in range(flat.numel()):
        e = float(flat[cell]) * n
        if e == 0.0:
            assert counts.get(cell, 0) == 0, f"impossible outcome {cell} was emitted"
            continue
        stat += (counts.get(cell, 0) - e) ** 2 / e
        cells += 1
    return stat, cells - 1


class TinyLM:
    """Random next-token logit tables over V tokens conditioned on up to two previous
    tokens: `t` for the target, `q` for a different draft (its processed probabilities are
    precomputed, and drafts are drawn with Python's RNG, to keep 20k trials fast)."""

    def __init__(self, vocab: int, seed: int, s: SamplingSettings, scale: float = 1.5):
        g = torch.Generator().manual_seed(seed)
        shapes = [(vocab,), (vocab, vocab), (vocab, vocab, vocab)]
        self.t = [scale * torch.randn(*sh, generator=g) for sh in shapes]
        self.q = [logits_to_probs(scale * torch.randn(*sh, generator=g), s) for sh in shapes]
        self.q_lists = [q.tolist() for q in self.q]
        self.rng = random.Random(seed)

    def draft_probs(self, prefix: tuple[int, ...]) -> list[float]:
        out = self.q_lists[len(prefix)]
        for t in prefix:
            out = out[t]
        return out


def speculate(lm: TinyLM, prefix: tuple[int, ...], k: int, s: SamplingSettings, g) -> VerifyResult:
    """One round: draft k tokens from the draft tables, verify against the target tables."""
    drafts = []
    for _ in range(k):
        q = lm.draft_probs(prefix + tuple(drafts))
        drafts.append(lm.rng.choices(range(len(q)), weights=q)[0])
    qs = torch.stack([lm.q[i + len(prefix)][prefix + tuple(drafts[:i])] for i in range(k)])
    rows = torch.stack([lm.t[i + len(prefix)][prefix + tuple(drafts[:i])] for i in range(k + 1)])
    return verify_sampling(drafts, qs, rows, s, g)


SETTINGS = [SamplingSettings(temperature=1.0), SamplingSettings(temperature=0.7, top_p=0.8),
            SamplingSettings(temperature=1.6, top_p=0.9)]


@pytest.mark.parametrize("s", SETTINGS, ids=["t1", "t0.7-p0.8", "t1.6-p0.9"])
def test_sampling_first_token_matches_processed_target(s):
    vocab, n = 6, 10000
    lm, g = TinyLM(vocab, seed=1, s=s), torch.Generator().manual_seed(11)
    counts = Counter(speculate(lm, (), 2, s, g).tokens[0] for _ in range(n))
    p = logits_to_probs(lm.t[0], s)
    stat, dof = chi2_stat(counts, p, n)
    assert stat < chi2_critical(dof), (stat, counts, p)
    # Power check: an implementation that always accepts would emit the draft's
    # distribution q, which this test rejects by a wide margin.
    q = lm.q[0]
    wrong = Counter({i: round(float(q[i]) * n) for i in range(vocab)})
    assert chi2_stat(wrong, p.clamp(min=1e-3), n)[0] > 10 * chi2_critical(dof)


def test_sampling_first_two_tokens_joint_matches_target():
    """Joint law of the first two generated tokens: the second comes from the same round
    (accepted draft, correction or bonus) or, after an early rejection, from the next round."""
    s, vocab, n = SETTINGS[1], 5, 15000
    lm, g = TinyLM(vocab, seed=2, s=s), torch.Generator().manual_seed(12)
    counts = Counter()
    for _ in range(n):
        toks = speculate(lm, (), 1, s, g).tokens
        if len(toks) < 2:
            toks = toks + speculate(lm, (toks[0],), 1, s, g).tokens[:1]
        counts[toks[0] * vocab + toks[1]] += 1
    p0 = logits_to_probs(lm.t[0], s)
    p1 = logits_to_probs(lm.t[1], s)  # row x: target's next-token law after x
    joint = p0[:, None] * p1
    stat, dof = chi2_stat(counts, joint, n)
    assert stat < chi2_critical(dof), stat


def test_sampling_second_token_after_accept_matches_target():
    s, vocab, n = SamplingSettings(temperature=1.0), 5, 12000
    lm, g = TinyLM(vocab, seed=3, s=s), torch.Generator().manual_seed(13)
    by_first: dict[int, Counter] = {}
    for _ in range(n):
        r = speculate(lm, (), 2, s, g)
        if r.accepted >= 1:
            by_first.setdefault(r.tokens[0], Counter())[r.tokens[1]] += 1
    x, c = max(by_first.items(), key=lambda kv: sum(kv[1].values()))
    m = sum(c.values())
    assert m > 1500
    stat, dof = chi2_stat(c, logits_to_probs(lm.t[1][x], s), m)
    assert stat < chi2_critical(dof), stat


def test_sampling_temperature_zero_is_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=g)
    tops = logits.argmax(-1).tolist()
    draft = [tops[0], tops[1], (tops[2] + 1) % 9]
    q = torch.full((3, 9), 1 / 9)
    r = verify_sampling(draft, q, logits, SamplingSettings(temperature=0.0), g)
    assert r == verify_greedy(draft, logits) and r.accepted == 2


def test_sampling_never_emits_token_target_excludes():
    """A draft token that top-p removes from the target is always rejected."""
    s, g = SamplingSettings(temperature=1.0, top_p=0.5), torch.Generator().manual_seed(5)
    logits = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])  # target keeps only id 0
    q = torch.tensor([[0.0, 1.0, 0.0]])
    for _ in range(200):
        assert verify_sampling([1], q, logits, s, g).tokens == [0]


def test_sampling_bad_draft_probs_raise():
    s = SamplingSettings(temperature=1.0)
    with pytest.raises(ValueError):
        verify_sampling([1, 2], torch.full((1, 4), 0.25), torch.zeros(3, 4), s, None)
    with pytest.raises(ValueError):
        verify_sampling([1], torch.tensor([[0.5, -0.5, 1.0, 0.0]]), torch.zeros(2, 4), s, None)


# --------------------------------------------------------------------------- adaptive
VOCAB = ["Ġthe", "Ġa", ",", "Ġ", "Ċ", "Ġx", "Ġy", "Ġ42", "7", "+", "==", "Ġreturn", "<|endoftext|>", "."]
ID = {t: i for i, t in enumerate(VOCAB)}
SCORER = ImportanceScorer(VOCAB)


def row(probs: dict[str, float], floor: float = 1e-4) -> torch.Tensor:
    """Logits whose softmax puts the given mass on the named tokens (rest ~floor)."""
    p = torch.full((len(VOCAB),), floor)
    for t, v in probs.items():
        p[ID[t]] = v
    return (p / p.sum()).log()


def test_adaptive_relaxes_non_key_near_miss_where_greedy_rejects():
    logits = torch.stack([row({"Ġthe": 0.55, "Ġa": 0.4}), row({",": 0.6, ".": 0.35}),
                          row({"Ġx": 0.9})])
    draft = [ID["Ġa"], ID["."]]
    on = AdaptiveSettings(enabled=True, tau=0.3)
    assert verify_greedy(draft, logits).accepted == 0
    r = verify_adaptive(draft, logits, SCORER, on)
    assert (r.accepted, r.relaxed, r.tokens) == (2, 2, draft + [ID["Ġx"]])
    # The ratio test still bites: 0.4 / 0.55 < 0.8.
    r = verify_adaptive(draft, logits, SCORER, AdaptiveSettings(enabled=True, tau=0.8))
    assert (r.accepted, r.tokens) == (0, [ID["Ġthe"]])


def test_adaptive_never_relaxes_key_tokens():
    tiny = AdaptiveSettings(enabled=True, tau=1e-9, max_entropy=math.inf)
    filler_top = ["Ġthe", ",", "Ġ"]
    for key in ["Ġx", "Ġy", "Ġ42", "7", "+", "==", "Ġreturn", "<|endoftext|>"]:
        assert SCORER.is_key[ID[key]]
        for top in filler_top:
            logits = torch.stack([row({top: 0.5, key: 0.49}), row({"Ġx": 0.9})])
            r = verify_adaptive([ID[key]], logits, SCORER, tiny)
            assert (r.accepted, r.relaxed, r.tokens) == (0, 0, [ID[top]]), (key, top)
    # ... nor lets a non-key draft token replace a key token the target wanted.
    logits = torch.stack([row({"Ġ42": 0.5, "Ġthe": 0.49}), row({"Ġx": 0.9})])
    assert verify_adaptive([ID["Ġthe"]], logits, SCORER, tiny).tokens == [ID["Ġ42"]]


def test_adaptive_entropy_cap_blocks_relaxation_at_open_choices():
    flat = row({t: 0.07 for t in VOCAB})  # near-uniform over 14 tokens: entropy ~ 2.64 nats
    logits = torch.stack([flat + torch.eye(len(VOCAB))[ID["Ġthe"]] * 0.01, row({"Ġx": 0.9})])
    draft = [ID["Ġa"]]
    assert verify_adaptive(draft, logits, SCORER, AdaptiveSettings(True, 0.3, 5.0)).accepted == 1
    assert verify_adaptive(draft, logits, SCORER, AdaptiveSettings(True, 0.3, 2.0)).accepted == 0


def test_adaptive_disabled_is_greedy():
    g = torch.Generator().manual_seed(4)
    off = AdaptiveSettings(enabled=False, tau=0.0, max_entropy=math.inf)
    for _ in range(200):
        logits = torch.randn(4, len(VOCAB), generator=g)
        draft = torch.randint(0, len(VOCAB), (3,), generator=g).tolist()
        assert verify_adaptive(draft, logits, SCORER, off) == verify_greedy(draft, logits)


def test_adaptive_accepts_at_least_greedy_and_more_on_non_key():
    g = torch.Generator().manual_seed(6)
    on = AdaptiveSettings(enabled=True, tau=0.3)
    greedy_total = adaptive_total = 0
    for _ in range(300):
        logits = torch.randn(4, len(VOCAB), generator=g)
        draft = torch.randint(0, len(VOCAB), (3,), generator=g).tolist()
        a, b = verify_adaptive(draft, logits, SCORER, on), verify_greedy(draft, logits)
        assert a.accepted >= b.accepted and a.tokens[:b.accepted] == b.tokens[:b.accepted]
        tops = logits.argmax(-1).tolist()
        assert all(not SCORER.key(t) for i, t in enumerate(a.tokens[:a.accepted]) if t != tops[i])
        assert a.relaxed == sum(t != tops[i] for i, t in enumerate(a.tokens[:a.accepted]))
        greedy_total, adaptive_total = greedy_total + b.accepted, adaptive_total + a.accepted
    assert adaptive_total > greedy_total
