"""The generation loop over an in-process chain: greedy DSD must equal target-only greedy."""

import asyncio

import pytest
import torch

from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.local import LocalChain, split_layers
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.speculative.controller import ControllerSettings, DraftLengthController
from dsdnode.speculative.draft import Drafter
from dsdnode.speculative.predraft import PredraftSettings
from dsdnode.speculative.sampling import SamplingSettings
from dsdnode.speculative.tree import TreeShape
from tests.helpers.devices import DEVICES
from tests.helpers.tiny_models import tiny_model


def reference_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_generator(target, draft_model, draft_layers, n_hops, settings, latency_s=0.0):
    head = Head.of_model(target)
    spans = [Span.of_model(target, a, b) for a, b in split_layers(target.config.num_hidden_layers, n_hops)]
    drafter = Drafter(Head.of_model(draft_model), [Span.of_model(draft_model, 0, draft_layers)], 256,
                      settings.sampling)
    return Generator(head, LocalChain(spans, latency_s), drafter, settings, eos_ids=set())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [None, 1, 3, 6])
def test_greedy_dsd_equals_target_greedy(arch, k, device):
    """On every device (head, draft, spans and caches there), float32 greedy DSD gives exactly the
    tokens of transformers' greedy decoding on the CPU."""
    target = tiny_model(arch, seed=1)
    # draft = the target minus its last layers: a weak but correlated draft, so some blocks are
    # fully accepted, some partly, some not at all
    settings = GenerationSettings(max_new_tokens=40, controller=ControllerSettings(k_fixed=k, k_max=6))
    prompts = [torch.randint(0, 97, (5 + 3 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
               for seed in range(3)]
    references = [reference_greedy(target, prompt, 40) for prompt in prompts]
    target.to(device)
    for prompt, reference in zip(prompts, references):
        gen = make_generator(target, target, 4, n_hops=3, settings=settings)
        result = asyncio.run(gen.generate(prompt))
        assert result.tokens == reference
        assert sum(r.accepted + 1 for r in result.rounds) >= 40


def test_autoregressive_baseline_is_the_same_loop():
    target = tiny_model("qwen2", seed=2)
    prompt = [3, 14, 15, 92, 65]
    gen = make_generator(target, target, 2, 2, GenerationSettings(max_new_tokens=25, speculative=False))
    result = asyncio.run(gen.generate(prompt))
    assert result.tokens == reference_greedy(target, prompt, 25)
    assert all(r.k == 0 for r in result.rounds) and len(result.rounds) == 25
    # the baseline needs no draft model at all
    alone = Generator(gen.head, LocalChain(gen.chain.spans), None, gen.settings, eos_ids=set())
    assert asyncio.run(alone.generate(prompt)).tokens == result.tokens


def test_perfect_draft_is_fully_accepted_and_predrafts_are_used():
    target = tiny_model("llama", seed=3)
    settings = GenerationSettings(max_new_tokens=30, controller=ControllerSettings(k_fixed=4))
    gen = make_generator(target, target, target.config.num_hidden_layers, 2, settings, latency_s=0.02)
    result = asyncio.run(gen.generate([1, 2, 3]))
    assert result.tokens == reference_greedy(target, [1, 2, 3], 30)
    assert all(r.accepted == r.k for r in result.rounds)
    assert sum(r.predrafted for r in result.rounds) > 0  # the overlapped guess held and was kept


def test_eos_stops_and_streams():
    target = tiny_model("llama", seed=4)
    prompt = [7, 8, 9]
    ref = reference_greedy(target, prompt, 20)
    eos = ref[6]
    first = ref.index(eos)
    streamed = []
    settings = GenerationSettings(max_new_tokens=20, controller=ControllerSettings(k_fixed=3))
    gen = make_generator(target, target, 3, 2, settings)
    gen.eos_ids = {eos}
    result = asyncio.run(gen.generate(prompt, on_tokens=streamed.extend))
    assert result.stopped == "eos" and result.tokens == ref[:first] == streamed


def test_sampling_dsd_runs_and_is_seeded():
    target = tiny_model("qwen2", seed=5)
    # timing picks adaptive k and bounds the overlapped draft: fix both for a reproducible run
    settings = GenerationSettings(max_new_tokens=20, overlap=False, controller=ControllerSettings(k_fixed=3),
                                  sampling=SamplingSettings(temperature=0.8, top_p=0.9, seed=7))
    runs = [asyncio.run(make_generator(target, target, 3, 2, settings).generate([5, 6, 7])).tokens for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 20


@pytest.mark.heavy
def test_greedy_dsd_on_real_weights_equals_target_greedy(smollm2_dir):
    """SmolLM2-135M as the target, itself minus its last 10 layers as the draft, float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = ["def add(a, b):\n", "Q: What is 12 * 7?\nA:"]
    for prompt, k in zip(prompts, [None, 5]):
        ids = tok(prompt)["input_ids"]
        settings = GenerationSettings(max_new_tokens=24, controller=ControllerSettings(k_fixed=k, k_max=6))
        result = asyncio.run(make_generator(target, target, 20, 3, settings).generate(ids))
        assert result.tokens == reference_greedy(target, ids, 24)
        assert 0 < result.mean_accepted  # the weak draft is right some of the time


def test_a_trained_controller_carries_over_to_the_next_generation():
    """The second answer starts from the round cost the first one learned (long blocks at once),
    not from k_initial; its acceptance starts from the prior again."""
    target = tiny_model("llama", seed=5)
    controller_settings = ControllerSettings(k_initial=2, k_max=6, prior_acceptance=0.8)
    settings = GenerationSettings(max_new_tokens=24, controller=controller_settings)
    first = make_generator(target, target, target.config.num_hidden_layers, 2, settings, latency_s=0.03)
    result = asyncio.run(first.generate([1, 2, 3]))
    assert result.rounds[0].k == 2 and not result.warm_start
    controller = first.controller
    assert controller.acceptance > 0.8 and controller.timing is not None  # a perfect draft

    second = make_generator(target, target, target.config.num_hidden_layers, 2, settings, latency_s=0.03)
    second.controller = controller
    controller.reset_acceptance()
    expected_first_k = controller.choose_k()
    result = asyncio.run(second.generate([4, 5, 6]))
    assert result.rounds[0].k == expected_first_k > 2 and second.controller is controller and result.warm_start

    # another route with another number of hops: timing is re-learned from k_initial
    third = make_generator(target, target, target.config.num_hidden_layers, 3, settings, latency_s=0.03)
    third.controller = controller
    result = asyncio.run(third.generate([4, 5, 6]))
    assert result.rounds[0].k == 2 and controller.n_hops == 3 and not result.warm_start


def test_a_controller_with_other_settings_is_refused():
    target = tiny_model("llama", seed=5)
    settings = GenerationSettings(max_new_tokens=4)
    gen = make_generator(target, target, 2, 2, settings)
    other = DraftLengthController(ControllerSettings(k_max=3), 2)
    with pytest.raises(ValueError, match="other settings"):
        Generator(gen.head, gen.chain, gen.drafter, settings, set(), controller=other)


class ScriptedShapes(DraftLengthController):
    """A controller that plays a fixed sequence of tree shapes (chains and trees in turn), so a test
    sees every transition: tree -> tree (kept path), tree -> chain, chain -> tree."""

    def __init__(self, settings, n_hops, shapes):
        super().__init__(settings, n_hops)
        self.shapes, self.played = shapes, 0

    def choose_shape(self):
        shape = self.shapes[self.played % len(self.shapes)]
        self.played += 1
        return shape


TREE_SHAPES = [TreeShape(3, 3), TreeShape(1, 4), TreeShape(2, 5), TreeShape(4, 1), TreeShape(1, 2), TreeShape(4, 4)]


def tree_generator(target, draft_layers, n_hops, settings, latency_s=0.0):
    gen = make_generator(target, target, draft_layers, n_hops, settings, latency_s)
    gen.controller = ScriptedShapes(settings.controller, n_hops, TREE_SHAPES)
    return gen


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lookup", [False, True])
@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_tree_dsd_equals_target_greedy(arch, lookup, overlap):
    """Trees of several shapes, chains between them, prompt-lookup branches, trees drafted ahead:
    float32 greedy output is exactly transformers' greedy decoding."""
    target = tiny_model(arch, seed=1)
    settings = GenerationSettings(max_new_tokens=40, lookup=lookup, overlap=overlap,
                                  controller=ControllerSettings(k_max=5, width_max=4))
    prompts = [torch.randint(0, 97, (5 + 3 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
               for seed in range(3)]
    for prompt in prompts:
        gen = tree_generator(target, 4, 3, settings)
        result = asyncio.run(gen.generate(prompt))
        assert result.tokens == reference_greedy(target, prompt, 40)
        if not overlap:  # every shape as scripted: each transition (tree -> chain -> tree ...) is seen
            assert {r.width for r in result.rounds} == {1, 2, 3, 4}
            assert all(r.nodes >= r.width * r.k and not r.predrafted for r in result.rounds)
        else:  # a tree drafted ahead (the part of the last one below the text's continuation) keeps its
            # width, and may be thinner than that, but reaches every depth
            assert any(r.predrafted for r in result.rounds)
            assert all(r.nodes >= r.k for r in result.rounds)


def test_greedy_tree_takes_other_branches(monkeypatch):
    """A weak draft: somewhere the target's token is a draft's second choice, and the tree keeps it."""
    import dsdnode.client.generate as generate_module
    from dsdnode.speculative.verify import verify_tree_greedy
    target = tiny_model("qwen2", seed=1)
    settings = GenerationSettings(max_new_tokens=30, controller=ControllerSettings(k_max=4, width_max=4))
    ranks = []

    def recording(tree, logits):
        result = verify_tree_greedy(tree, logits)
        ranks.extend(result.ranks)
        return result
    monkeypatch.setattr(generate_module, "verify_tree_greedy", recording)
    result = asyncio.run(tree_generator(target, 3, 2, settings).generate([3, 1, 4, 1, 5]))
    assert result.tokens == reference_greedy(target, [3, 1, 4, 1, 5], 30)
    assert any(r > 0 for r in ranks), ranks


def test_trees_are_drafted_while_the_last_block_is_in_flight():
    """A perfect draft: where the draft's own choices (every node's first child) are accepted and the
    bonus token is the one guessed, the next tree (same width, deeper or shallower) comes from the
    overlapped draft, and the text is still the target's."""
    target = tiny_model("llama", seed=3)
    settings = GenerationSettings(max_new_tokens=40, controller=ControllerSettings(k_max=5, width_max=3))
    gen = make_generator(target, target, target.config.num_hidden_layers, 2, settings, latency_s=0.03)
    gen.controller = ScriptedShapes(settings.controller, 2, [TreeShape(3, 3), TreeShape(3, 4), TreeShape(3, 2)])
    result = asyncio.run(gen.generate([1, 2, 3]))
    assert result.tokens == reference_greedy(target, [1, 2, 3], 40)
    rounds = result.rounds
    assert sum(r.predrafted > 0 for r in rounds) >= 3, [r.predrafted for r in rounds]
    assert all(r.predrafted <= r.nodes for r in rounds)


def test_sampled_trees_are_drafted_while_in_flight_too():
    """Sampling: an overlapped tree keeps its draft distributions when the round cuts it to a
    shallower depth, and verification uses them (a perfect draft at a low temperature, so guesses
    hold often)."""
    target = tiny_model("llama", seed=3)
    settings = GenerationSettings(max_new_tokens=30, controller=ControllerSettings(k_max=5, width_max=2),
                                  sampling=SamplingSettings(temperature=0.05, seed=11))
    gen = make_generator(target, target, target.config.num_hidden_layers, 2, settings, latency_s=0.03)
    gen.controller = ScriptedShapes(settings.controller, 2, [TreeShape(2, 4), TreeShape(2, 2), TreeShape(2, 3)])
    result = asyncio.run(gen.generate([1, 2, 3]))
    assert len(result.tokens) == 30
    assert sum(r.predrafted > 0 for r in result.rounds) >= 2, [r.predrafted for r in result.rounds]


def test_rejections_drafted_ahead_are_taken_and_stay_lossless():
    """SSD with a weak draft (rejections are the common outcome): while a block is in flight, trees
    are drafted below its likeliest rejections; where the target's correction is one of them the
    next round takes that tree (no fresh draft after the reply), and the text is the target's."""
    target = tiny_model("qwen2", seed=1)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    runs = {}
    for n in (0, 4):
        settings = GenerationSettings(max_new_tokens=40, predraft=PredraftSettings(rejections=n, gated=False),
                                      controller=ControllerSettings(k_max=3, width_max=2))
        gen = make_generator(target, target, 3, 2, settings, latency_s=0.05)
        gen.controller = ScriptedShapes(settings.controller, 2, [TreeShape(2, 3)])
        runs[n] = asyncio.run(gen.generate(prompt))
        assert runs[n].tokens == reference_greedy(target, prompt, 40)
    off, on = runs[0].rounds, runs[4].rounds
    assert not any(r.rejections or r.ahead == "rejection" for r in off) and runs[0].rejection_hit_rate is None
    assert all(r.rejections == 4 for r in on[:-1])
    hits = [r for r in on if r.rejection_hit]
    assert hits and runs[4].rejection_hit_rate > 0
    assert sum(r.ahead == "rejection" for r in on) == sum(r.rejection_hit for r in on[:-1])


def test_gated_rejections_are_drafted_ahead_once_measured_and_stay_lossless():
    """Gated (the default): the first round has measured no flight time and drafts no branch; with
    a weak draft (rejections likely) and a flight that holds the branches, later rounds draft
    ahead for rejections; the text is the target's either way."""
    target = tiny_model("qwen2", seed=1)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    settings = GenerationSettings(max_new_tokens=40, predraft=PredraftSettings(rejections=4),
                                  controller=ControllerSettings(k_max=3, width_max=2))
    gen = make_generator(target, target, 3, 2, settings, latency_s=0.05)
    gen.controller = ScriptedShapes(settings.controller, 2, [TreeShape(2, 3)])
    result = asyncio.run(gen.generate(prompt))
    assert result.tokens == reference_greedy(target, prompt, 40)
    assert result.rounds[0].rejections == 0
    assert sum(r.rejections > 0 for r in result.rounds) >= len(result.rounds) // 2, [r.rejections for r in result.rounds]
    assert all(r.rejections <= 4 for r in result.rounds)
    assert gen.gate.odds(0.5).flight_s >= 0.05  # the chain sleeps 50 ms a block


def test_the_draft_prefills_with_the_chain():
    """After the prefill the draft has cached the prompt but its last token, so the first proposal
    is one draft forward, and it proposes what a draft without the prefill would."""
    target = tiny_model("qwen2", seed=2)
    prompt = [3, 14, 15, 92, 65, 35]
    settings = GenerationSettings(max_new_tokens=1, overlap=False)
    gen = make_generator(target, target, 3, 2, settings)
    asyncio.run(gen.chain.start_session(32))
    assert asyncio.run(gen._prefill(prompt, TreeShape(2, 3)))[0] is None
    assert gen.drafter.cached == prompt[:-1]
    cold = make_generator(target, target, 3, 2, settings).drafter
    assert gen.drafter.propose_tree(prompt, TreeShape(2, 3)).tokens == cold.propose_tree(prompt, TreeShape(2, 3)).tokens


def test_the_first_tree_is_drafted_while_the_chain_prefills():
    """With overlap the prefill also drafts the first round's tree (the prompt is known: no guess),
    the same tree a draft would propose afterwards, and the first round takes it."""
    target = tiny_model("qwen2", seed=2)
    prompt = [3, 14, 15, 92, 65, 35]
    settings = GenerationSettings(max_new_tokens=12, controller=ControllerSettings(k_max=4, width_max=2))

    async def prefill():
        gen = make_generator(target, target, 3, 2, settings, latency_s=0.05)  # time to draft during the prefill
        await gen.chain.start_session(32)
        return (await gen._prefill(prompt, TreeShape(2, 3)))[0].growth
    first = asyncio.run(prefill())
    assert first.depth >= 1
    cold = make_generator(target, target, 3, 2, settings).drafter
    assert first.tree.tokens == cold.propose_tree(prompt, TreeShape(2, first.depth)).tokens
    result = asyncio.run(make_generator(target, target, 3, 2, settings, latency_s=0.05).generate(prompt))
    assert result.rounds[0].predrafted > 0
    assert result.tokens == reference_greedy(target, prompt, 12)


def test_sampled_trees_run_and_are_seeded():
    target = tiny_model("qwen2", seed=5)
    settings = GenerationSettings(max_new_tokens=20, overlap=False, lookup=True,
                                  controller=ControllerSettings(k_max=5, width_max=4),
                                  sampling=SamplingSettings(temperature=0.8, top_p=0.9, seed=7))
    runs = [asyncio.run(tree_generator(target, 3, 2, settings).generate([5, 6, 7, 5, 6])).tokens for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 20


@pytest.mark.heavy
def test_greedy_tree_dsd_on_real_weights_equals_target_greedy(smollm2_dir):
    """SmolLM2-135M, float32, draft = itself minus its last 10 layers: trees and lookups are lossless."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for prompt in ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n", "Q: What is 12 * 7?\nA:"]:
        ids = tok(prompt)["input_ids"]
        settings = GenerationSettings(max_new_tokens=32, lookup=True, controller=ControllerSettings(k_max=5, width_max=4))
        result = asyncio.run(tree_generator(target, 20, 3, settings).generate(ids))
        assert result.tokens == reference_greedy(target, ids, 32)


@pytest.mark.parametrize("chunk", [None, 7])
def test_pipelined_prefill_gives_the_same_tokens_as_chunk_by_chunk(chunk):
    """A long prompt prefilled as a pipeline (spans overlapping successive chunks) leaves the same
    caches as one chunk after another: the same tokens, exactly, in float32."""
    target = tiny_model("llama", seed=5)
    prompt = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(9)).tolist()
    outputs = {}
    for pipeline in (False, True):
        settings = GenerationSettings(max_new_tokens=20, prefill_chunk=chunk, prefill_pipeline=pipeline,
                                      controller=ControllerSettings(k_fixed=3))
        result = asyncio.run(make_generator(target, target, 2, 3, settings, latency_s=0.002).generate(prompt))
        outputs[pipeline] = result.tokens
        assert result.prefill_chunk == (chunk or 64)
        assert 0 < result.prefill_s <= result.first_token_s
    assert outputs[True] == outputs[False] == reference_greedy(target, prompt, 20)
