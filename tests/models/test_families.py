"""Every family dsdnode serves, through spans loaded from a checkpoint, equals transformers in float32.

Tiny random checkpoints (tests/helpers/tiny_models.py: 4 layers, sliding windows of 12 positions,
mixed layer types, MoE with per-expert tensors as transformers saves them) with prompts longer than
the window: chained spans give the whole model's logits in prefill, blocks, rollback, token trees
and batched blocks, and greedy DSD (chains and trees) gives transformers' greedy tokens."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.local import LocalChain
from dsdnode.models.families import UnsupportedModel, layer_windows
from dsdnode.models.head import Head
from dsdnode.models.span import Block, Span
from dsdnode.models.weights import load_config
from dsdnode.speculative.controller import ControllerSettings
from dsdnode.speculative.draft import Drafter
from tests.client.test_generate import TREE_SHAPES, ScriptedShapes, reference_greedy
from tests.helpers.tiny_models import FAMILIES, WINDOW, save_tiny_family

CUTS = [(0, 1), (1, 3), (3, 4)]


def whole_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def run(head, spans, caches, tokens, commit_len, tree=None, positions=None, kept=None):
    h = head.embed_tokens(tokens)
    for span, cache in zip(spans, caches):
        h = span(h, cache, commit_len, tree, positions, kept)
    return head.logits(h)


def reference(whole, ids):
    with torch.no_grad():
        return whole(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_spans_equal_transformers(family, tmp_path):
    """One test per family (loading is most of its cost): the forward, then greedy DSD."""
    model_dir = save_tiny_family(family, tmp_path)
    whole = whole_model(model_dir)
    head = Head.load(model_dir, torch.float32)
    spans = [Span.load(model_dir, a, b, torch.float32) for a, b in CUTS]
    check_forward(whole, head, spans)
    check_greedy_dsd(whole, head, spans, Span.load(model_dir, 0, 2, torch.float32))


def check_forward(whole, head, spans):
    """Prefill, a block, a rollback, a token tree with its kept path, a batched block."""
    caches = [s.new_cache(64) for s in spans]
    ids = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = reference(whole, ids)
    assert len(ids) > 2 * WINDOW

    def close(got, want):
        assert (got - want).abs().max() < 1e-4, (got - want).abs().max()

    close(run(head, spans, caches, ids[:25], 0), ref[:25])  # prefill, longer than the window
    close(run(head, spans, caches, ids[25:30], 25), ref[25:30])  # a block
    other = [(t + 1) % 97 for t in ids[27:31]]  # roll back 3, a different block of 4
    close(run(head, spans, caches, other, 27), reference(whole, ids[:27] + other)[27:])
    # a tree after 31 positions: root r, r -> {a, b}, a -> c; the next block keeps the path r a c
    text = ids[:27] + other
    tokens, parents = [50, 51, 52, 53], [-1, 0, 0, 1]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[i] = mask[p] if p >= 0 else mask[i]
        mask[i, i] = True
    tree_logits = run(head, spans, caches, tokens, 31, mask, torch.tensor([[31, 32, 32, 33]]))
    path_text = text + [50, 51, 53]
    fresh = reference(whole, path_text + [60, 61])
    close(tree_logits[[0, 1, 3]], fresh[31:34])
    close(tree_logits[2], reference(whole, text + [50, 52])[-1])
    close(run(head, spans, caches, [60, 61], 34, kept=[0, 1, 3]), fresh[34:])
    # batched: this session's next token together with a fresh session's prefill
    other_caches = [s.new_cache(64) for s in spans]
    h = [head.embed_tokens([62]), head.embed_tokens(ids[:20])]
    for span, mine, theirs in zip(spans, caches, other_caches):
        h = span.forward_batch([Block(h[0], mine, 36), Block(h[1], theirs, 0)])
    close(head.logits(h[0]), reference(whole, path_text + [60, 61, 62])[-1:])
    close(head.logits(h[1]), ref[:20])


def check_greedy_dsd(whole, head, spans, weak_draft):
    """24 tokens after a 16-token prompt: chains with a 2-layer draft of the same checkpoint (weak:
    blocks partly accepted, rolled back), then trees of several shapes drafted by the whole model."""
    prompt = torch.randint(3, 97, (16,), generator=torch.Generator().manual_seed(2)).tolist()
    want = reference_greedy(whole, prompt, 24)
    rounds = []
    for width, draft in ((1, [weak_draft]), (4, spans)):
        settings = GenerationSettings(max_new_tokens=24, controller=ControllerSettings(
            k_max=5, width_max=width, k_fixed=4 if width == 1 else None))
        gen = Generator(head, LocalChain(spans), Drafter(head, draft, 256, settings.sampling), settings, eos_ids=set())
        if width > 1:
            gen.controller = ScriptedShapes(settings.controller, len(spans), TREE_SHAPES)
        result = asyncio.run(gen.generate(prompt))
        assert result.tokens == want, width
        rounds += result.rounds
    assert any(r.accepted < r.k for r in rounds) and any(r.width > 1 and r.accepted > 0 for r in rounds)


def test_family_windows_follow_transformers():
    """Each family's per-layer windows are read the way its own forward reads them."""
    from transformers import AutoConfig

    def windows(family, **kw):
        return layer_windows(AutoConfig.for_model(family, num_hidden_layers=4, **kw))
    assert windows("mistral", sliding_window=12) == [12] * 4
    assert windows("mistral", sliding_window=None) == [None] * 4
    assert windows("qwen2", use_sliding_window=True, sliding_window=12, max_window_layers=2) == [None, None, 12, 12]
    assert windows("qwen2", sliding_window=12) == [None] * 4  # use_sliding_window off
    assert windows("gemma2", sliding_window=12) == [12, None, 12, None]
    assert windows("llama") == [None] * 4


def test_unsupported_family_is_refused_in_one_line(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("qwen3_next", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97).save_pretrained(tmp_path / "hybrid")
    with pytest.raises(UnsupportedModel, match=r"^model type 'qwen3_next' is not supported .*Gemma 3") as e:
        load_config(tmp_path / "hybrid")
    assert "\n" not in str(e.value)
    config = AutoConfig.for_model("qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  layer_types=["full_attention", "linear_attention"])
    config.save_pretrained(tmp_path / "linear")
    with pytest.raises(UnsupportedModel, match="layer types linear_attention"):
        load_config(tmp_path / "linear")
