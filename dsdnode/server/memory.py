"""How many decoder layers fit a device (`--layers auto` without `--num-layers`), for placement.py.

Like Petals' block count, a server takes as many decoder layers as its device memory holds after
the KV-cache budget it keeps for sessions and a safety margin. The size of a layer comes from the
model's config alone (its modules built on the meta device, which costs no memory), never from
loading weights."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..devices import DeviceError, describe
from ..models.weights import skeleton

MEMINFO = Path("/proc/meminfo")
MB = 1 << 20
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


def layer_bytes(config, dtype: torch.dtype, quant: str = "none") -> int:
    """Bytes of the weights of the largest decoder layer of `config`'s model in `dtype`, quantized
    as `quant` says (models/quantization.py), from the config alone (modules built on the meta
    device; no weights read)."""
    from ..models import quantization

    return max(quantization.layer_bytes(layer, quant, dtype) for layer in skeleton(config).model.layers)


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


def memory_plan(device: torch.device, config, dtype: torch.dtype, *, cache_budget_mb: int, quant: str = "none",
                max_memory_mb: int = 0, available_bytes: int | None = None) -> MemoryPlan:
    """The plan for serving `config`'s layers on `device`. available_bytes: the device's free memory
    (None: measure it; tests pass a figure)."""
    if available_bytes is None:
        available_bytes = available_memory_bytes(device)
    return MemoryPlan(describe(device), available_bytes, max_memory_mb * MB if max_memory_mb else None,
                      cache_budget_mb * MB, layer_bytes(config, dtype, quant),
                      CUDA_SAFETY if device.type == "cuda" else CPU_SAFETY)
