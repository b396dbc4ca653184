"""The built wheel works on its own: installed (not editable) into a fresh venv, run outside the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import dsdnode

pytestmark = pytest.mark.heavy
REPO = Path(__file__).resolve().parents[1]


def test_built_wheel_installs_and_runs_outside_the_checkout(tmp_path, smollm2_dir):
    src = tmp_path / "src"  # a copy, so building leaves nothing in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "bench-results", "build", "*.egg-info",
                                                              "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("dsdnode-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dsdnode/models/registry.toml" in names
    assert {"dsdnode/api/web/index.html", "dsdnode/api/web/app.js", "dsdnode/api/web/style.css"} <= set(names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=120)
    # the dependencies (torch and the rest, GBs) come from this environment; dsdnode only from the wheel
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "dsdnode-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def run(*args):
        return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    where = run(py, "-c", "import dsdnode; print(dsdnode.__file__)")
    assert where.returncode == 0 and where.stdout.startswith(str(site)), where.stdout + where.stderr
    version = run(venv / "bin" / "dsdnode", "--version")
    assert version.returncode == 0 and version.stdout.split() == ["dsdnode,", "version", dsdnode.__version__]
    listed = run(venv / "bin" / "dsdnode", "models", "list")
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:2] == ["smollm2-135m", "pulled"] for line in listed.stdout.splitlines())
    generated = run(venv / "bin" / "dsdnode", "generate", "--local", "--model", "smollm2-135m", "--k", "0",
                    "--hops", "2", "--max-new-tokens", "4", "--raw", "def add(a, b):")
    assert generated.returncode == 0, generated.stderr
    assert "4 tokens in" in generated.stderr
