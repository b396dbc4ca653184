"""Where a node computes: choosing a torch device, its default dtype, and how many layers fit it.

Servers and clients name a device the same way (`--device auto|cpu|cuda|cuda:N|mps`, `device` in
a node's config file). `auto` takes CUDA, then MPS, then the CPU. A device that does not exist is
one clear error naming what is missing, never a torch traceback from deep inside a load.

Memory-aware spans (`--layers auto` without `--num-layers`): like Petals' block count, a server
takes as many decoder layers as its device memory holds after the KV-cache budget it keeps for
sessions and a safety margin. The size of a layer comes from the model's config alone (its
modules built on the meta device, which costs no memory), never from loading weights."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DEVICE_PATTERN, DEVICE_SYNTAX
from .errors import BadValue

MEMINFO = Path("/proc/meminfo")
MB = 1 << 20


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
    from .net.protocol import HIDDEN_DTYPES

    if name is None:
        return default_dtype(device)
    if name not in HIDDEN_DTYPES:
        raise BadValue(f"dtype must be one of {', '.join(sorted(HIDDEN_DTYPES))}, got {name!r}")
    return HIDDEN_DTYPES[name]


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


# ---- memory ---------------------------------------------------------------------------------
CPU_SAFETY = 0.8  # of MemAvailable: the page cache and the rest of the process live there too
CUDA_SAFETY = 0.9  # of free device memory: the allocator's fragmentation and activations
RESERVE_BYTES = 256 * MB  # runtime and activation workspace, whatever the device


def available_memory_bytes(device: torch.device, meminfo: Path = MEMINFO) -> int:
    """Memory this process could still use on `device`: free CUDA memory (torch.cuda.mem_get_info),
    or the RAM Linux reports as MemAvailable for the CPU (and for MPS, which shares it)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        text = meminfo.read_text()
    except OSError as e:
        raise DeviceError(f"cannot read {meminfo} to size the span to memory ({e.strerror}): "
                          "give --num-layers") from None
    match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.MULTILINE)
    if match is None:
        raise DeviceError(f"{meminfo} has no MemAvailable line to size the span to memory: give --num-layers")
    return int(match.group(1)) * 1024


def layer_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the weights of the largest decoder layer of `config`'s model in `dtype`, from the
    config alone (modules built on the meta device; no weights read)."""
    from .models.weights import skeleton

    layers = skeleton(config).model.layers
    return max(sum(p.numel() for p in layer.parameters()) for layer in layers) * dtype.itemsize


@dataclass(frozen=True)
class MemoryPlan:
    """How many layers fit: usable = min(available x safety - reserve, max_memory) - cache budget."""

    device: str
    available_bytes: int
    max_memory_bytes: int | None  # the operator's cap (--max-memory), None: none
    cache_budget_bytes: int
    layer_bytes: int
    safety: float

    @property
    def usable_bytes(self) -> int:
        usable = int(self.available_bytes * self.safety) - RESERVE_BYTES
        if self.max_memory_bytes is not None:
            usable = min(usable, self.max_memory_bytes)
        return usable - self.cache_budget_bytes

    def layers(self, num_layers: int) -> int:
        """Layers that fit (at most the model's num_layers); a DeviceError when not even one does."""
        fit = self.usable_bytes // self.layer_bytes
        if fit < 1:
            cap = "" if self.max_memory_bytes is None else f", capped by --max-memory {self.max_memory_bytes // MB}"
            raise DeviceError(
                f"--layers auto: not one layer ({self.layer_bytes / MB:.0f} MB) fits {self.device}: "
                f"{self.available_bytes / MB:.0f} MB available x {self.safety:g} - {RESERVE_BYTES // MB} MB reserve"
                f"{cap}, minus --cache-budget-mb {self.cache_budget_bytes // MB}; lower --cache-budget-mb, "
                f"raise --max-memory or give --num-layers")
        return min(fit, num_layers)


def memory_plan(device: torch.device, config, dtype: torch.dtype, *, cache_budget_mb: int,
                max_memory_mb: int = 0, available_bytes: int | None = None) -> MemoryPlan:
    """The plan for serving `config`'s layers on `device`. available_bytes: the device's free memory
    (None: measure it; tests pass a figure)."""
    if available_bytes is None:
        available_bytes = available_memory_bytes(device)
    return MemoryPlan(describe(device), available_bytes, max_memory_mb * MB if max_memory_mb else None,
                      cache_budget_mb * MB, layer_bytes(config, dtype),
                      CUDA_SAFETY if device.type == "cuda" else CPU_SAFETY)
