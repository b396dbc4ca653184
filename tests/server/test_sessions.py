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
    table.open("a", 0, 6, 100, client=None)
    table.open("b", 2, 6, 100, client=None)  # a sub-span costs less
    with pytest.raises(SessionError) as e:
        table.open("c", 0, 6, 100, client=None)
    assert e.value.code == "busy" and "try another server" in e.value.message
    assert table.used_bytes == per_session + cache_bytes(span.sub(2, 6), 100)
    table.close("a")
    table.open("c", 0, 6, 100, client=None)


@pytest.mark.parametrize("args, code", [
    (("x", 0, 7, 10), "wrong_span"),
    (("x", 3, 3, 10), "wrong_span"),
    (("x", 0, 6, 0), "too_large"),
    (("x", 0, 6, 5000), "too_large"),
])
def test_bad_open_requests(span, args, code):
    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=60)
    with pytest.raises(SessionError) as e:
        table.open(*args, client=None)
    assert e.value.code == code


def test_duplicate_unknown_and_idle_sessions(span):
    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=0.05)
    client = FakeStream("A")
    table.open("a", 0, 6, 10, client=client)
    with pytest.raises(SessionError, match="already open"):
        table.open("a", 0, 6, 10, client=client)
    with pytest.raises(SessionError) as e:
        table.get("zzz", client)
    assert e.value.code == "unknown_session"
    time.sleep(0.1)
    assert table.expired() == ["a"]
    table.get("a", client)  # use refreshes it
    assert table.expired() == []


class FakeStream:
    """Only what SessionTable looks at: the identity of the stream and its remote peer id."""

    def __init__(self, peer_id):
        self.remote_peer_id = peer_id


def test_close_frees_the_cache_even_while_the_session_is_still_referenced(span):
    import gc
    import weakref

    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=60)
    session = table.open("a", 0, 6, 100, client=FakeStream("A"))
    keys = weakref.ref(session.cache.keys)
    assert table.close("a") is session
    gc.collect()
    assert session.closed and keys() is None  # a stream handler holding `session` no longer holds its memory
    assert table.used_bytes == 0


def test_a_session_admits_only_its_opener_or_the_named_upstream_peer(span):
    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=60)
    opener, other, opener_again = FakeStream("A"), FakeStream("B"), FakeStream("A")
    first = table.open("first", 0, 6, 10, client=opener)
    assert table.get("first", opener, forward=True) is first
    assert table.get("first", opener) is first  # e.g. its CloseSession
    for stream, forward in [(other, True), (other, False), (opener_again, True)]:  # another stream, same peer: no
        with pytest.raises(SessionError) as e:
            table.get("first", stream, forward)
        assert e.value.code == "unknown_session" and "first" in e.value.message
    pushed = table.open("pushed", 0, 6, 10, client=opener, prev_peer="U")
    upstream = FakeStream("U")
    assert table.get("pushed", upstream, forward=True) is pushed
    with pytest.raises(SessionError):
        table.get("pushed", upstream)  # the upstream hop pushes blocks; it may not close the session
    with pytest.raises(SessionError):
        table.get("pushed", opener, forward=True)  # nor may the opener skip the upstream hop


def test_per_client_session_limit_says_busy_with_a_hint_and_spares_other_clients(span):
    from dsdnode.server.sessions import ClientLimits

    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=60,
                         limits=ClientLimits(max_sessions=2, max_queued_positions=16))
    a = FakeStream("A")
    table.open("a1", 0, 6, 10, client=a)
    table.open("a2", 0, 6, 10, client=a)
    with pytest.raises(SessionError) as e:
        table.open("a3", 0, 6, 10, client=FakeStream("A"))  # another stream of the same peer
    assert e.value.code == "busy" and e.value.retry_after_s > 0 and "per client" in e.value.message
    table.open("b1", 0, 6, 10, client=FakeStream("B"))  # someone else is not held up
    table.close("a1")
    table.open("a3", 0, 6, 10, client=a)  # a closed session frees a place
    assert table.active() == 3


def test_per_client_queue_limit_says_busy_but_always_admits_a_first_block(span):
    from dsdnode.server.sessions import ClientLimits

    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=60,
                         limits=ClientLimits(max_sessions=4, max_queued_positions=16))
    session = table.open("a", 0, 6, 100, client=FakeStream("A"))
    table.admit_block(session, 64, queued=0)  # nothing of this client waits: a long block still runs
    table.admit_block(session, 6, queued=10)
    with pytest.raises(SessionError) as e:
        table.admit_block(session, 7, queued=10)
    assert e.value.code == "busy" and 0 < e.value.retry_after_s < 2
