"""The one table of tensor dtypes dsdnode knows, by name: which may cross the wire, how wide each
is, and which hidden states may have. Names only, so that what needs no tensors (the wire's bounds,
config checks, a DHT-only peer) never imports torch; torch's dtype objects come from the two
functions below, on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import BadValue

if TYPE_CHECKING:
    import torch

WIRE_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "bool": 1}  # name -> bytes per item
HIDDEN_DTYPES = ("bfloat16", "float16", "float32")  # what a span computes in and hidden states travel as


def torch_dtype(name: str) -> torch.dtype:
    """torch's dtype named `name` (one of WIRE_DTYPES)."""
    import torch

    if name not in WIRE_DTYPES:
        raise BadValue(f"dtype must be one of {', '.join(WIRE_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype in WIRE_DTYPES (ValueError for any other)."""
    name = str(dtype).removeprefix("torch.")
    if name not in WIRE_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of {', '.join(WIRE_DTYPES)}")
    return name
