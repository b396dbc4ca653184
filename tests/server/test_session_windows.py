"""A server charges a session what its cache holds: sliding-window layers trimmed to their window and
a block (models/span.py, SpanCache trim_windows), so a sliding-window family fits more sessions."""

import pytest
import torch

from dsdnode.models.families import kv_bytes
from dsdnode.models.span import Span
from dsdnode.server.sessions import ClientLimits, SessionError, SessionTable
from tests.helpers.tiny_models import WINDOW, tiny_family_model
from tests.server.test_sessions import FakeStream

BLOCK = 8


def write(table: SessionTable, session, positions: int) -> list[int]:
    """Blocks of BLOCK after the session's text, each rolled back by 2 (a partly rejected draft) by
    the next, until the text holds `positions`; the bytes charged after each block."""
    g, commit, charged = torch.Generator().manual_seed(0), 0, []
    while commit < positions:
        table.admit_block(session, commit, BLOCK, queued=0)
        session.span(torch.randn(1, BLOCK, session.span.config.hidden_size, generator=g), session.cache, commit)
        commit += BLOCK - 2
        charged.append(table.used_bytes)
    return charged


@pytest.mark.parametrize("family", ["gemma2", "mistral"])  # alternating sliding/full layers; all sliding
def test_a_session_is_charged_the_window_its_sliding_layers_hold(family):
    span = Span.of_model(tiny_family_model(family).float(), 0, 4)
    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=60)
    session = table.open("a", 0, 4, 1000, client=FakeStream("A"))
    charged = write(table, session, 120)
    cache, sliding = session.cache, sum(w is not None for w in span.windows)
    assert cache.window_start > 100 and cache.sliding.rows == WINDOW - 1 + BLOCK
    assert charged[-1] == cache.nbytes == (cache.full.rows * cache.full.row_bytes
                                           + (WINDOW - 1 + BLOCK) * cache.sliding.row_bytes)
    per_layer_row = kv_bytes(span.config, 1, 1, span.dtype)
    assert cache.sliding.row_bytes == sliding * per_layer_row
    assert cache.full.rows >= 120 and cache.full.row_bytes == (4 - sliding) * per_layer_row
    if sliding == 4:  # nothing grows with the text: the charge stopped at the first window
        assert charged[-1] == charged[2]


def test_more_sessions_of_a_sliding_window_model_fit_the_budget():
    """A budget of 256 positions of every layer holds two 60-position sessions if every layer keeps
    every position (a cache of 128 each), and 7 of a model whose layers all slide over 12 positions
    (19 positions each; opening one still needs room for a first step of 128 positions)."""
    span = Span.of_model(tiny_family_model("mistral").float(), 0, 4)
    budget = kv_bytes(span.config, 4, 256, span.dtype)
    table = SessionTable(span, budget_bytes=budget, max_length=1000, idle_s=60,
                         limits=ClientLimits(max_cache_share=1.0))
    fitted = 0
    with pytest.raises(SessionError) as e:
        for i in range(40):
            write(table, table.open(f"s{i}", 0, 4, 1000, client=FakeStream(f"P{i}")), 60)
            fitted += 1
    assert e.value.code == "busy"
    assert fitted == 7 and table.used_bytes <= budget
