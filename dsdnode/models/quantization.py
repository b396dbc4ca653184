"""Weight-only quantization of a server's span: fewer bytes per layer, so a volunteer holds more layers.

Both through bitsandbytes (CPU and CUDA):
- int8: LLM.int8()'s Linear8bitLt with threshold 0: int8 weights with one float32 scale per output
  row (the inputs are quantized per row inside the matmul; no float16 outlier path).
- int4: 4-bit NF4 (Linear4bit: blocks of 64 weights, one float32 scale each; the weights are
  dequantized to the span's dtype inside each matmul).
torchao was tried first and not kept: installed, transformers 5.23 imports it in every process that
imports transformers (its quantizer registry), which printed warnings and cost seconds at every
start, and torchao 0.18's CPU int4 keeps one 4-bit value per byte (IntxUnpackedToInt8Tensor).

Only the decoder layers' nn.Linear maps are quantized (attention and MLP projections). Norms,
biases, and experts that transformers 5 keeps as one 3-D parameter per layer (Mixtral, Qwen-MoE,
DeepSeek-V3, gpt-oss) stay in the span's dtype: an MoE layer shrinks by its attention only.

Quantized weights give other hidden states than the checkpoint's, so a chain must not mix them:
span records and sessions carry the mode (`quant`), and a client chains only servers of its mode."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import BadValue

QUANT_MODES = ("none", "int8", "int4")
NF4_BLOCK = 64


class QuantizationError(BadValue):
    """A quantization mode that cannot be used here; the message says why."""


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise QuantizationError(f"quantization must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    return mode


def quantized_maps(layer: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every linear map a quantized layer holds in low precision."""
    return [(layer.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], m)
            for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


def _not_a_cast_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def quantize_layers(layers: nn.ModuleList, mode: str, dtype: torch.dtype) -> nn.ModuleList:
    """The layers, changed in place, with their linear maps quantized (`mode` "none": unchanged)."""
    check_mode(mode)
    if mode == "none":
        return layers
    import bitsandbytes as bnb

    # int8 matmuls take float16 inputs: bitsandbytes logs a warning at every matmul of another dtype
    # (seven per layer per block in bfloat16), which would fill a server's log; the cast is expected
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_a_cast_notice)

    for layer in layers:
        for parent, attr, linear in quantized_maps(layer):
            device, bias = linear.weight.device, linear.bias is not None
            if mode == "int8":
                q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                        has_fp16_weights=False, threshold=0.0, device="meta")
                q.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False,
                                             has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                                      compress_statistics=False, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, compress_statistics=False,
                                             quant_type="nf4", blocksize=NF4_BLOCK)
            if bias:
                q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
            setattr(parent, attr, q.to(device).eval())
    return layers


def linear_bytes(out_features: int, in_features: int, mode: str, itemsize: int) -> int:
    """Bytes of one linear map's weight in `mode` (without its bias)."""
    n = out_features * in_features
    if mode == "int8":
        return n + out_features * 4  # int8 weights and a float32 scale per row
    if mode == "int4":
        return n // 2 + (n // NF4_BLOCK) * 4
    return n * itemsize


def layer_bytes(layer: nn.Module, mode: str, dtype: torch.dtype) -> int:
    """Bytes of a (meta-device or real, unquantized) layer's weights once quantized in `mode`."""
    total = sum(p.numel() for p in layer.parameters()) * dtype.itemsize
    if mode == "none":
        return total
    for _parent, _attr, linear in quantized_maps(layer):
        total += linear_bytes(linear.out_features, linear.in_features, mode, dtype.itemsize) \
            - linear.weight.numel() * dtype.itemsize
    return total


def stored_bytes(module: nn.Module) -> int:
    """Bytes a (possibly quantized) module's weights occupy: bitsandbytes' packed weights and their
    scales (an int8 weight's row scales, a 4-bit weight's block scales) included."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        total += t.numel() * t.element_size()
        for scales in (getattr(t, "SCB", None), getattr(getattr(t, "quant_state", None), "absmax", None)):
            if scales is not None:
                total += scales.numel() * scales.element_size()
    return total
