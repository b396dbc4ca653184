"""Where a node computes: choosing a torch device and its default dtype.

Servers and clients name a device the same way (`--device auto|cpu|cuda|cuda:N|mps`, `device` in
a node's config file). `auto` takes CUDA, then MPS, then the CPU. A device that does not exist is
one clear error naming what is missing, never a torch traceback from deep inside a load.

How many layers fit a device is the server's question: server/memory.py."""

from __future__ import annotations

import re

import torch

from .config import DEVICE_PATTERN, DEVICE_SYNTAX
from .dtypes import HIDDEN_DTYPES, torch_dtype
from .errors import BadValue


class DeviceError(BadValue):
    """A device that was asked for and is not there (shown to the user as one line)."""


def check_device_spec(spec: str) -> str:
    """`spec` if it is spelled like a device name (whether the device exists is resolve_device's job)."""
    if not isinstance(spec, str) or not re.fullmatch(DEVICE_PATTERN, spec):
        raise DeviceError(f"--device must be {DEVICE_SYNTAX}, got {spec!r}")
    return spec


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device `spec` names, checked to exist here; `auto`: CUDA, then MPS, then CPU."""
    check_device_spec(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = (f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None else
                     f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU: "
                     "check the driver and CUDA_VISIBLE_DEVICES")
            raise DeviceError(f"--device {spec}: no CUDA device is available ({build})")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"--device {spec}: MPS is not available (it needs Apple silicon, macOS 12.3+ and a "
                          f"torch built with MPS; torch {torch.__version__} here)")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def default_dtype(device: torch.device) -> torch.dtype:
    """What a device computes in unless told otherwise.

    bfloat16 on the CPU (1.8-2.6x faster than float32 here) and on CUDA cards that support it;
    float16 on older CUDA cards (no native bfloat16) and on MPS."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype `name` names, or the device's default when None."""
    if name is None:
        return default_dtype(device)
    if name not in HIDDEN_DTYPES:
        raise BadValue(f"dtype must be one of {', '.join(sorted(HIDDEN_DTYPES))}, got {name!r}")
    return torch_dtype(name)


def describe(device: torch.device) -> str:
    """A human name for logs and reports: 'cpu', 'cuda:0 (NVIDIA H100 80GB HBM3)', 'mps'."""
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return device.type


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock time around a call measures the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
