"""`dsdnode bench --clients`: its aggregate rows and targets, from records (no swarm)."""

from pathlib import Path

import pytest

from dsdnode.bench.clients import ClientRecord, ClientsConfig, ClientsRun, percentile


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)


def test_rows_carry_what_the_issue_asks_and_targets_compare_with_one_client(tmp_path: Path):
    run = ClientsRun(ClientsConfig(out=tmp_path, clients=(1, 4)), "test")
    for batching, walls in ((True, (10.0, 10.0)), (False, (10.0, 40.0))):
        for n, wall in zip((1, 4), walls):
            for i in range(n):
                run.records.append(ClientRecord(batching, n, i, "humaneval", f"p{i}", 5, tokens=[1] * 20,
                                                tokens_per_s=2.0 + i, same_tokens_as_first_run=True))
            run.waves.append({"clients": n, "batching": batching, "wall_s": wall, "loadavg_1m_before": 1.0,
                              "loadavg_1m_after": 1.0})
    rows = run.rows()
    assert [(r["clients"], r["batching"]) for r in rows] == [(1, True), (4, True), (1, False), (4, False)]
    on4 = rows[1]
    assert on4["aggregate_tokens_per_s"] == 8.0 and on4["per_client_tokens_per_s_p50"] == 3.5
    assert on4["per_client_tokens_per_s_min"] == 2.0 and on4["same_tokens"] == "4/4"
    targets = {t["batching"]: t for t in run.targets(rows)}
    assert targets[True]["aggregate_vs_one_client"] == 4.0 and targets[False]["aggregate_vs_one_client"] == 1.0
    assert targets[True]["p50_client_vs_one_client"] == 1.75
    text = run.markdown(run.meta(), rows)
    assert "| on | 4 | 8.00 | 3.50 |" in text and "4.00x" in text


def test_bad_settings_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="client counts"):
        ClientsConfig(out=tmp_path, clients=())
    with pytest.raises(ValueError, match="does not run on the swarm"):
        ClientsConfig(out=tmp_path, mode="hf-assisted")
