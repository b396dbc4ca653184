import pytest
import torch
from transformers import AutoModelForCausalLM

from dsdnode.models.head import Head
from dsdnode.models.span import Span
from tests.helpers.devices import DEVICES
from tests.helpers.tiny_models import tiny_model


def load_whole(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def chain(model_dir, cuts, device="cpu"):
    bounds = [0, *cuts, load_whole(model_dir).config.num_hidden_layers]
    return [Span.load(model_dir, a, b, dtype=torch.float32, device=device) for a, b in zip(bounds, bounds[1:])]


def run_chain(head, spans, caches, ids, commit_len):
    h = head.embed_tokens(ids)
    for span, cache in zip(spans, caches):
        h = span(h, cache, commit_len)
    return head.logits(h)


@pytest.mark.parametrize("device", DEVICES)
def test_chain_of_spans_matches_whole_model(tiny_model_dir, device):
    """On any device, in float32: the chain's logits are the whole model's (run on the CPU)."""
    whole = load_whole(tiny_model_dir)
    head = Head.load(tiny_model_dir, dtype=torch.float32, device=device)
    spans = chain(tiny_model_dir, [2, 4], device)
    caches = [s.new_cache(64) for s in spans]
    assert {s.device.type for s in spans} == {head.device.type} == {device}
    assert all(c.keys.device.type == device for c in caches)
    ids = torch.randint(0, whole.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))[0].tolist()

    prefill = run_chain(head, spans, caches, ids[:12], commit_len=0)
    with torch.no_grad():
        ref = whole(torch.tensor([ids])).logits[0]
    assert (prefill - ref[:12]).abs().max() < 1e-4

    # a block of 5 (as if drafted), then roll back 3 of them and send a different block of 4
    block = run_chain(head, spans, caches, ids[12:17], commit_len=12)
    assert (block - ref[12:17]).abs().max() < 1e-4
    other = [(t + 1) % whole.config.vocab_size for t in ids[14:18]]
    after = run_chain(head, spans, caches, other, commit_len=14)
    with torch.no_grad():
        ref2 = whole(torch.tensor([ids[:14] + other])).logits[0]
    assert (after - ref2[14:]).abs().max() < 1e-4
    assert all(c.length == 18 for c in caches)


def test_truncate_then_recompute_equals_fresh_run(tiny_model_dir):
    head = Head.load(tiny_model_dir, dtype=torch.float32)
    spans = chain(tiny_model_dir, [3])
    ids = list(range(3, 19))
    used = [s.new_cache(32) for s in spans]
    run_chain(head, spans, used, ids[:10], 0)
    run_chain(head, spans, used, [1, 2, 3, 4, 5], 10)  # junk, rolled back below
    again = run_chain(head, spans, used, ids[6:], 6)
    fresh = run_chain(head, spans, [s.new_cache(32) for s in spans], ids, 0)[6:]
    assert torch.allclose(again, fresh, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_block_mask_is_honoured(tiny_model_dir, device):
    """A tree mask where position 2 cannot see position 1 equals running it without position 1
    (mask and positions given as CPU tensors, as they come off the wire)."""
    head = Head.load(tiny_model_dir, dtype=torch.float32, device=device)
    span = Span.load(tiny_model_dir, 0, load_whole(tiny_model_dir).config.num_hidden_layers, dtype=torch.float32,
                     device=device)
    prefix, a, b, c = [5, 6, 7], 11, 12, 13
    cache = span.new_cache(16)
    span(head.embed_tokens(prefix), cache, 0)
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # b and c both follow a
    out = span(head.embed_tokens([a, b, c]), cache, 3, tree_mask=tree, position_ids=torch.tensor([[3, 4, 4]]))
    ref_cache = span.new_cache(16)
    span(head.embed_tokens(prefix), ref_cache, 0)
    ref = span(head.embed_tokens([a, c]), ref_cache, 3)
    assert torch.allclose(head.logits(out)[2], head.logits(ref)[1], atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_kept_path_of_a_tree_continues_like_a_fresh_run(tiny_model_dir, device):
    """A tree block, then the next block keeps only the accepted path (kept): every later logit is
    that of the whole text run afresh, and the cache moved only the path's rows."""
    head = Head.load(tiny_model_dir, dtype=torch.float32, device=device)
    spans = chain(tiny_model_dir, [3], device)
    caches = [s.new_cache(32) for s in spans]
    prefix = [5, 6, 7, 8]
    run_chain(head, spans, caches, prefix[:3], 0)
    # block at 3: root 8, then a -> {b, c}, d (another child of the root), c -> e
    tokens = [8, 11, 12, 13, 14, 15]
    parents = [-1, 0, 1, 1, 0, 3]
    mask = torch.zeros(6, 6, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[i] = mask[p] if p >= 0 else mask[i]
        mask[i, i] = True
    positions = torch.tensor([[3, 4, 5, 5, 4, 6]])
    h = head.embed_tokens(tokens)
    for span, cache in zip(spans, caches):
        h = span(h, cache, 3, tree_mask=mask, position_ids=positions)
    tree_logits = head.logits(h)
    path = [0, 1, 3, 5]  # 8 a c e
    text = prefix[:3] + [tokens[i] for i in path]
    fresh = run_chain(head, spans, [s.new_cache(32) for s in spans], text + [21, 22], 0)
    assert torch.allclose(tree_logits[path], fresh[3:7], atol=1e-4)
    h = head.embed_tokens([21, 22])
    for span, cache in zip(spans, caches):
        h = span(h, cache, 7, kept=path)
    assert torch.allclose(head.logits(h), fresh[7:], atol=1e-4)
    assert all(c.length == 9 for c in caches)
    with pytest.raises(ValueError, match="strictly increasing"):
        spans[0](head.embed_tokens([1]), caches[0], 9, kept=[0, 5])  # the last block had 2 positions


def test_span_reads_only_its_layers(tiny_model_dir):
    span = Span.load(tiny_model_dir, 2, 4, dtype=torch.float32)
    layers = {k.split(".")[2] for k in span.loaded_keys}
    assert layers == {"2", "3"}
    assert all(k.startswith("model.layers.") for k in span.loaded_keys)
    head = Head.load(tiny_model_dir, dtype=torch.float32)
    assert not any(k.startswith("model.layers.") for k in head.loaded_keys)


def test_bad_span_and_overflow_are_clear_errors(tiny_model_dir):
    with pytest.raises(ValueError, match="not a span"):
        Span.load(tiny_model_dir, 4, 99)
    span = Span.load(tiny_model_dir, 0, 2, dtype=torch.float32)
    cache = span.new_cache(4)
    h = torch.zeros(1, 3, span.config.hidden_size)
    span(h, cache, 0)
    with pytest.raises(ValueError, match="outside the cached"):
        span(h[:, :1], cache, 5)
    with pytest.raises(ValueError, match="exceed"):
        span(h, cache, 3)


def test_of_model_shares_weights():
    model = tiny_model("llama")
    span = Span.of_model(model, 1, 3)
    assert span.layers[0] is model.model.layers[1]


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_hidden_states_in_device_results_out(tiny_model_dir, device):
    """A span takes hidden states from the wire (CPU) and computes on its device; the head takes
    them from anywhere and gives float32 logits on the CPU (where verification runs)."""
    head = Head.load(tiny_model_dir, dtype=torch.float32, device=device)
    span = Span.load(tiny_model_dir, 0, 3, dtype=torch.float32, device=device)
    on_cpu = head.embed_tokens([1, 2, 3, 4]).cpu()
    out = span(on_cpu, span.new_cache(8), 0)
    assert out.device.type == device
    logits = head.logits(out.cpu())
    assert logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.shape == (4, head.config.vocab_size)
    ref = span(head.embed_tokens([1, 2, 3, 4]), span.new_cache(8), 0)
    assert torch.allclose(head.logits(ref), logits)


def test_batched_forward_equals_one_session_at_a_time_on_smollm2(smollm2_dir):
    """Blocks of four sessions (different prompt lengths, block lengths, a tree mask and a rollback)
    in one forward_batch give each session what its own forward gives, in float32 on real weights:
    the same logits to float32 rounding (the shared matmuls have more rows, so the BLAS sums in
    another order) and the same greedy token everywhere; each cache ends as its own run leaves it."""
    from dsdnode.models.span import Block

    head = Head.load(smollm2_dir, dtype=torch.float32)
    span = Span.load(smollm2_dir, 0, 30, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    vocab = head.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (9, 17, 4, 12)]
    lone, batched = [span.new_cache(40) for _ in prompts], [span.new_cache(40) for _ in prompts]
    for p, a, b in zip(prompts, lone, batched):
        span(head.embed_tokens(p), a, 0)
        span(head.embed_tokens(p), b, 0)
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    # (tokens, commit_len, tree mask, positions): a lone token, a block of 5, a rollback of 2 then a
    # block of 3, a tree
    asks = [([7], 9, None, None), (list(range(20, 25)), 17, None, None), ([5, 6, 8], 2, None, None),
            ([11, 12, 13], 12, tree, torch.tensor([[12, 13, 13]]))]
    ref = [span(head.embed_tokens(t), c, n, m, pos) for (t, n, m, pos), c in zip(asks, lone)]
    out = span.forward_batch([Block(head.embed_tokens(t), c, n, m, pos) for (t, n, m, pos), c in zip(asks, batched)])
    for r, o, a, b in zip(ref, out, lone, batched):
        assert o.shape == r.shape
        lr, lo = head.logits(r), head.logits(o)
        assert (lr - lo).abs().max() < 1e-3
        assert torch.equal(lr.argmax(-1), lo.argmax(-1))
        assert a.length == b.length
        assert (a.keys[:, :, :, :a.length] - b.keys[:, :, :, :b.length]).abs().max() < 1e-3
    # the next block of every session after the batch: still what its own run gives
    nxt = [head.embed_tokens([3]) for _ in asks]
    ref2 = [span(h, c, c.length) for h, c in zip(nxt, lone)]
    out2 = span.forward_batch([Block(h, c, c.length) for h, c in zip(nxt, batched)])
    for r, o in zip(ref2, out2):
        assert torch.equal(head.logits(r).argmax(-1), head.logits(o).argmax(-1))
        assert (head.logits(r) - head.logits(o)).abs().max() < 1e-3


def test_a_bad_block_fails_before_the_batch_touches_any_cache(tiny_model_dir):
    from dsdnode.models.span import Block

    span = Span.load(tiny_model_dir, 0, 2, dtype=torch.float32)
    good, bad = span.new_cache(8), span.new_cache(4)
    h = torch.zeros(1, 3, span.config.hidden_size)
    with pytest.raises(ValueError, match="exceed"):
        span.forward_batch([Block(h, good, 0), Block(torch.zeros(1, 5, span.config.hidden_size), bad, 0)])
    assert good.length == 0 and bad.length == 0
