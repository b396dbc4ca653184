import time

import pytest
import torch

from dsdnode.models.span import Span
from dsdnode.server.sessions import SessionError, SessionTable, cache_bytes
from tests.helpers.tiny_models import tiny_model


@pytest.fixture
def span():
    return Span.of_model(tiny_model("llama").to(torch.float32), 0, 6)


def test_budget_admits_then_says_busy(span):
    per_session = cache_bytes(span, 100)
    table = SessionTable(span, budget_bytes=2 * per_session, max_length=1000, idle_s=60)
    table.open("a", 0, 6, 100, client=None, next_hop=None)
    table.open("b", 2, 6, 100, client=None, next_hop=None)  # a sub-span costs less
    with pytest.raises(SessionError) as e:
        table.open("c", 0, 6, 100, client=None, next_hop=None)
    assert e.value.code == "busy" and "try another server" in e.value.message
    assert table.used_bytes == per_session + cache_bytes(span.sub(2, 6), 100)
    table.close("a")
    table.open("c", 0, 6, 100, client=None, next_hop=None)


@pytest.mark.parametrize("args, code", [
    (("x", 0, 7, 10), "wrong_span"),
    (("x", 3, 3, 10), "wrong_span"),
    (("x", 0, 6, 0), "too_large"),
    (("x", 0, 6, 5000), "too_large"),
])
def test_bad_open_requests(span, args, code):
    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=60)
    with pytest.raises(SessionError) as e:
        table.open(*args, client=None, next_hop=None)
    assert e.value.code == code


def test_duplicate_unknown_and_idle_sessions(span):
    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=0.05)
    table.open("a", 0, 6, 10, client=None, next_hop=None)
    with pytest.raises(SessionError, match="already open"):
        table.open("a", 0, 6, 10, client=None, next_hop=None)
    with pytest.raises(SessionError) as e:
        table.get("zzz")
    assert e.value.code == "unknown_session"
    time.sleep(0.1)
    assert table.expired() == ["a"]
    table.get("a")  # use refreshes it
    assert table.expired() == []
