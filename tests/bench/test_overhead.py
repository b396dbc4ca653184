"""`dsdnode bench --overhead` over real server processes (SmolLM2, two one-layer hops)."""

import json

import pytest

from dsdnode.bench.overhead import OverheadConfig, run_overhead


@pytest.mark.heavy
def test_overhead_bench_measures_chains_of_real_processes(smollm2_dir, tmp_path):
    result = run_overhead(OverheadConfig(tmp_path, "smollm2-135m", max_hops=2, passes=4, dtype="float32"))
    assert [h.hops for h in result.chains] == [1, 2]
    for h in result.chains:
        assert h.pass_ms > h.compute_ms > 0 and h.overhead_ms > 0
    assert result.chains[0].link_ms is None and result.chains[1].link_ms >= 0
    assert result.per_hop_ms is not None and result.encode_ms > 0 and result.decode_ms > 0
    assert json.loads((tmp_path / "overhead.json").read_text())["frame_bytes"] == result.frame_bytes
    assert "per hop" in (tmp_path / "overhead.md").read_text()
