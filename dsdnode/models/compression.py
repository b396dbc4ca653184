"""Cheaper drafts: the draft model's decoder layers in int8, its LM head over the frequent tokens.

A draft only proposes; the target verifies every token, so a draft made cheaper this way changes
speed and acceptance, never the output (greedy text stays the target's, sampling keeps the
target's distribution). On a CPU a draft forward is bound by reading the weights: int8 linear maps
(torch's dynamic quantization, per-channel scales, activations in float32; the MLP's down
projection is not quantized, see FLOAT_MAPS, and keeps the checkpoint's bfloat16 weights where the
CPU has bfloat16 instructions) read about half the bytes of bfloat16, and a head over
the 32k most frequent of 151k tokens reads a fifth of the head's. BENCHMARKS.md has what each costs
in acceptance and saves in draft time (scripts/draft_acceptance.py measures it).

The frequent tokens are the lowest ids: in byte-level BPE vocabularies (Qwen, Llama 3, SmolLM2) ids
follow the merge order, which follows frequency in the tokenizer's training text, so no count over
any benchmark's text picks them (FR-Spec, 2025, counts a corpus; the merge order is a count the
tokenizer already made). The stop tokens are always kept, so the draft can propose the end."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .span import Span
from ..errors import BadValue

DEFAULT_CPU_VOCAB = 32768


@dataclass(frozen=True)
class DraftCompression:
    """int8: the draft's decoder layers with int8 linear maps (CPU only); vocab: the draft proposes
    only the `vocab` most frequent tokens and the stop tokens (0: the whole vocabulary)."""

    int8: bool = False
    vocab: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.vocab, int) or isinstance(self.vocab, bool) or self.vocab < 0:
            raise BadValue(f"the draft vocabulary must be a count of tokens >= 0 (0: all), got {self.vocab!r}")

    @classmethod
    def for_device(cls, device: torch.device, int8: bool | None = None, vocab: int | None = None) -> "DraftCompression":
        """The given choices, the device's defaults for the others: both on a CPU (measured there),
        neither elsewhere (torch's int8 linear maps are CPU kernels; the reduced head is unmeasured
        on GPUs)."""
        cpu = device.type == "cpu"
        chosen = cls(cpu if int8 is None else int8, (DEFAULT_CPU_VOCAB if cpu else 0) if vocab is None else vocab)
        if chosen.int8 and not cpu:
            raise BadValue(f"an int8 draft runs on the CPU only, not on {device}: use --no-draft-int8")
        return chosen

    def describe(self) -> str:
        int8 = f"int8 layers ({'bfloat16' if cpu_has_bfloat16() else 'float32'} down projections)"
        parts = ([int8] if self.int8 else []) + ([f"{self.vocab}-token head"] if self.vocab else [])
        return ", ".join(parts) or "uncompressed"


# Linear maps not quantized: the MLP's down projection reads the gated activations, whose outliers
# per-tensor dynamic activation quantization clips; with it in int8 too, math drafts lost a fifth of
# their accepted tokens (BENCHMARKS.md). In float32 these maps were half the bytes a draft forward
# read; HalfLinear keeps them in the checkpoint's bfloat16.
FLOAT_MAPS = ("down_proj",)


class HalfLinear(nn.Module):
    """A linear map of a float32 span with bfloat16 weights: half the bytes to read, and on a CPU with
    bfloat16 instructions (AVX512-BF16, AMX) a faster kernel. The draft's checkpoints are bfloat16, so
    the weights are exactly the checkpoint's; only this map's input is rounded to bfloat16, as in the
    uncompressed bfloat16 draft."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else \
            nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (without them torch emulates bfloat16 maps, slower
    than float32 ones)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def quantize_int8(span: Span) -> Span:
    """The span, changed in place, with its linear maps in int8 (per-output-channel scales) but for
    FLOAT_MAPS, which get bfloat16 weights (HalfLinear) where the CPU has bfloat16 instructions and
    stay float32 otherwise (what DraftCompression.describe says); the span must be float32 on the CPU (dynamic
    quantization quantizes float32 weights and runs CPU kernels)."""
    if span.dtype != torch.float32 or span.device.type != "cpu":
        raise ValueError(f"int8 quantization needs a float32 span on the CPU, got {span.dtype} on {span.device}")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    chosen = {name: per_channel_dynamic_qconfig for name, module in span.named_modules()
              if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in FLOAT_MAPS}
    with warnings.catch_warnings():  # torch 2.13 points to torchao for new code; these kernels are torch's own
        warnings.simplefilter("ignore")
        span = quantize_dynamic(span, chosen, dtype=torch.qint8, inplace=True)
    if cpu_has_bfloat16():
        for name, module in list(span.named_modules()):
            parent, _, attr = name.rpartition(".")
            if isinstance(module, nn.Linear) and attr in FLOAT_MAPS:
                setattr(span.get_submodule(parent), attr, HalfLinear(module))
    return span


def frequent_tokens(vocab_size: int, count: int, keep: set[int]) -> torch.Tensor:
    """The ids a reduced head scores: the `count` lowest (module doc) and `keep`, sorted."""
    ids = set(range(min(count, vocab_size))) | {i for i in keep if 0 <= i < vocab_size}
    return torch.tensor(sorted(ids))
