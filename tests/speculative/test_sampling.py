"""logits_to_probs / sample / SamplingSettings: exact values on hand-made inputs."""

import math

import pytest
import torch

from dsdnode.speculative.sampling import SamplingSettings, logits_to_probs, make_rng, sample


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": math.inf}, {"temperature": math.nan},
    {"top_p": 0.0}, {"top_p": 1.01}, {"top_p": -1}, {"seed": 1.5},
])
def test_settings_reject_bad_values(kwargs):
    with pytest.raises(ValueError):
        SamplingSettings(**kwargs)


def test_greedy_is_one_hot_at_argmax():
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.9], [5.0, 1.0, 1.0, 1.0]])
    p = logits_to_probs(logits, SamplingSettings(temperature=0.0))
    assert p.dtype == torch.float32
    assert torch.equal(p, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0], dtype=torch.float64)
    for t in (0.5, 1.0, 2.0):
        p = logits_to_probs(logits, SamplingSettings(temperature=t))
        assert torch.allclose(p, torch.softmax(logits.float() / t, -1), atol=1e-7)


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()
    p = logits_to_probs(logits, SamplingSettings(temperature=1.0, top_p=0.75))
    # 0.5 alone < 0.75, 0.5 + 0.3 reaches it: keep ids 1 and 3, renormalized.
    assert torch.allclose(p, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=1e-6)
    # A tiny top_p still keeps the most likely token.
    p = logits_to_probs(logits, SamplingSettings(temperature=1.0, top_p=1e-6))
    assert torch.equal(p, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # top_p and temperature together: temperature first, then the nucleus.
    p = logits_to_probs(logits, SamplingSettings(temperature=0.5, top_p=0.9))
    sharp = torch.softmax(logits / 0.5, -1)  # [.064, .717, .007, .258] -> keep ids 1, 3
    expect = torch.zeros(4)
    expect[[1, 3]] = sharp[[1, 3]] / sharp[[1, 3]].sum()
    assert torch.allclose(p, expect, atol=1e-6)


def reference_top_p(logits: torch.Tensor, t: float, top_p: float) -> torch.Tensor:
    """Textbook nucleus filter over a full sort, for comparison."""
    p = torch.softmax(logits.double() / t, -1)
    vals, order = p.sort(descending=True)
    keep = (vals.cumsum(0) - vals) < top_p
    out = torch.zeros_like(p)
    out[order[keep]] = vals[keep]
    return (out / out.sum()).float()


@pytest.mark.parametrize("scale,vocab,path", [(8.0, 5000, 1024), (1.5, 20000, 16384),
                                              (0.1, 20000, None)])
def test_top_p_large_vocabulary_matches_reference(scale, vocab, path):
    """Peaked rows are served by the 1024 candidates, broader ones by 16384, flat ones by
    the full sort; every path must give the textbook nucleus."""
    logits = scale * torch.randn(2, vocab, generator=torch.Generator().manual_seed(1))
    s = SamplingSettings(temperature=0.9, top_p=0.9)
    mass = torch.softmax(logits / 0.9, -1).sort(descending=True).values.cumsum(-1)
    first_enough = next((n for n in (1024, 16384) if bool((mass[:, n - 1] >= 0.9).all())), None)
    assert first_enough == path
    got = logits_to_probs(logits, s)
    for i in range(2):
        want = reference_top_p(logits[i], 0.9, 0.9)
        assert torch.equal(got[i] > 0, want > 0)
        assert torch.allclose(got[i], want, atol=1e-6)


def test_batched_rows_are_processed_independently():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    s = SamplingSettings(temperature=0.7, top_p=0.8)
    batch = logits_to_probs(logits, s)
    for i in range(3):
        assert torch.allclose(batch[i], logits_to_probs(logits[i], s))
    assert torch.allclose(batch.sum(-1), torch.ones(3))


def test_masked_logits_get_zero_probability():
    p = logits_to_probs(torch.tensor([0.0, -math.inf, 1.0]), SamplingSettings(temperature=1.0))
    assert p[1] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("bad", [
    torch.tensor([1.0, math.nan]), torch.tensor([1.0, math.inf]),
    torch.tensor([-math.inf, -math.inf]), torch.tensor([1, 2]), torch.zeros(0), [1.0, 2.0],
])
def test_bad_logits_raise(bad):
    with pytest.raises(ValueError):
        logits_to_probs(bad, SamplingSettings(temperature=1.0))


def test_sample_follows_probs_and_is_reproducible():
    probs = torch.tensor([0.0, 0.7, 0.3, 0.0])
    g = make_rng(SamplingSettings(seed=7))
    draws = [sample(probs, g) for _ in range(4000)]
    assert set(draws) <= {1, 2}
    assert abs(draws.count(1) / 4000 - 0.7) < 0.03
    g1, g2 = make_rng(SamplingSettings(seed=3)), make_rng(SamplingSettings(seed=3))
    assert [sample(probs, g1) for _ in range(50)] == [sample(probs, g2) for _ in range(50)]
    assert make_rng(SamplingSettings()) is None


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.tensor([[0.5, 0.5]]),
                                 torch.tensor([0.5, -0.1]), torch.tensor([math.nan, 1.0])])
def test_sample_rejects_bad_probs(bad):
    with pytest.raises(ValueError):
        sample(bad, None)
