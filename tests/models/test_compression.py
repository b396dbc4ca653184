"""Cheaper drafts: defaults per device, the reduced head, int8 layers -- and the text stays the target's."""

import asyncio
import copy

import pytest
import torch

from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.local import LocalChain, split_layers
from dsdnode.models.compression import (DEFAULT_CPU_VOCAB, DraftCompression, HalfLinear, frequent_tokens,
                                        quantize_int8)
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.speculative.controller import ControllerSettings
from dsdnode.speculative.draft import Drafter
from dsdnode.speculative.tree import TreeShape
from tests.client.test_generate import ScriptedShapes, reference_greedy
from tests.helpers.tiny_models import tiny_model


def test_defaults_per_device_and_choices():
    assert DraftCompression.for_device(torch.device("cpu")) == DraftCompression(True, DEFAULT_CPU_VOCAB)
    assert DraftCompression.for_device(torch.device("cuda")) == DraftCompression(False, 0)
    assert DraftCompression.for_device(torch.device("cpu"), int8=False, vocab=0).describe() == "uncompressed"
    assert DraftCompression.for_device(torch.device("cuda"), vocab=4096).describe() == "4096-token head"
    with pytest.raises(ValueError, match="CPU only"):
        DraftCompression.for_device(torch.device("cuda"), int8=True)
    with pytest.raises(ValueError, match=">= 0"):
        DraftCompression(vocab=-1)


def test_frequent_tokens_are_the_lowest_ids_and_the_kept_ones():
    assert frequent_tokens(100, 5, {97, 3, 500}).tolist() == [0, 1, 2, 3, 4, 97]
    assert len(frequent_tokens(10, 50, set())) == 10


def test_a_reduced_head_scores_its_tokens_as_the_full_one_and_no_others():
    model = tiny_model("qwen2", seed=1)
    head = Head.of_model(model)
    ids = frequent_tokens(97, 40, {90})
    reduced = head.with_vocabulary(ids)
    hidden = torch.randn(1, 3, 64)
    full, part = head.logits(hidden), reduced.logits(hidden)
    assert part.shape == full.shape
    assert torch.allclose(part[:, ids], full[:, ids], atol=1e-5)
    outside = torch.ones(97, dtype=torch.bool)
    outside[ids] = False
    assert torch.isinf(part[:, outside]).all() and (part[:, outside] < 0).all()


@pytest.mark.parametrize("half", [False, True])
def test_int8_layers_stay_close_and_need_a_float32_cpu_span(half, monkeypatch):
    import dsdnode.models.compression as compression
    monkeypatch.setattr(compression, "cpu_has_bfloat16", lambda: half)  # the down projection's dtype follows the CPU
    model = tiny_model("llama", seed=2).to(torch.bfloat16).float()  # weights a bfloat16 checkpoint holds
    span = Span.of_model(model, 0, 6)
    quantized = quantize_int8(Span.of_model(copy.deepcopy(model), 0, 6))
    kinds = {name.rsplit(".", 1)[-1]: m for name, m in quantized.named_modules() if "proj" in name}
    # FLOAT_MAPS: its input's outliers would be clipped; its weights are the checkpoint's in either dtype
    assert type(kinds["down_proj"]) is (HalfLinear if half else torch.nn.Linear)
    assert kinds["down_proj"].weight.dtype == (torch.bfloat16 if half else torch.float32)
    assert torch.equal(kinds["down_proj"].weight.float(), model.model.layers[-1].mlp.down_proj.weight)
    assert type(kinds["up_proj"]) is not torch.nn.Linear and type(kinds["q_proj"]) is not torch.nn.Linear
    hidden = Head.of_model(model).embed_tokens([5, 6, 7, 8])
    exact = span(hidden, span.new_cache(8), 0)
    approx = quantized(hidden.to(torch.bfloat16), quantized.new_cache(8), 0)  # casts its input to float32
    assert approx.dtype == torch.float32
    assert (approx - exact).norm() / exact.norm() < 0.05
    with pytest.raises(ValueError, match="float32 span on the CPU"):
        quantize_int8(Span.of_model(copy.deepcopy(model).to(torch.bfloat16), 0, 6))


@pytest.mark.parametrize("shape", [TreeShape(1, 4), TreeShape(3, 3)])
def test_a_compressed_draft_changes_speed_not_text(shape):
    """An int8 draft over a third of the vocabulary (a bfloat16 head after float32 layers): float32
    greedy output is still exactly the target's, chains and trees alike."""
    target = tiny_model("qwen2", seed=1)
    draft = copy.deepcopy(target)
    head = Head.of_model(draft).to(torch.bfloat16).with_vocabulary(frequent_tokens(97, 32, set()))
    drafter = Drafter(head, [quantize_int8(Span.of_model(draft, 0, 4))], 256, GenerationSettings().sampling)
    spans = [Span.of_model(target, a, b) for a, b in split_layers(6, 2)]
    settings = GenerationSettings(max_new_tokens=30, controller=ControllerSettings(k_max=4, width_max=3))
    gen = Generator(Head.of_model(target), LocalChain(spans), drafter, settings, eos_ids=set())
    gen.controller = ScriptedShapes(settings.controller, 2, [shape])
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    result = asyncio.run(gen.generate(prompt))
    assert result.tokens == reference_greedy(target, prompt, 30)
    assert sum(r.accepted for r in result.rounds) > 0  # the draft is still of use
