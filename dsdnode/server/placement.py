"""Which layers a new server should take (`--layers auto`): the least-covered window."""

from __future__ import annotations

from ..net.dht import SpanRecord, coverage


def choose_span(records: list[SpanRecord], num_layers: int, width: int) -> tuple[int, int]:
    """The window of `width` layers with the fewest servers (first such window on ties)."""
    width = max(1, min(width, num_layers))
    counts = coverage(records, num_layers)
    best = min(range(num_layers - width + 1), key=lambda s: (max(counts[s:s + width]), sum(counts[s:s + width]), s))
    return best, best + width


def parse_layers(text: str, num_layers: int) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--layers must look like START:END (e.g. 0:7) or 'auto', got {text!r}") from None
    if not 0 <= a < b <= num_layers:
        raise ValueError(f"--layers {text}: this model has layers 0:{num_layers}")
    return a, b
