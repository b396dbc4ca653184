"""Prompt-lookup drafting (the fallback of a target without a draft model): greedy through it gives
exactly the target's greedy tokens in float32, and lookups do get accepted."""

import asyncio

import pytest
import torch

from dsdnode.client.generate import GenerationSettings, Generator
from dsdnode.client.local import LocalChain, split_layers
from dsdnode.models.head import Head
from dsdnode.models.span import Span
from dsdnode.speculative.controller import ControllerSettings
from dsdnode.speculative.lookup import LookupGrowth, PromptLookupDrafter
from tests.client.test_generate import reference_greedy
from tests.helpers.tiny_models import tiny_model


def test_lookup_growth_is_a_chain_of_fixed_proposals_that_stops_where_the_match_ends():
    growth = LookupGrowth([5, 6, 7, 8, 5, 6])  # "5 6" was followed by "7 8 5 6"
    while growth.has_room():
        growth.step()
    assert growth.tree.tokens == [7, 8, 5, 6] and growth.tree.is_chain and not any(growth.tree.drafted)
    growth.step()  # past the match: a depth without a node
    assert growth.depth == 5 and len(growth.tree) == 4
    nothing = LookupGrowth([1, 2, 3])
    nothing.step()
    assert len(nothing.tree) == 0 and not nothing.has_room()


@pytest.mark.parametrize("arch,k", [("llama", None), ("qwen2", 4)])
def test_greedy_through_prompt_lookup_equals_target_greedy(arch, k):
    target = tiny_model(arch, seed=3)
    head = Head.of_model(target)
    spans = [Span.of_model(target, a, b) for a, b in split_layers(target.config.num_hidden_layers, 2)]
    settings = GenerationSettings(max_new_tokens=32, controller=ControllerSettings(k_fixed=k, k_max=6))
    accepted = 0
    for seed in range(2):  # prompts that repeat themselves, as code does
        piece = torch.randint(3, 97, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
        prompt = piece + [seed + 1] + piece[:3]
        result = asyncio.run(Generator(head, LocalChain(spans), PromptLookupDrafter(), settings,
                                       eos_ids=set()).generate(prompt))
        assert result.tokens == reference_greedy(target, prompt, 32)
        accepted += sum(r.accepted for r in result.rounds)
    assert accepted > 0  # the lookups were right somewhere: not a plain autoregressive run
