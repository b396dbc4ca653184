"""An unknown model is reported as unknown, in one line, by every entry point (not as a missing
draft model or a failure further down)."""

import sys

import pytest

import dsdnode
from dsdnode.models.registry import RegistryError
from tests.helpers import forkserver

UNKNOWN = "no-such-model-xyz"


@pytest.mark.parametrize("args", [
    ["generate", "hi", "--model", UNKNOWN, "--local"],
    ["generate", "hi", "--model", UNKNOWN, "--local", "--k", "4"],
    ["api", "--model", UNKNOWN, "--local", "--port", "0"],
])
def test_cli_says_the_model_is_unknown(args):
    result = forkserver.run([sys.executable, "-m", "dsdnode", *args], timeout=120)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: unknown model '{UNKNOWN}'; known models: "), result.stderr
    assert "draft" not in lines[0]


def test_library_says_the_model_is_unknown():
    with pytest.raises(RegistryError, match=f"unknown model '{UNKNOWN}'"):
        dsdnode.connect(UNKNOWN, local=True)
