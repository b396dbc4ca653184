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


# Tiny random checkpoints of every family dsdnode serves (models/families.py): hidden 64, 4 layers,
# sliding windows of WINDOW positions (shorter than the tests' prompts) and mixed layer types where
# the family has them, MoE with 4 experts. Saved with save_pretrained, i.e. in the checkpoint layout
# transformers writes and reads (per-expert tensors, Mixtral's block_sparse_moe names), so loading
# them goes through transformers' key conversion as a real checkpoint does.
WINDOW = 12
FAMILY_BASE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   num_hidden_layers=4, vocab_size=97, max_position_embeddings=512, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
FAMILIES = {
    "llama": dict(),
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen2_moe": dict(MOE, num_experts=4, shared_expert_intermediate_size=64, mlp_only_layers=[1],
                      use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3": dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3_moe": dict(MOE, head_dim=16, num_experts=4),
    "gemma2": dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0),
    "gemma3_text": dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, final_logit_softcapping=3.0,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
    "phi3": dict(sliding_window=WINDOW),
    "olmo2": dict(),
    "deepseek_v3": dict(MOE, num_key_value_heads=4, n_routed_experts=4, n_group=2, topk_group=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, n_shared_experts=1,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gpt_oss": dict(head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
}


def tiny_family_model(family: str, seed: int = 0):
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, **{**FAMILY_BASE, **FAMILIES[family]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # as tiny_model: every weight matters (Gemma's norms are 1 + weight)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_tiny_family(family: str, out: Path, seed: int = 0) -> Path:
    tiny_family_model(family, seed).save_pretrained(out)
    return out
