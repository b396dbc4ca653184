"""The pipelined-prefill model: modelled times, the chunk it chooses, and the meter's fits."""

import pytest

from dsdnode.client.prefill import PrefillCosts, PrefillMeter, choose_chunk


def test_pipelined_time_is_fill_plus_the_bottleneck_per_further_chunk():
    costs = PrefillCosts(n_hops=4, hop_fixed_s=0.02, hop_position_s=0.001, link_s=0.03, link_position_s=0.0005)
    # chunk 64: a hop computes 0.084 s, a hop's uplink carries 2 x 0.032 s: compute is the bottleneck
    fill = 4 * 0.084 + 5 * (0.03 + 0.032)
    assert costs.fill_s(64) == pytest.approx(fill)
    assert costs.pipelined_s(640, 64) == pytest.approx(fill + 9 * 0.084)
    assert costs.sequential_s(640, 64) == pytest.approx(10 * fill)
    slow_uplink = PrefillCosts(4, 0.02, 0.001, 0.03, 0.005)  # now 2 x 0.32 s per chunk on each hop's uplink
    assert slow_uplink.bottleneck_s(64) == pytest.approx(0.64)


def test_chunk_choice_trades_per_block_cost_against_pipeline_fill():
    positions = 2000
    weight_bound = PrefillCosts(4, hop_fixed_s=0.2, hop_position_s=0.0005, link_s=0.02, link_position_s=0.0)
    assert choose_chunk(weight_bound, positions, 64) == 64  # each block costs a whole read of the weights
    latency_bound = PrefillCosts(4, hop_fixed_s=0.001, hop_position_s=0.001, link_s=0.2, link_position_s=0.001)
    chunk = choose_chunk(latency_bound, positions, 64)
    assert chunk < 64  # cheap blocks, long fill: smaller chunks fill the pipeline sooner
    assert latency_bound.pipelined_s(positions, chunk) == min(
        latency_bound.pipelined_s(positions, c) for c in (4, 8, 16, 32, 64))
    assert choose_chunk(weight_bound, 10, 64) == 8 or choose_chunk(weight_bound, 10, 64) == 10
    for costs in (weight_bound, latency_bound):  # pipelining never loses against one chunk after another
        assert costs.pipelined_s(positions, 64) <= costs.sequential_s(positions, 64)
    with pytest.raises(ValueError):
        choose_chunk(weight_bound, 0, 64)
    with pytest.raises(ValueError):
        PrefillCosts(4, -1.0, 0.0, 0.0, 0.0)


def test_meter_fits_compute_and_link_lines_and_falls_back():
    fallback = PrefillCosts(2, 0.5, 0.01, 0.3, 0.0)
    meter = PrefillMeter()
    assert meter.costs(2, fallback) == fallback
    for positions in (1, 5, 9, 64):
        meter.observe(positions, [0.01 + 0.002 * positions] * 2, [0.04 + 0.0003 * positions] * 3)
    costs = meter.costs(2, fallback)
    assert costs.hop_fixed_s == pytest.approx(0.01) and costs.hop_position_s == pytest.approx(0.002)
    assert costs.link_s == pytest.approx(0.04) and costs.link_position_s == pytest.approx(0.0003)
    one_size = PrefillMeter()
    one_size.observe(5, [0.05], [0.1])  # no spread: compute mostly fixed, link all latency
    costs = one_size.costs(1, fallback)
    assert costs.hop_position_s < costs.hop_fixed_s and costs.link_position_s == 0.0
