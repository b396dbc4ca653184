"""The membership scale harness (scripts/membership_scale.py): real lean-peer processes in network
namespaces on several /24s, churn, departures, new servers timed until listed, lookups and a flood
of 50 throw-away ids. Needs root (CI runs as root).

The smallest run (13 peers, 8 departures, 4 trials, a 50-id flood) asserts what does not depend on
the machine's speed: every new server listed (within the harness's 30 s), every lookup answered,
and the flood hiding no honest server. It is still too slow for every CI run: on the shared 2-core
machine at load average ~25 it ran past pytest's 300 s limit (2026-12-07), so it runs with
DSDNODE_SOAK=1 (marker `soak`) like the larger one, which asserts the timed targets (10 s after
departures, lookup p95). BENCHMARKS.md has the commands and what they measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.netns import missing_requirements

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "membership_scale.py"


def run_harness(tmp_path: Path, *args: str, timeout: float) -> dict:
    out = tmp_path / "result.json"
    root = str(SCRIPT.parents[1])
    run = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=timeout, cwd=root,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.soak
@pytest.mark.heavy
@pytest.mark.skipif(bool(missing_requirements()), reason=missing_requirements() or "ok")
def test_ci_sized_swarm_lists_every_new_server_and_a_flood_hides_none(tmp_path):
    result = run_harness(tmp_path, "--peers", "15", "--servers", "2", "--departures", "8", "--batch", "8",
                         "--trials", "4", "--lookups", "5", "--flood", "50", timeout=900)
    assert result["initial_listed"] == "2/2", result
    assert result["trials_listed_within_30s"] == result["trials"] == 4, result  # 30 s from the announce request
    assert result["lookups_answered"] == result["lookups"] and result["honest_hidden_per_lookup_before_flood"] == [0] * 5
    assert result["flood_ids"] == 50 and result["honest_hidden_per_lookup"] == [0] * 5, result


@pytest.mark.soak
@pytest.mark.heavy
@pytest.mark.skipif(bool(missing_requirements()), reason=missing_requirements() or "ok")
def test_new_servers_are_listed_within_10s_after_departures_and_lookups_are_fast(tmp_path):
    result = run_harness(tmp_path, "--peers", "24", "--servers", "4", "--departures", "16", "--trials", "8",
                         "--lookups", "20", timeout=1800)
    assert result["trials_listed_within_10s"] == result["trials"] == 8, result
    assert result["honest_hidden_per_lookup"] == [0] * 5, result
    assert result["lookup_p95_s"] <= 2.0, result
