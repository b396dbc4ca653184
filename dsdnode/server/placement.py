"""Which layers a new server should take (`--layers auto`): as many as fit its memory (or
--num-layers), in the window whose layers are served thinnest relative to their load."""

from __future__ import annotations

import logging

from ..errors import BadValue
from ..net.records import SpanRecord, coverage

log = logging.getLogger(__name__)


def auto_width(config, device, dtype, *, num_layers: int, cache_budget_mb: int, max_memory_mb: int = 0,
               available_bytes: int | None = None, quant: str = "none") -> int:
    """How many layers `--layers auto` takes: num_layers when given (> 0), else as many as the
    device's memory holds after the KV-cache budget (memory.MemoryPlan). available_bytes: the
    device's free memory (None: measured; tests pass a figure)."""
    from .memory import MB, memory_plan

    total = config.num_hidden_layers
    if num_layers:
        return min(num_layers, total)
    plan = memory_plan(device, config, dtype, cache_budget_mb=cache_budget_mb, max_memory_mb=max_memory_mb,
                       available_bytes=available_bytes, quant=quant)
    width = plan.layers(total)
    log.info("--layers auto: %d of %d layers (%.1f MB each) fit %s: %.0f MB usable after a %d MB KV-cache budget",
             width, total, plan.layer_bytes / MB, plan.device, plan.usable_bytes / MB, cache_budget_mb)
    return width


def choose_span(records: list[SpanRecord], num_layers: int, width: int) -> tuple[int, int]:
    """The window of `width` layers served thinnest relative to load (first such window on ties).

    A layer's thinness is servers / (1 + sessions): the servers holding it and the sessions active
    on them (from their records). Without load this is the window with the fewest servers; with it,
    a new server joins where each existing one carries the most sessions."""
    width = max(1, min(width, num_layers))
    counts = coverage(records, num_layers)
    load = [0] * num_layers
    for r in records:
        for i in range(max(0, r.start), min(num_layers, r.end)):
            load[i] += r.active_sessions
    thin = [n / (1 + d) for n, d in zip(counts, load)]
    best = min(range(num_layers - width + 1), key=lambda s: (max(thin[s:s + width]), sum(thin[s:s + width]), s))
    return best, best + width


def parse_layers(text: str, num_layers: int) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise BadValue(f"--layers must look like START:END (e.g. 0:7) or 'auto', got {text!r}") from None
    if not 0 <= a < b <= num_layers:
        raise BadValue(f"--layers {text}: this model has layers 0:{num_layers}")
    return a, b
