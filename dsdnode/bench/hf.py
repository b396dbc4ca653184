"""The no-network reference: transformers' own assisted generation in one process.

Same target and draft weights as the swarm (the bf16 safetensors in the model cache), greedy.
It tells how fast speculative decoding is with no links at all and every layer in one process,
and whether our tokens agree with an independent implementation (in bf16 they may differ on
near-ties: different kernels and block shapes round differently, so this is reported, not asserted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class HFOutput:
    tokens: list[int]  # new tokens, cut before the first stop token
    total_s: float  # the whole generate() call
    prefill_s: float  # a separately timed forward of target and draft over the prompt
    stopped: str

    @property
    def decode_s(self) -> float:
        """generate() time minus the prefill: comparable with the swarm modes' decode time."""
        return max(1e-9, self.total_s - self.prefill_s)


class HFAssisted:
    def __init__(self, target_dir: Path, draft_dir: Path, dtype: torch.dtype = torch.bfloat16):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the bench's own progress lines are what stderr is for
        self.target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
        self.draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=dtype).eval()

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, eos_ids: set[int]) -> HFOutput:
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        self.target(ids, attention_mask=mask)
        self.draft(ids, attention_mask=mask)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self.target.generate(ids, attention_mask=mask, assistant_model=self.draft, do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids),
                                   pad_token_id=min(eos_ids) if eos_ids else None,
                                   temperature=None, top_p=None, top_k=None)
        total_s = time.perf_counter() - t0
        new = out[0, len(prompt):].tolist()
        stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
        if stop is not None:
            return HFOutput(new[:stop], total_s, prefill_s, "eos")
        return HFOutput(new, total_s, prefill_s, "length")
