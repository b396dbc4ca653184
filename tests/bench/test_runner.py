"""`dsdnode bench --quick` end to end: a real swarm of server processes, real prompts, real scoring.

Greedy decoding must give the baseline's tokens in every lossless mode, so the run's own
losslessness check has to come out True; the files a user reads must all be there."""

import json

import pytest
from click.testing import CliRunner

from dsdnode.bench.modes import parse_mode, parse_modes
from dsdnode.bench.report import Divergence, PromptResult, aggregate, markdown
from dsdnode.bench.runner import BenchConfig, BenchResumeError, BenchRun
from dsdnode.cli import main
from dsdnode.speculative.predraft import PredraftSettings


def test_modes_parse_and_reject_unknown_names():
    assert [m.name for m in parse_modes("ar-push, dsd-k4,dsd-k4,dsd-auto-av")] == ["ar-push", "dsd-k4", "dsd-auto-av"]
    assert parse_mode("dsd-k8").k_fixed == 8 and parse_mode("ar-relay").relay
    assert not parse_mode("dsd-auto-av").lossless and parse_mode("dsd-auto-av").options(16).adaptive
    assert not parse_mode("ar-push").options(16).speculative
    assert parse_mode("dsd-k2").options(16).settings().controller.k_fixed == 2
    tree = parse_mode("dsd-tree").options(16).settings()
    assert tree.controller.width_max > 1 and tree.lookup and tree.max_block <= 64  # a default server's max_block
    assert parse_mode("dsd-tree").lossless and not parse_mode("dsd-tree-av").lossless
    assert parse_mode("dsd-tree-av").options(16).adaptive
    for bad in ("dsd-k0", "dsd-kx", "ar", ""):
        with pytest.raises(ValueError):
            parse_modes(bad)


def test_speedups_come_from_the_same_prompts():
    def rec(mode, index, tps, error=None, stopped="length"):
        return PromptResult(0.0, "gsm8k", str(index), index, mode, tokens=[1] * 10, tokens_per_s=tps, rounds=5,
                            decode_s=1.0, error=error, stopped=stopped)
    records = [rec("ar-push", 0, 1.0, stopped="eos"), rec("ar-push", 1, 4.0), rec("ar-push", 2, 2.0),
               rec("dsd-auto", 0, 3.0), rec("dsd-auto", 1, 4.0), rec("dsd-auto", 2, 0.0, error="boom")]
    rows = {r["mode"]: r for r in aggregate(records, ["ar-push", "dsd-auto"])}
    assert rows["ar-push"]["speedup_ratio_of_medians"] == 1.0
    assert rows["ar-push"]["finished"] == 1  # one answer ended by itself, two were cut
    auto = rows["dsd-auto"]
    assert (auto["n"], auto["errors"]) == (3, 1)
    assert auto["tokens_per_s_median"] == 3.5  # the failed prompt is left out
    assert auto["speedup_ratio_of_medians"] == pytest.approx(3.5 / 2.0)
    assert auto["speedup_median_of_ratios"] == pytest.approx(2.0)  # median of 3/1 and 4/4
    assert auto["tokens_per_round"] == 2.0
    assert auto["vs_relay_median_of_ratios"] is None  # no ar-relay in this run
    records += [rec("ar-relay", 0, 0.5), rec("ar-relay", 1, 1.0)]  # none for prompt 2
    rows = {r["mode"]: r for r in aggregate(records, ["ar-push", "ar-relay", "dsd-auto"])}
    assert rows["dsd-auto"]["vs_relay_median_of_ratios"] == pytest.approx(5.0)  # median of 3/0.5 and 4/1
    assert rows["ar-push"]["vs_relay_median_of_ratios"] == pytest.approx(3.0)  # median of 1/0.5, 4/1
    assert rows["ar-relay"]["speedup_median_of_ratios"] == pytest.approx(0.375)  # median of 0.5/1, 1/4
    table = markdown({"command": "dsdnode bench"}, list(rows.values()))
    assert "| vs ar-relay |" in table and "| 5.00x |" in table


def test_drafting_ahead_for_rejections_is_counted():
    """Hit rate: of the rounds that ended in a rejection with branches drafted ahead, those whose
    outcome was one; the time saved compares drafts after the reply with drafts taken from a hit."""
    rec = PromptResult(0.0, "gsm8k", "0", 0, "dsd-tree", tokens=[1] * 10, tokens_per_s=1.0, rounds=4, decode_s=1.0,
                       ks=[3, 3, 3, 3], accepted=[1, 3, 0, 2], rejections=[2, 0, 2, 2],
                       rejection_hits=[True, False, False, False], ahead=["prefill", "rejection", "accept", "none"],
                       draft_ms=[0.0, 10.0, 5.0, 100.0])
    row = aggregate([rec], ["dsd-tree"])[0]
    assert row["ahead_rounds"] == {"prefill": 1, "accept": 1, "rejection": 1, "none": 1}
    assert row["branch_rounds"] == 3  # the gate drafted no branch in round 1
    assert row["rejection_hit_rate"] == pytest.approx(1 / 3)  # round 1 accepted all: no rejection to guess
    assert (row["draft_ms_fresh"], row["draft_ms_after_hit"]) == (100.0, 10.0)
    assert row["draft_ms_saved_per_round"] == pytest.approx(90.0 / 4)
    assert "| 1 / 1 / 1 / 1 | 3 | 33% | 100 | 10 | 22 |" in markdown({}, [row])
    assert parse_mode("dsd-tree").options(16).settings().predraft.rejections == 0
    assert parse_mode("dsd-tree-ssd").options(16).settings().predraft == PredraftSettings(2, gated=True)
    assert parse_mode("dsd-tree-ssd-always").options(16).settings().predraft == PredraftSettings(2, gated=False)


@pytest.mark.heavy
def test_quick_bench_end_to_end(smollm2_dir, tmp_path):
    out = tmp_path / "bench"
    # one problem per dataset (an option given with --quick overrides its setting): suite time
    result = CliRunner().invoke(main, ["bench", "--quick", "--prompts", "1", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "done" and data["machine"]["cpu_count"] and not data["errors"]
    modes = {"ar-push", "dsd-k4", "dsd-auto"}
    assert {p["mode"] for p in data["prompts"]} == modes
    assert len(data["prompts"]) == 3 * 2  # 1 prompt x 2 datasets x 3 modes
    for p in data["prompts"]:
        assert p["error"] is None, p["error"]
        assert p["tokens_per_s"] > 0 and p["tokens"] and p["passed"] is not None
        assert p["identical_to_baseline"] is True, (p["mode"], p["problem_id"])
        assert len(p["ks"]) == len(p["accepted"]) == p["rounds"]
        assert all(0 <= a <= k for a, k in zip(p["accepted"], p["ks"]))
    auto = [p for p in data["prompts"] if p["mode"] == "dsd-auto"]
    assert auto[0]["ks"][0] == 4 and not auto[0]["warm_start"]  # k_initial: nothing learned yet
    # later prompts start from what earlier ones learned (their first k is the model's choice, which
    # may be k_initial again: the flag, not the k, says whether the round cost was carried over)
    assert all(p["warm_start"] for p in auto[1:])
    rows = [r for r in data["aggregates"] if r["dataset"] == "all"]
    assert {r["mode"] for r in rows} == modes
    for r in rows:
        assert r["tokens_per_s_median"] > 0 and r["identical_to_baseline"] is True
        assert sum(r["split_fraction"].values()) == pytest.approx(1.0)
    k4 = next(r for r in rows if r["mode"] == "dsd-k4")
    assert k4["mean_k"] <= 4 and k4["tokens_per_round"] > 1  # a draft identical to the target: near full acceptance
    for name in ("results.md", "speedup_vs_latency.png", "accepted_vs_k.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "| dsd-auto |" in md and "GSM8K asked for steps answers" in md and "/1 ended)" in md
    assert data["settings"]["gsm8k_style"] == "steps"


def test_a_resumed_run_keeps_whole_prompts_only(tmp_path):
    """--resume keeps the prompts an earlier session finished in every mode (so each prompt's ratios
    come from one session) and refuses other settings or other code."""
    config = BenchConfig(out=tmp_path, modes=("ar-push", "dsd-auto"), prompts=2)
    first = BenchRun(config, "dsdnode bench --out x", log=lambda line: None)
    first.sessions = [{"started": "then", "command": first.command, "machine": {"hostname": "a"}}]

    def rec(dataset, index, mode, error=None):
        return PromptResult(50.0, dataset, f"{dataset}/{index}", index, mode, tokens=[1, 2], tokens_per_s=2.0,
                            rounds=2, decode_s=1.0, error=error, divergence=Divergence(1, 2, 3, 0.1, 0.1))
    first.records = [rec("humaneval", 0, "ar-push"), rec("humaneval", 0, "dsd-auto"),  # whole
                     rec("gsm8k", 0, "ar-push"), rec("gsm8k", 0, "dsd-auto", error="boom"),  # failed in one mode
                     rec("humaneval", 1, "ar-push")]  # cut short
    first._save()

    again = BenchRun(config, "dsdnode bench --out x --resume", resume=True, log=lambda line: None)
    again._restore()
    assert again.done == {(50.0, "humaneval", 0)}
    assert [(r.dataset, r.index, r.mode) for r in again.records] == [("humaneval", 0, "ar-push"),
                                                                    ("humaneval", 0, "dsd-auto")]
    assert again.records[0] == first.records[0]  # restored field by field, nested ones too
    assert again.command == "dsdnode bench --out x" and again.sessions == first.sessions

    with pytest.raises(BenchResumeError, match="other settings .*prompts"):
        BenchRun(BenchConfig(out=tmp_path, modes=("ar-push", "dsd-auto"), prompts=3), "c", resume=True)._restore()
    other = BenchRun(config, "c", resume=True)
    other.code = "0" * 16
    with pytest.raises(BenchResumeError, match="other dsdnode code"):
        other._restore()
    with pytest.raises(BenchResumeError, match="nothing to resume"):
        BenchRun(BenchConfig(out=tmp_path / "none"), "c", resume=True)._restore()
