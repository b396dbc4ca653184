"""The systemd install steps work as written: scripts/install-systemd.sh (the steps of the unit's
header and README) under a temporary root, then the unit's own ExecStart with the unit's
Environment, as systemd would run it, from an empty HOME. The server must find the model the
steps pulled (in the cache the unit names, not the installing user's), its config, its peers file
and a writable identity path; and systemd-analyze must accept the installed unit."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dsdnode.ready import parse_ready

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "install-systemd.sh"
MODEL = "smollm2-135m"
DSDNODE_BIN = Path(sys.executable).parent / "dsdnode"


def unit_service(path: Path) -> dict[str, list[str]]:
    """The [Service] section of a unit: key -> every value given (Environment= may repeat)."""
    values: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.fixture(scope="module")
def installed(smollm2_dir, tmp_path_factory):
    """Run the install script under a temporary root with an empty HOME. The model is put in the
    cache the unit names beforehand (a link to the pulled test model), so the script's pull is a
    no-op there; pulling anywhere else would download into the empty HOME, which the test checks."""
    root = tmp_path_factory.mktemp("root")
    home = tmp_path_factory.mktemp("home")
    cache_models = root / "var/lib/dsdnode/cache/models"
    cache_models.mkdir(parents=True)
    (cache_models / MODEL).symlink_to(smollm2_dir)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(["bash", str(SCRIPT), "--root", str(root), "--dsdnode", str(DSDNODE_BIN), "--model", MODEL,
                             "--peer", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"],
                            capture_output=True, text=True, env=env, cwd=home, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not (home / ".cache" / "dsdnode").exists(), "the steps pulled the model into the installing user's cache"
    return root, home


def test_the_installed_files_are_where_the_unit_and_config_say(installed):
    root, _ = installed
    unit = root / "etc/systemd/system/dsdnode.service"
    service = unit_service(unit)
    assert service["User"] == ["dsdnode"] and service["Group"] == ["dsdnode"]
    env = dict(e.split("=", 1) for e in service["Environment"])
    assert env["DSDNODE_CACHE"] == str(root / "var/lib/dsdnode/cache")
    assert (Path(env["DSDNODE_CACHE"]) / "models" / MODEL / "config.json").exists()
    command = shlex.split(service["ExecStart"][0])
    assert command[:2] == [str(DSDNODE_BIN), "start"]
    config = Path(command[command.index("--config") + 1])
    assert config == root / "etc/dsdnode/node.toml" and config.exists()
    text = config.read_text()
    assert f'model = "{MODEL}"' in text and str(root / "etc/dsdnode/peers.txt") in text
    peers = (root / "etc/dsdnode/peers.txt").read_text().splitlines()
    assert peers[0].startswith("#") and peers[1].startswith("/ip4/127.0.0.1/tcp/9/p2p/")
    assert service["ReadWritePaths"] == [str(root / "var/lib/dsdnode")]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (this machine has no systemd)")
def test_systemd_analyze_accepts_the_unit(installed):
    root, _ = installed
    result = subprocess.run(["systemd-analyze", "verify", str(root / "etc/systemd/system/dsdnode.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "dsdnode.service" not in result.stderr, result.stderr


@pytest.mark.heavy
def test_the_service_command_starts_from_the_installed_files(installed):
    """ExecStart as systemd runs it (the unit's Environment, an empty HOME), after the operator's
    edits the unit's header asks for (here: a free loopback port and no bootstrap peer)."""
    root, home = installed
    service = unit_service(root / "etc/systemd/system/dsdnode.service")
    config = root / "etc/dsdnode/node.toml"
    text = config.read_text().replace('host = "0.0.0.0"', 'host = "127.0.0.1"').replace("port = 31337", "port = 0")
    config.write_text(text.replace("num_layers = 7", "num_layers = 4"))
    (root / "etc/dsdnode/peers.txt").write_text("# a new swarm\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", **dict(e.split("=", 1) for e in service["Environment"])}
    command = [*shlex.split(service["ExecStart"][0]), "--threads", "1", "--parent-pid", str(os.getpid())]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    ready: dict = {}
    got = threading.Event()

    def pump():
        for line in proc.stdout:
            event = None if got.is_set() else parse_ready(line)
            if event is not None:
                ready.update(event)
                got.set()
        got.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        got.wait(120)
        assert ready.get("event") == "ready", proc.stderr.read() if proc.poll() is not None else "no ready line"
        identity = root / "var/lib/dsdnode/identity.key"
        assert identity.exists() and identity.stat().st_mode & 0o077 == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, proc.stderr.read()
