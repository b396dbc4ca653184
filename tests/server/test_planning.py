"""The big-model registry and `models plan`: every entry's shipped config is a supported family whose
draft shares its vocabulary, and plans follow from the config alone (figures checked by hand)."""

import sys

import pytest
import torch
from transformers import AutoConfig

from dsdnode.models.families import check_supported, kv_bytes
from dsdnode.server.planning import parse_memory, plan
from dsdnode.models.registry import load_registry
from tests.helpers import forkserver

BIG = ["llama-3.1-8b-instruct", "llama-3.1-70b-instruct", "qwen2.5-7b-instruct", "qwen2.5-32b-instruct",
       "qwen2.5-72b-instruct", "qwen3-8b", "qwen3-32b", "qwen3-30b-a3b", "mixtral-8x7b-instruct", "gpt-oss-20b",
       "gpt-oss-120b"]


def test_every_big_entry_ships_a_supported_config_and_a_same_vocabulary_draft_or_none():
    reg = load_registry()
    for name in BIG:
        entry = reg[name]
        assert entry.hf_id and entry.config is not None, name
        config = AutoConfig.from_pretrained(entry.config)
        check_supported(config)
        if entry.draft:
            draft = AutoConfig.from_pretrained(reg[entry.draft].config)
            assert draft.vocab_size <= config.vocab_size and draft.model_type == config.model_type.split("_")[0], name
            assert draft.hidden_size < config.hidden_size
    assert [n for n in BIG if not reg[n].draft] == ["mixtral-8x7b-instruct", "gpt-oss-20b", "gpt-oss-120b"]


def test_plan_of_llama_70b_follows_from_its_config():
    p = plan("llama-3.1-70b-instruct", parse_memory("24GB"))
    # one layer: q, o 8192x8192; k, v 1024x8192; gate, up, down 28672x8192; two norms
    params = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192 + 2 * 8192
    assert p.layer_bytes == params * 2
    assert p.layers_per_server == (24 * 10**9 - (256 << 20) - (2048 << 20)) // (params * 2) == 12
    assert p.servers == 7  # ceil(80 / 12)
    assert p.kv_bytes_per_1k == 80 * 2 * 8 * 128 * 2 * 1024  # layers x (k, v) x heads x dim x bf16 x positions
    assert any("llama-3.2-1b-instruct" in line for line in p.lines())
    int4 = plan("llama-3.1-70b-instruct", parse_memory("24GB"), "int4")
    assert int4.layer_bytes < p.layer_bytes * 0.3 and int4.servers < p.servers


def test_plan_of_moe_and_lookup_fallback():
    p = plan("gpt-oss-120b", parse_memory("80GB"), "int8")
    assert any("prompt lookup" in line for line in p.lines())
    assert p.num_layers == 36
    # gpt-oss keeps its experts as 3-D parameters: quantization shrinks attention only
    assert p.layer_bytes > 0.95 * plan("gpt-oss-120b", parse_memory("80GB")).layer_bytes
    deepseek_like = AutoConfig.for_model("deepseek_v3", num_hidden_layers=2, kv_lora_rank=512, qk_rope_head_dim=64)
    assert kv_bytes(deepseek_like, 1, 1, torch.bfloat16) == (512 + 64) * 2  # MLA caches one latent


def test_plan_counts_what_trimmed_sliding_layers_would_hold():
    """gpt-oss-120b: 18 of 36 layers slide over 128 positions; trimmed to window + a 64-position block
    they would hold 18 x 192 positions of 8 KV heads x 64 x (k, v) in bfloat16, whatever the length."""
    p = plan("gpt-oss-120b", parse_memory("80GB"))
    assert p.windows.count(128) == 18 and p.windows.count(None) == 18
    assert p.sliding_kv_bytes == 18 * (128 + 64) * 8 * 64 * 2 * 2
    assert any("sliding-window layers: 18 of 36 (window 128)" in line and "do not trim" in line for line in p.lines())
    full = plan("qwen3-8b", parse_memory("24GB"))
    assert full.sliding_kv_bytes == 0 and not any("sliding" in line for line in full.lines())


def test_parse_memory():
    assert parse_memory("24GB") == 24 * 10**9 and parse_memory("1.5GiB") == 3 * 2**29 and parse_memory("512") == 512
    for bad in ("24XB", "-1GB", "GB", "0"):
        with pytest.raises(ValueError, match="memory must be a size"):
            parse_memory(bad)


def test_plan_cli_prints_the_plan_and_errors_in_one_line():
    run = [sys.executable, "-m", "dsdnode", "models", "plan"]
    out = forkserver.run([*run, "qwen2.5-72b-instruct", "--memory", "24GB", "--quant", "int4"], timeout=300)
    assert out.returncode == 0, out.stderr
    assert "servers needed: 2" in out.stdout and "KV cache per 1k positions: 0.312 GiB" in out.stdout
    bad = forkserver.run([*run, "qwen3-8b", "--memory", "lots"], timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "memory must be a size" in bad.stderr
