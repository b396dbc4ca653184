"""Read a converted model directory piece by piece.

A server holding layers [a, b) must not pay for the other layers: tensors are read one by one from
the safetensors files by name, and the module classes come from transformers' own implementation
of the architecture (built on the meta device, so building them costs nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig


def load_config(model_dir: Path, attn_implementation: str = "sdpa") -> PretrainedConfig:
    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = attn_implementation
    return config


def skeleton(config: PretrainedConfig) -> nn.Module:
    """The architecture's CausalLM module with no memory behind it, to borrow its classes from."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


class TensorReader:
    """Reads named tensors from a model directory's safetensors files and records which it read."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.exists():
            self.where = {k: self.model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            single = self.model_dir / "model.safetensors"
            with safe_open(single, framework="pt") as f:
                self.where = {k: single for k in f.keys()}
        self.read: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.where

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with prefix, keyed by the rest of the name."""
        keys = [k for k in self.where if k.startswith(prefix)]
        if not keys:
            raise KeyError(f"{self.model_dir} has no tensors under {prefix!r}")
        return {k[len(prefix):]: self.get(k) for k in keys}

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.where[key], framework="pt") as f:
            tensor = f.get_tensor(key)
        self.read.append(key)
        return tensor


def materialize(module: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device | str = "cpu") -> nn.Module:
    """Give a meta-device module real weights on `device` (all of them must be in `state`)."""
    module.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, strict=True, assign=True)
    return module.eval().requires_grad_(False)
