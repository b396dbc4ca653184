"""The membership scale harness (scripts/membership_scale.py): real lean-peer processes in network
namespaces on several /24s, churn, departures, new servers timed until listed, lookups and a flood
of throw-away ids. Needs root (CI runs as root).

The smallest run (13 peers, 2 a process so that the harness starts its DHT peers in batches, a
10-id flood) runs in every CI run and asserts what does not depend on the machine's speed: every
new server listed (within 30 s of its announce), every lookup answered, the flood hiding no honest
server. It found the harness waiting forever on a batch it had waited for already (at 4+ DHT peer
processes). The larger runs assert the timed targets and run with DSDNODE_SOAK=1 (marker `soak`);
BENCHMARKS.md has the commands and what they measured."""

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


@pytest.mark.heavy
@pytest.mark.timeout(900)
@pytest.mark.skipif(bool(missing_requirements()), reason=missing_requirements() or "ok")
def test_ci_sized_swarm_lists_every_new_server_and_a_flood_hides_none(tmp_path):
    result = run_harness(tmp_path, "--peers", "13", "--servers", "2", "--per-process", "2", "--departures", "4",
                         "--batch", "2", "--trials", "2", "--round-size", "1", "--lookups", "3", "--flood", "10",
                         timeout=840)
    assert result["peers"] == 13 and result["initial_listed"] == "2/2", result
    assert result["trials_listed_at_all"] == result["trials"] == 2, result  # asked until 30 s after each announce
    assert result["lookups_answered"] == result["lookups"] and result["honest_hidden_per_lookup_before_flood"] == [0] * 3
    assert result["flood_ids"] == 10 and result["honest_hidden_per_lookup"] == [0] * 5, result


@pytest.mark.soak
@pytest.mark.heavy
@pytest.mark.timeout(1900)
@pytest.mark.skipif(bool(missing_requirements()), reason=missing_requirements() or "ok")
def test_a_50_id_flood_hides_no_honest_server_and_clients_still_generate(tmp_path, smollm2_dir):
    result = run_harness(tmp_path, "--peers", "24", "--servers", "4", "--departures", "16", "--batch", "8",
                         "--trials", "4", "--lookups", "5", "--flood", "50", "--generate", "2", timeout=1800)
    assert result["trials_listed_at_all"] == result["trials"] == 4, result
    assert result["flood_ids"] == 50 and result["honest_hidden_per_lookup"] == [0] * 5, result
    assert result["generated_after_departures"] == "2/2" and result["generated_during_flood"] == "2/2", result
    assert result["generated_texts_identical"], result


@pytest.mark.soak
@pytest.mark.heavy
@pytest.mark.timeout(1900)
@pytest.mark.skipif(bool(missing_requirements()), reason=missing_requirements() or "ok")
def test_new_servers_are_listed_within_10s_after_departures_and_lookups_are_fast(tmp_path):
    result = run_harness(tmp_path, "--peers", "24", "--servers", "4", "--departures", "16", "--trials", "8",
                         "--lookups", "20", timeout=1800)
    assert result["trials_listed_within_10s"] == result["trials"] == 8, result
    assert result["honest_hidden_per_lookup"] == [0] * 5, result
    assert result["lookup_p95_s"] <= 2.0, result
