"""The membership scale harness (scripts/membership_scale.py) at CI size: real processes in network
namespaces on several /24s, churn, departures and a flood of 50 throw-away ids. A few minutes on
2 cores, so it runs only with DSDNODE_SOAK=1 (marker `soak`); needs root."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.netns import missing_requirements

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "membership_scale.py"


@pytest.mark.soak
@pytest.mark.heavy
@pytest.mark.skipif(bool(missing_requirements()), reason=missing_requirements() or "ok")
def test_new_servers_are_listed_and_a_flood_hides_none(tmp_path):
    out = tmp_path / "result.json"
    root = str(SCRIPT.parents[1])
    run = subprocess.run([sys.executable, str(SCRIPT), "--peers", "24", "--servers", "4", "--departures", "16",
                          "--trials", "8", "--lookups", "20", "--out", str(out)],
                         capture_output=True, text=True, timeout=1800, cwd=root,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["trials_listed_within_10s"] == result["trials"] == 8, result
    assert result["honest_hidden_per_lookup"] == [0] * 5, result
    assert result["lookup_p95_s"] <= 2.0, result
