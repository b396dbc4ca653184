"""Read a converted model directory piece by piece.

A server holding layers [a, b) must not pay for the other layers: tensors are read one by one from
the safetensors files by name, and the module classes come from transformers' own implementation
of the architecture (built on the meta device, so building them costs nothing)."""

from __future__ import annotations

import hashlib
import json
import os
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


DIGEST_FILE = ".dsdnode-weights-digest"


def weights_digest(model_dir: Path) -> str:
    """Identity of a model's weights: sha256 over its safetensors files (names and bytes), 32 hex digits.

    Volunteers may hold different weights under one model name (another quantization, a fine-tune, a
    local directory); span records and OpenSession carry this digest so that a chain never mixes them.
    Hashing a multi-GB model takes seconds, so the digest is cached in the directory, keyed by each
    file's size and modification time (a read-only directory is simply hashed again next time)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors files")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = model_dir / DIGEST_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached["files"] == stamp and isinstance(cached["digest"], str):
            return cached["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\x00")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    digest = h.hexdigest()[:32]
    try:
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"files": stamp, "digest": digest}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return digest
