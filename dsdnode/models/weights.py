"""Read a converted model directory piece by piece.

A server holding layers [a, b) must not pay for the other layers: tensors are read one by one from
the safetensors files by name, and the module classes come from transformers' own implementation
of the architecture (built on the meta device, so building them costs nothing). The checkpoint's
tensors reach those modules through transformers' own loading code (`convert_and_load_state_dict_in_model`
with the architecture's conversion mapping), so a checkpoint is read exactly as from_pretrained
reads it: renamed keys, per-expert tensors fused into one (Mixtral, Qwen-MoE, DeepSeek-V3)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

from ..errors import BadValue
from .families import UnsupportedModel, attention_implementation, check_supported


def load_config(model_dir: Path) -> PretrainedConfig:
    """The model's config, checked to be a family spans run right (families.check_supported), with
    the attention kernel transformers allows it (SDPA, else eager)."""
    config = AutoConfig.from_pretrained(model_dir)
    check_supported(config)
    quantized = getattr(config, "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else getattr(quantized, "quant_method", "?")
        raise UnsupportedModel(f"{model_dir} holds pre-quantized weights ({method}): spans read bfloat16/float16/"
                               "float32 checkpoints; use a dequantized copy (and `dsdnode start --quant` to shrink it)")
    config._attn_implementation = attention_implementation(config)
    return config


def skeleton(config: PretrainedConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture's CausalLM module with no memory behind it, to borrow its classes from."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))


class CheckpointLoader:
    """Gives named parts of a meta-device model real weights from a checkpoint, one part at a time
    (a decoder layer, the embeddings), converted as transformers' from_pretrained converts them."""

    def __init__(self, model_dir: Path, config: PretrainedConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.model_dir, self.dtype, self.device = Path(model_dir), dtype, torch.device(device)
        self.reader = TensorReader(model_dir)
        self.model = skeleton(config, dtype)
        self.conversions = get_model_conversion_mapping(self.model)

    def part(self, name: str) -> nn.Module:
        """The submodule `name` (e.g. "model.layers.3") with every weight read from the checkpoint's
        tensors under "name." and its non-persistent buffers (rotary frequencies, embedding scale)
        computed as transformers initializes them. A weight the checkpoint lacks is an error."""
        keys = self.reader.keys_under(name + ".")
        if keys:
            state = {k: self.reader.get(k) for k in keys}
            config = LoadStateDictConfig(dtype=self.dtype, device_map={"": self.device},
                                         weight_mapping=self.conversions)
            progress = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
            finally:
                if progress:
                    hf_logging.enable_progress_bar()
            if info.mismatched_keys:
                key, got, want = sorted(info.mismatched_keys)[0]
                raise BadValue(f"{self.model_dir}: tensor {key} has shape {list(got)}, the config says {list(want)}")
        module = self.model.get_submodule(name)
        self._compute_buffers(module)
        missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if missing:
            raise BadValue(f"{self.model_dir} has no weights for {name}.{missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return module.eval().requires_grad_(False)

    def _compute_buffers(self, module: nn.Module) -> None:
        for owner in module.modules():
            meta = [n for n, b in owner.named_buffers(recurse=False) if b.is_meta]
            if not meta:
                continue
            for n in meta:
                setattr(owner, n, torch.empty_like(getattr(owner, n), device=self.device))
            self.model._init_weights(owner)  # fills only what is not loaded (transformers' _is_hf_initialized)


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

    def keys_under(self, prefix: str) -> list[str]:
        return [k for k in self.where if k.startswith(prefix)]

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.where[key], framework="pt") as f:
            tensor = f.get_tensor(key)
        self.read.append(key)
        return tensor


DIGEST_FILE = ".dsdnode-weights-digest"


def weights_identity(model_dir: Path, quant: str = "none") -> str:
    """What span records and sessions name as the weights: the checkpoint's digest, plus the
    quantization a server applied ("+int8", "+int4"), so a chain never mixes quantized and
    unquantized hops (their hidden states differ) unless a client asks for that quantization."""
    digest = weights_digest(model_dir)
    return digest if quant == "none" else f"{digest}+{quant}"


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
