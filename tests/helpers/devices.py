"""The devices a test can run on here: the CPU always, CUDA where a GPU is visible.

`DEVICES` parametrizes equality tests over both; the CUDA case carries the `gpu` marker (so
`pytest -m gpu` runs just those, as scripts/gpu-check.sh does) and is skipped with its reason on
machines without a GPU."""

from __future__ import annotations

import pytest
import torch

NO_GPU = (f"no CUDA device here (torch {torch.__version__}"
          f"{' is a CPU build' if torch.version.cuda is None else ' sees no GPU'}): "
          "the gpu tests run on a GPU machine, see scripts/gpu-check.sh")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu], id="cuda")
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]
