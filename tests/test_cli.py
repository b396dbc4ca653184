"""The command line fails with one clear line and a non-zero exit, never a traceback.

Option values are checked by click (exit 2, usage error) without any process, through CliRunner;
what involves processes (a busy port, an unreachable or empty swarm) runs the real
`python -m dsdnode` in child processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from libp2p.peer.id import ID

from dsdnode.local_swarm import LocalSwarm, start_node
from dsdnode.cli import main
from dsdnode.cli_common import DraftLength, friendly
from dsdnode.net.identity import load_or_create_identity
from tests.helpers.ports import free_port
from tests.helpers import forkserver

ROOT = Path(__file__).resolve().parent.parent
CLI_TIMEOUT_S = 120.0  # one CLI run, model loading included, on a busy 2-core machine


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("args", [
    ["generate", "hi", "--threads", "-1"],
    ["generate", "hi", "--max-new-tokens", "0"],
    ["generate", "hi", "--max-new-tokens", "-5"],
    ["generate", "hi", "--link-latency-ms", "-100"],
    ["generate", "hi", "--link-latency-ms", "nan"],
    ["generate", "hi", "--temperature", "-1"],
    ["generate", "hi", "--temperature", "inf"],
    ["generate", "hi", "--top-p", "0"],
    ["generate", "hi", "--top-p", "1.5"],
    ["generate", "hi", "--k", "abc"],
    ["generate", "hi", "--k", "-1"],
    ["generate", "hi", "--k", "1000"],
    ["generate", "hi", "--k-max", "0"],
    ["generate", "hi", "--hops", "0"],
    ["generate", "hi", "--tau", "2"],
    ["generate", "hi", "--seed", "-1"],
    ["api", "--port", "70000"],
    ["api", "--threads", "-1"],
    ["api", "--k-max", "0"],
    ["bench", "--servers", "0"],
    ["bench", "--prompts", "0"],
    ["bench", "--max-new-tokens", "0"],
    ["bench", "--link-latency-ms", "-1"],
    ["bench", "--threads", "0"],
    ["bench", "--clients", "0,2"],
    ["bench", "--clients", "two"],
    ["bench", "--clients", "1,2", "--modes", "ar-push,dsd-auto"],
    ["bench", "--gsm8k-style", "verbose"],
    ["demo", "--servers", "0"],
    ["demo", "--max-new-tokens", "-5"],
    ["demo", "--link-latency-ms", "-100"],
    ["start", "--port", "-1"],
    ["start", "--port", "65536"],
    ["start", "--threads", "-1"],
    ["start", "--cache-budget-mb", "0"],
    ["start", "--max-session-length", "0"],
    ["start", "--link-latency-ms", "-100"],
    ["start", "--announce-interval", "0"],
    ["start", "--metrics-port", "70000"],
    ["start", "--num-layers", "-1"],
    ["start", "--dtype", "float64"],
    ["start", "--batch-window-ms", "-1"],
    ["start", "--max-batch", "0"],
    ["start", "--max-sessions-per-client", "0"],
    ["start", "--max-queued-per-client", "0"],
], ids=lambda args: " ".join(args))
def test_nonsense_option_values_are_usage_errors(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = error_lines(result.output)
    assert len(errors) == 1 and f"Invalid value for '{args[-2]}'" in errors[0], result.output


@pytest.mark.parametrize("args", [["bench", "--resume"], ["bench", "--resume", "--out", "x", "--overhead"]],
                         ids=lambda args: " ".join(args))
def test_resume_needs_a_run_of_the_modes_to_continue(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    errors = error_lines(result.output)
    assert len(errors) == 1 and "Invalid value for --resume" in errors[0], result.output


def test_draft_length_accepts_auto_and_whole_numbers():
    k = DraftLength()
    assert [k.convert(v, None, None) for v in ("auto", "AUTO", "0", "4", 7)] == ["auto", "auto", 0, 4, 7]


@click.group()
@click.option("-v", "--verbose", count=True)
def cli(verbose):
    """A stand-in for dsdnode's group: the same -v option that friendly reads."""


@cli.command()
@click.argument("kind")
@friendly
def fail(kind):
    from dsdnode.client.routing import NoRoute
    from dsdnode.errors import BadValue, InternalError
    from dsdnode.net.p2p import PeerUnreachable

    raise {"route": NoRoute("no live servers for layers 0-29 of 30"),
           "peer": PeerUnreachable("cannot reach peer\nsecond line"),
           "timeout": TimeoutError(),
           "refused": ConnectionRefusedError("connection refused"),
           "file": FileNotFoundError(2, "No such file or directory", "/nowhere/node.toml"),
           "bad value": BadValue("--layers must look like START:END"),
           "bug": KeyError("boom"),
           "value bug": ValueError("not enough values to unpack"),
           "os bug": OSError(22, "Invalid argument"),
           "invariant": InternalError("two sessions share a cache")}[kind]


HINT = "; rerun with -v (dsdnode -v COMMAND ...) for the traceback"


@pytest.mark.parametrize("kind, line", [
    ("route", "Error: no live servers for layers 0-29 of 30"),
    ("peer", "Error: cannot reach peer second line"),
    ("timeout", "Error: network error: TimeoutError"),
    ("refused", "Error: network error: connection refused"),
    ("file", "Error: [Errno 2] No such file or directory: '/nowhere/node.toml'"),
    ("bad value", "Error: --layers must look like START:END"),
    # what nobody raised for the user is a bug, whatever its builtin type: never shown as bad input
    ("bug", "Error: internal error: KeyError: 'boom'" + HINT),
    ("value bug", "Error: internal error: ValueError: not enough values to unpack" + HINT),
    ("os bug", "Error: internal error: OSError: [Errno 22] Invalid argument" + HINT),
    ("invariant", "Error: internal error: InternalError: two sessions share a cache" + HINT),
])
def test_errors_end_as_one_line(kind, line):
    result = CliRunner().invoke(cli, ["fail", kind])
    assert result.exit_code == 1
    assert result.output.splitlines() == [line]


def test_internal_error_traceback_only_with_v():
    result = CliRunner().invoke(cli, ["-v", "fail", "value bug"])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "ValueError: not enough values to unpack" in result.output
    assert result.output.splitlines()[-1] == "Error: internal error: ValueError: not enough values to unpack"


def test_bad_config_value_is_one_line(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("[node]\nmax_session_length = -5\n")
    result = CliRunner().invoke(main, ["start", "--config", str(path)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"Error: {path}: max_session_length must be >= 1, got -5"]


# ---- real processes ----------------------------------------------------------------------------

def dsdnode(*args: str, timeout: float = CLI_TIMEOUT_S) -> tuple[subprocess.CompletedProcess, float]:
    """Run `python -m dsdnode ARGS` in this checkout (`-m` puts it first on the path); (result, seconds it
    took)."""
    began = time.monotonic()
    result = forkserver.run([sys.executable, "-m", "dsdnode", *args], timeout=timeout, cwd=ROOT)
    return result, time.monotonic() - began


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(result.stderr.splitlines()) == 1 and expected in result.stderr, result.stderr


@pytest.fixture(scope="module")
def bootstrap_peer(tmp_path_factory):
    """A DHT-only peer (`dsdnode start --layers none`) on a fixed port, stopped by pid."""
    node = start_node(["--layers", "none", "--port", str(free_port())],
                      tmp_path_factory.mktemp("bootstrap") / "bootstrap.log")
    try:
        yield node
    finally:
        node.proc.terminate()
        node.proc.wait(20)


@pytest.mark.heavy
def test_busy_port_is_refused_and_the_first_node_keeps_working(bootstrap_peer):
    port = bootstrap_peer.addr.split("/tcp/")[1].split("/")[0]
    for host in ("127.0.0.1", "0.0.0.0"):
        result, _ = dsdnode("start", "--layers", "none", "--host", host, "--port", port, "--parent-pid",
                            str(os.getpid()), timeout=60)
        assert '"ready"' not in result.stdout
        assert_one_line_error(result, f"port {port} on {host} is already in use")
    assert bootstrap_peer.alive()
    result, _ = dsdnode("swarm", "--model", "smollm2-135m", "--bootstrap", bootstrap_peer.addr, "--json")
    assert result.returncode == 1, result.stderr  # the bootstrap peer answers; nobody serves the model
    assert json.loads(result.stdout)["model"] == "smollm2-135m"


def unreachable_bootstrap() -> str:
    """A loopback address nothing listens on (the port was free a moment ago), with a valid peer id."""
    peer_id = ID.from_pubkey(load_or_create_identity(None).public_key).to_base58()
    return f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{peer_id}"


def test_swarm_with_unreachable_bootstrap_is_one_line():
    result, took = dsdnode("swarm", "--model", "smollm2-135m", "--bootstrap", unreachable_bootstrap(), timeout=60)
    assert_one_line_error(result, "cannot reach any bootstrap peer (")
    assert took < 60


@pytest.mark.heavy
def test_generate_with_unreachable_bootstrap_is_one_line(smollm2_dir):
    result, _ = dsdnode("generate", "hi", "--model", "smollm2-135m", "--k", "0", "--threads", "1",
                        "--bootstrap", unreachable_bootstrap())
    assert_one_line_error(result, "cannot reach any bootstrap peer (")


@pytest.mark.heavy
def test_api_with_unreachable_bootstrap_is_one_line(smollm2_dir):
    result, _ = dsdnode("api", "--model", "smollm2-135m", "--port", "0", "--threads", "1",
                        "--bootstrap", unreachable_bootstrap())
    assert_one_line_error(result, "cannot reach any bootstrap peer (")


@pytest.mark.heavy
def test_generate_for_a_model_nobody_serves_is_one_line(smollm2_dir, bootstrap_peer):
    result, _ = dsdnode("generate", "hi", "--model", "smollm2-135m", "--k", "0", "--threads", "1",
                        "--bootstrap", bootstrap_peer.addr)
    assert_one_line_error(result, "no live servers for layers 0-29 of 30")


@pytest.mark.heavy
def test_generate_longer_than_the_context_is_one_line(smollm2_dir):
    result, _ = dsdnode("generate", "hi", "--model", "smollm2-135m", "--k", "0", "--threads", "1", "--local",
                        "--max-new-tokens", "9000")
    assert_one_line_error(result, "and max_new_tokens 9000 come to 9")
    assert "tokens, more than the model's context (8192 tokens)" in result.stderr


@pytest.mark.heavy
def test_generate_longer_than_the_servers_allow_is_one_line(smollm2_dir, tmp_path):
    """Within the model's context but beyond the servers' session cap: they refuse, the client says so."""
    with LocalSwarm("smollm2-135m", [(0, 30)], tmp_path, dtype="float32",
                    extra_args=["--max-session-length", "64"]) as swarm:
        result, _ = dsdnode("generate", "hi", "--model", "smollm2-135m", "--k", "0", "--threads", "1",
                            "--bootstrap", swarm.bootstrap_addrs[0], "--max-new-tokens", "100")
    assert_one_line_error(result, "64")


@pytest.mark.heavy
def test_generate_without_a_draft_model_says_it_drafts_by_prompt_lookup(smollm2_dir):
    result, _ = dsdnode("generate", "def f(x):", "--model", str(smollm2_dir), "--local", "--hops", "1", "--raw",
                        "--k", "3", "--threads", "1", "--dtype", "float32", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "prompt lookup" in line] == [
        "note: no draft model was given: drafting by prompt lookup (n-gram matches in the text so far)"]
    assert "8 tokens in" in result.stderr
