"""Every family dsdnode serves, through spans loaded from a checkpoint, equals transformers in float32.

Tiny random checkpoints (tests/helpers/tiny_models.py: 4 layers, sliding windows of 12 positions,
mixed layer types, MoE with per-expert tensors as transformers saves them) with texts five windows
long: chained spans, their sliding layers trimmed to the window as servers trim them, give the whole
model's logits in prefill, blocks, rollback, token trees and batched blocks, and greedy DSD (chains
and trees) gives transformers' greedy tokens (over 60 positions for Mistral, Gemma 2 and gpt-oss)."""

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
# greedy DSD over 60 positions (five windows) for one family of each sliding kind: uniform windows,
# alternating with softcapping, alternating with sinks; 40 positions for the others (suite time)
LONG_GREEDY = {"mistral": 44, "gemma2": 44, "gpt_oss": 44}


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
    check_greedy_dsd(whole, head, spans, Span.load(model_dir, 0, 2, torch.float32), LONG_GREEDY.get(family, 24))


def check_forward(whole, head, spans):
    """Prefill, chain blocks each rolled back in part, a token tree with its kept path, a batched
    block: 69 positions, over five windows, in caches that trim their sliding layers (as servers'
    do), which stay window - 1 + the longest block long while the full layers hold every position."""
    caches = [s.new_cache(96, trim_windows=True) for s in spans]
    ids = torch.randint(3, 97, (64,), generator=torch.Generator().manual_seed(1)).tolist()

    def close(got, want):
        assert (got - want).abs().max() < 1e-4, (got - want).abs().max()

    text = ids[:16]
    close(run(head, spans, caches, text, 0), reference(whole, text))  # prefill, longer than the window
    while len(text) < 60:  # blocks of 6 after the text: 4 right, 2 wrong, rolled back by the next block
        block = ids[len(text):len(text) + 4] + [(t + 1) % 97 for t in ids[len(text) + 4:len(text) + 6]]
        close(run(head, spans, caches, block, len(text)), reference(whole, text + block)[len(text):])
        text = text + block[:4]
    # a tree after the text: root r, r -> {a, b}, a -> c; the next block keeps the path r a c
    n, tokens, parents = len(text), [50, 51, 52, 53], [-1, 0, 0, 1]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[i] = mask[p] if p >= 0 else mask[i]
        mask[i, i] = True
    tree_logits = run(head, spans, caches, tokens, n, mask, torch.tensor([[n, n + 1, n + 1, n + 2]]))
    path_text = text + [50, 51, 53]
    fresh = reference(whole, path_text + [60, 61])
    close(tree_logits[[0, 1, 3]], fresh[n:n + 3])
    close(tree_logits[2], reference(whole, text + [50, 52])[-1])
    close(run(head, spans, caches, [60, 61], n + 3, kept=[0, 1, 3]), fresh[n + 3:])
    # batched: this session's next token together with a fresh session's prefill (other window starts)
    other_caches = [s.new_cache(96, trim_windows=True) for s in spans]
    h = [head.embed_tokens([62]), head.embed_tokens(ids[:20])]
    for span, mine, theirs in zip(spans, caches, other_caches):
        h = span.forward_batch([Block(h[0], mine, n + 5), Block(h[1], theirs, 0)])
    close(head.logits(h[0]), reference(whole, path_text + [60, 61, 62])[-1:])
    close(head.logits(h[1]), reference(whole, ids[:20]))
    for span, cache in zip(spans, caches):  # what each cache holds after 69 positions
        sliding = sum(w is not None for w in span.windows)
        assert cache.full.keys.shape[0] == len(span.windows) - sliding and cache.full.rows == 96
        assert cache.sliding.keys.shape[0] == sliding
        if sliding:
            # window - 1 + the longest block (the prefill's), not the 69 positions the full layers hold
            assert cache.window_start > 0 and cache.sliding.rows <= WINDOW - 1 + 16
            assert cache.sliding.nbytes == cache.sliding.rows * cache.sliding.row_bytes
            with pytest.raises(ValueError, match="rolls back past"):  # refused, never answered wrong
                cache.begin_block(cache.window_start, 1)


def check_greedy_dsd(whole, head, spans, weak_draft, new_tokens):
    """`new_tokens` after a 16-token prompt: chains with a 2-layer draft of the same checkpoint (weak:
    blocks partly accepted, rolled back), then trees of several shapes drafted by the whole model."""
    prompt = torch.randint(3, 97, (16,), generator=torch.Generator().manual_seed(2)).tolist()
    want = reference_greedy(whole, prompt, new_tokens)
    rounds = []
    for width, draft in ((1, [weak_draft]), (4, spans)):
        settings = GenerationSettings(max_new_tokens=new_tokens, controller=ControllerSettings(
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
