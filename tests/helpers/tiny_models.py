"""Tiny random Llama / Qwen2 models, saved in the same layout `dsdnode models pull` produces."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=6, vocab_size=97, max_position_embeddings=512)


def tiny_config(arch: str, **overrides):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = cls(**{**TINY, **overrides}, tie_word_embeddings=(arch == "llama"))
    config._attn_implementation = "sdpa"
    return config


def tiny_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()
    # random init leaves the norms at 1 and q/k small: perturb so every weight matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_tiny_model(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    model = tiny_model(arch, seed, **overrides)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    return out
