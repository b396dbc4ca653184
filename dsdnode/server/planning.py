"""How a model would be spread over volunteers, from its config alone (nothing downloaded or loaded):
bytes per layer (in the serving dtype, or quantized), layers per server of a given memory, servers
needed, KV cache per 1k positions, and which draft the client would use. Sliding-window layers
are counted as servers hold them: trimmed to their window and a block (docs/ARCHITECTURE.md,
"Sliding-window KV")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from ..errors import BadValue
from ..models.families import check_supported, family_name, held_kv_bytes, layer_windows, sliding_kv_bytes
from ..models.quantization import check_mode, layer_bytes
from ..models.registry import get_entry
from ..models.weights import skeleton
from .memory import RESERVE_BYTES

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str) -> int:
    """Bytes of '24GB', '24GiB', '512MB', '1.5TB' or a plain byte count."""
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in UNITS or value <= 0:
        raise BadValue(f"memory must be a size such as 24GB or 512MiB, got {text!r}")
    return int(value * UNITS[unit])


def plan_config(name: str) -> tuple[PretrainedConfig, str | None, bool]:
    """The config of `name` (a directory with a config.json, or a registry model: its shipped config,
    else its pulled copy), its draft, and whether the draft is a registry pairing (False: a directory)."""
    as_path = Path(name).expanduser()
    if as_path.is_dir() and (as_path / "config.json").exists():
        return AutoConfig.from_pretrained(as_path), None, False
    entry = get_entry(name)
    if entry.config is not None:
        where = entry.config
    else:
        from ..models.fetch import resolve_model_dir

        where = resolve_model_dir(name)
    return AutoConfig.from_pretrained(where), entry.draft, True


@dataclass(frozen=True)
class ServingPlan:
    model: str
    family: str
    num_layers: int
    quant: str
    dtype: torch.dtype
    layer_bytes: int  # the largest layer's weights
    memory_bytes: int  # per server
    cache_budget_bytes: int  # per server, for KV caches (a server's --cache-budget-mb)
    kv_bytes_per_1k: int  # what servers hold for 1024 positions of the whole model, in dtype
    layers_per_server: int
    draft: str | None
    registry: bool
    windows: tuple[int | None, ...] = ()  # each layer's sliding window (None: full attention)
    sliding_kv_bytes: int = 0  # what the sliding layers hold at any length (window - 1 + a block each)
    block: int = 64  # the largest block a server takes (its --max-block)

    @property
    def servers(self) -> int:
        return math.ceil(self.num_layers / self.layers_per_server) if self.layers_per_server else 0

    def lines(self) -> list[str]:
        gib = 2**30
        dtype = str(self.dtype).removeprefix("torch.")
        weights = dtype if self.quant == "none" else f"{self.quant} weight-only ({dtype} activations)"
        out = [f"{self.model}: {self.family}, {self.num_layers} layers, {weights}",
               f"  weights per layer: {self.layer_bytes / gib:.3f} GiB (the largest layer)",
               f"  KV cache per 1k positions: {self.kv_bytes_per_1k / gib:.3f} GiB for all layers "
               f"({self.kv_bytes_per_1k / self.num_layers / 2**20:.2f} MiB per layer, {dtype})"]
        sliding = [w for w in self.windows if w is not None]
        if sliding:
            out.append(f"  sliding-window layers: {len(sliding)} of {self.num_layers} (window {max(sliding)}); "
                       f"servers trim them to the window and a {self.block}-position block: "
                       f"{self.sliding_kv_bytes / 2**20:.1f} MiB in all at any length (counted in the KV figure)")
        if self.layers_per_server:
            out += [f"  layers per server with {self.memory_bytes / 1e9:g} GB: {self.layers_per_server} "
                    f"(after {RESERVE_BYTES >> 20} MiB reserve and a {self.cache_budget_bytes >> 20} MiB KV budget)",
                    f"  servers needed: {self.servers}"]
        else:
            out.append(f"  not one layer fits {self.memory_bytes / 1e9:g} GB after the {RESERVE_BYTES >> 20} MiB "
                       f"reserve and a {self.cache_budget_bytes >> 20} MiB KV budget")
        if self.draft:
            out.append(f"  draft: {self.draft} (same vocabulary; held whole by the client)")
        elif self.registry:
            out.append("  draft: none shares this model's vocabulary: the client drafts by prompt lookup only")
        else:
            out.append("  draft: none paired (a local directory): pass --draft, else prompt lookup only")
        return out


def plan(name: str, memory_bytes: int, quant: str = "none", dtype: torch.dtype = torch.bfloat16,
         cache_budget_bytes: int = 2048 << 20, block: int = 64) -> ServingPlan:
    """block: the largest block a server takes (--max-block), which a trimmed sliding layer keeps
    beside its window."""
    check_mode(quant)
    config, draft, registry = plan_config(name)
    check_supported(config)
    layers = skeleton(config).model.layers
    biggest = max(layer_bytes(layer, quant, dtype) for layer in layers)
    usable = memory_bytes - RESERVE_BYTES - cache_budget_bytes
    per_server = min(config.num_hidden_layers, max(0, usable // biggest))
    return ServingPlan(name, family_name(config), config.num_hidden_layers, quant, dtype, biggest, memory_bytes,
                       cache_budget_bytes, held_kv_bytes(config, 1024, block, dtype), per_server,
                       draft, registry, tuple(layer_windows(config)), sliding_kv_bytes(config, block, dtype), block)
