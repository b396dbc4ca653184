"""What dsdnode knows about each decoder family: which attention each layer uses, what its KV cache
holds, which attention kernel transformers allows, and which families are refused.

A span runs transformers' own decoder layers one by one, so it must build the attention mask that
transformers' own model forward would give each layer. The families differ in where that mask comes
from, and a wrong guess gives wrong text without any error (a full causal mask on a sliding-window
layer lets it see positions it never saw in training). So the rule is per family, taken from each
family's `modeling_*.py` in transformers 5.23, and an unlisted family is refused at load rather
than run with a guess."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..errors import BadValue

# model_type -> (display name, how its forward picks each layer's mask):
#   "full":     one causal mask for every layer (no sliding window)
#   "uniform":  every layer slides by config.sliding_window when it is set (Mistral, Mixtral, Phi-3, Qwen3-MoE)
#   "per_layer": config.layer_types[i] ("full_attention" / "sliding_attention") picks layer i's mask
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("Llama 2/3.x", "full"),
    "mistral": ("Mistral", "uniform"),
    "mixtral": ("Mixtral (MoE)", "uniform"),
    "qwen2": ("Qwen2 / Qwen2.5", "per_layer"),
    "qwen2_moe": ("Qwen2-MoE", "per_layer"),
    "qwen3": ("Qwen3", "per_layer"),
    "qwen3_moe": ("Qwen3-MoE", "uniform"),
    "gemma2": ("Gemma 2", "per_layer"),
    "gemma3_text": ("Gemma 3 (text)", "per_layer"),
    "phi3": ("Phi-3 / Phi-4", "uniform"),
    "olmo2": ("OLMo 2", "full"),
    "deepseek_v3": ("DeepSeek-V3 (MLA + MoE)", "full"),
    "gpt_oss": ("gpt-oss", "per_layer"),
}
LAYER_KINDS = {"full_attention": False, "sliding_attention": True}


class UnsupportedModel(BadValue):
    """A model dsdnode cannot serve through spans; the message says why, in one line."""


def family_name(config: PretrainedConfig) -> str:
    return FAMILIES[config.model_type][0]


def check_supported(config: PretrainedConfig) -> None:
    """Refuse a family whose layers a span would run wrongly (unknown mask rule, linear attention,
    chunked attention), with one line saying why."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        names = ", ".join(name for name, _ in FAMILIES.values())
        raise UnsupportedModel(f"model type {model_type!r} is not supported by dsdnode's spans (supported: {names})")
    if FAMILIES[model_type][1] == "per_layer":
        odd = sorted({t for t in config.layer_types if t not in LAYER_KINDS})
        if odd:
            raise UnsupportedModel(f"{model_type} model with layer types {', '.join(odd)}: dsdnode's spans run "
                                   "full and sliding-window attention only")


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window (a query at position q sees keys at positions > q - window), or
    None for full causal attention: what the family's own forward gives each layer."""
    rule = FAMILIES[config.model_type][1]
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if rule == "full" or window is None:
        return [None] * n
    if rule == "uniform":
        return [window] * n
    return [window if LAYER_KINDS[t] else None for t in config.layer_types[:n]]


def attention_implementation(config: PretrainedConfig) -> str:
    """SDPA where transformers allows it; eager where it refuses SDPA (Gemma 2's softcapping,
    gpt-oss's sinks), whose kernels read the mask as additive."""
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


@dataclass(frozen=True)
class KVShape:
    """What one layer caches per position: `heads` keys of `key_dim` and values of `value_dim`."""

    heads: int
    key_dim: int
    value_dim: int

    def bytes_per_position(self, dtype: torch.dtype) -> int:
        return self.heads * (self.key_dim + self.value_dim) * dtype.itemsize


def kv_shape(config: PretrainedConfig) -> KVShape:
    """DeepSeek-V3's multi-head latent attention caches one compressed latent per position (transformers
    5.23 writes the kv_lora_rank latent as the "key" and the rotary part as the "value" and expands
    them per head after reading); the others cache their KV heads."""
    if config.model_type == "deepseek_v3":
        return KVShape(1, config.kv_lora_rank, config.qk_rope_head_dim)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KVShape(config.num_key_value_heads, head_dim, head_dim)


def kv_bytes(config: PretrainedConfig, layers: int, positions: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache for `positions` positions of `layers` layers."""
    return kv_shape(config).bytes_per_position(dtype) * layers * positions


def sliding_kv_bytes(config: PretrainedConfig, block: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache the sliding-window layers hold at any session length in a server (their
    caches trimmed to window - 1 positions before a block and the block: models/span.py), with blocks
    of at most `block` positions."""
    per_position = kv_shape(config).bytes_per_position(dtype)
    return sum(per_position * (window - 1 + block) for window in layer_windows(config) if window is not None)


def held_kv_bytes(config: PretrainedConfig, positions: int, block: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache a server holds for a session of `positions` positions over every layer:
    every position in full-attention layers, at most window - 1 + `block` in sliding ones."""
    per_position = kv_shape(config).bytes_per_position(dtype)
    return sum(per_position * (positions if window is None else min(positions, window - 1 + block))
               for window in layer_windows(config))
