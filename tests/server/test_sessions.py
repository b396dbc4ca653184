import time

import pytest
import torch

from dsdnode.models.families import kv_bytes
from dsdnode.models.span import Span
from dsdnode.server.sessions import GROW_STEP, ClientLimits, OPEN_LEASE_S, RECLAIM_IDLE_S, SessionError, SessionTable
from tests.helpers.tiny_models import tiny_model


def cache_bytes(span: Span, length: int) -> int:
    """A full-attention span's cache of `length` positions."""
    return kv_bytes(span.config, span.end - span.start, length, span.dtype)


@pytest.fixture
def span():
    return Span.of_model(tiny_model("llama").to(torch.float32), 0, 6)


def test_the_cache_is_charged_as_its_positions_are_written(span):
    """An open costs nothing but room for a first step; the cache grows (doubling, GROW_STEP at least)
    as blocks are admitted, and the budget says busy only when a block's growth does not fit."""
    table = SessionTable(span, budget_bytes=cache_bytes(span, 2 * GROW_STEP), max_length=1000, idle_s=60,
                         limits=ClientLimits(max_cache_share=1.0))
    a = table.open("a", 0, 6, 1000, client=FakeStream("A"))
    b = table.open("b", 0, 6, 1000, client=FakeStream("B"))
    c = table.open("c", 2, 6, 1000, client=FakeStream("C"))  # three max-length sessions: no memory yet
    assert table.used_bytes == 0
    table.admit_block(a, 0, 5, queued=0)
    assert a.cache.capacity == GROW_STEP and table.used_bytes == cache_bytes(span, GROW_STEP)
    with pytest.raises(SessionError) as e:  # a bogus commit_len is refused before anything is allocated
        table.admit_block(b, 900, 1, queued=0)
    assert e.value.code == "bad_shape" and table.used_bytes == cache_bytes(span, GROW_STEP)
    table.admit_block(b, 0, 64, queued=0)
    with pytest.raises(SessionError) as e:
        table.admit_block(c, 0, 5, queued=0)  # the budget holds two steps of the whole span
    assert e.value.code == "busy" and "try another server" in e.value.message
    table.close(a.key)
    table.admit_block(c, 0, 5, queued=0)
    assert table.used_bytes == cache_bytes(span, GROW_STEP) + cache_bytes(span.sub(2, 6), GROW_STEP)


def test_a_growing_session_doubles_up_to_its_max_length(span):
    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=60)
    a = table.open("a", 0, 6, 300, client=FakeStream("A"))
    table.admit_block(a, 0, 5, queued=0)
    a.cache.length = 120  # as if 120 positions were computed
    table.admit_block(a, 120, 20, queued=0)
    assert a.cache.capacity == 2 * GROW_STEP
    a.cache.length = 250
    table.admit_block(a, 250, 50, queued=0)
    assert a.cache.capacity == 300  # never past its max_length
    with pytest.raises(SessionError) as e:
        table.admit_block(a, 250, 51, queued=0)
    assert e.value.code == "too_large"


def test_idle_sessions_are_reclaimed_only_when_that_makes_room(span):
    closed = []
    table = SessionTable(span, budget_bytes=cache_bytes(span, 2 * GROW_STEP), max_length=1000, idle_s=600,
                         limits=ClientLimits(max_cache_share=1.0), on_reclaim=closed.append)
    idle, busy, new = (table.open(x, 0, 6, 1000, client=FakeStream(x), group=x) for x in "ABC")
    table.admit_block(idle, 0, 5, queued=0)
    table.admit_block(busy, 0, 5, queued=0)
    with pytest.raises(SessionError):  # nobody idle long enough: busy, nothing closed
        table.admit_block(new, 0, 5, queued=0)
    assert closed == []
    idle.last_used -= RECLAIM_IDLE_S + 1
    table.admit_block(new, 0, 5, queued=0)  # the honest newcomer is served from the idle one's memory
    assert closed == [idle] and idle.closed and "A" not in [s.owner for s in table.sessions.values()]


def test_a_network_group_and_a_peer_id_get_only_their_share(span):
    table = SessionTable(span, budget_bytes=cache_bytes(span, 6 * GROW_STEP), max_length=1000, idle_s=60,
                         limits=ClientLimits(max_sessions=8, max_group_sessions=3, max_cache_share=0.34))
    # throw-away ids from one /24: three sessions at most, a third of the budget at most
    sessions = [table.open(f"x{i}", 0, 6, 1000, client=FakeStream(f"X{i}"), group="203.0.113.0/24")
                for i in range(3)]
    with pytest.raises(SessionError) as e:
        table.open("x3", 0, 6, 1000, client=FakeStream("X3"), group="203.0.113.0/24")
    assert e.value.code == "busy" and "per network" in e.value.message
    table.admit_block(sessions[0], 0, 5, queued=0)
    table.admit_block(sessions[1], 0, 5, queued=0)
    with pytest.raises(SessionError) as e:
        table.admit_block(sessions[2], 0, 5, queued=0)
    assert e.value.code == "busy" and "network" in e.value.message
    honest = table.open("h", 0, 6, 1000, client=FakeStream("H"), group="198.51.100.0/24")
    table.admit_block(honest, 0, 5, queued=0)  # another network still has its room
    one = table.open("p", 0, 6, 1000, client=FakeStream("P"), group="192.0.2.0/24")
    table.admit_block(one, 0, 100, queued=0)
    one.cache.length = 100
    table.admit_block(one, 100, 100, queued=0)
    one.cache.length = 200
    with pytest.raises(SessionError) as e:  # one peer id alone: its share too
        table.admit_block(one, 200, 100, queued=0)
    assert e.value.code == "busy" and "this client" in e.value.message


def test_a_session_without_a_first_block_loses_its_lease(span):
    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=600)
    silent, working = table.open("s", 0, 6, 10, client=FakeStream("A")), table.open("w", 0, 6, 10, client=FakeStream("B"))
    table.admit_block(working, 0, 2, queued=0)
    for session in (silent, working):
        session.opened -= OPEN_LEASE_S + 1
    assert table.expired() == [silent.key]
    # a local swarm's servers share one machine's cores: a downstream hop's first block may take minutes
    local = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=600, open_lease_s=600)
    waiting = local.open("s", 0, 6, 10, client=FakeStream("A"))
    waiting.opened -= OPEN_LEASE_S + 1
    assert local.expired() == []


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
    assert table.expired() == [("A", "a")]
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
    table.admit_block(session, 0, 4, queued=0)
    keys = weakref.ref(session.cache.keys)
    assert table.close(session.key) is session
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


def test_a_session_id_is_bound_to_its_opener_so_nobody_can_squat_it(span):
    """Someone who learnt (or guessed) the id a client will use opens it first: that is simply a
    session of theirs, and the client's own open, blocks and close are untouched by it."""
    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=60)
    squatter, client, upstream = FakeStream("S"), FakeStream("C"), FakeStream("U")
    squat = table.open("x", 0, 6, 10, client=squatter)
    mine = table.open("x", 0, 6, 10, client=client)
    assert squat is not mine and table.get("x", client) is mine and table.get("x", squatter) is squat
    pushed = table.open("y", 0, 6, 10, client=client, prev_peer="U", next_session_id="y-at-next")
    assert table.get("y", upstream, forward=True) is pushed and pushed.next_session_id == "y-at-next"
    with pytest.raises(SessionError):  # the named upstream peer already pushes into a session "y"
        table.open("y", 0, 6, 10, client=squatter, prev_peer="U")
    table.close(squat.key)
    assert table.get("x", client) is mine


def test_per_client_session_limit_says_busy_with_a_hint_and_spares_other_clients(span):
    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=60,
                         limits=ClientLimits(max_sessions=2, max_queued_positions=16))
    a = FakeStream("A")
    table.open("a1", 0, 6, 10, client=a)
    table.open("a2", 0, 6, 10, client=a)
    with pytest.raises(SessionError) as e:
        table.open("a3", 0, 6, 10, client=FakeStream("A"))  # another stream of the same peer
    assert e.value.code == "busy" and e.value.retry_after_s > 0 and "per client" in e.value.message
    table.open("b1", 0, 6, 10, client=FakeStream("B"))  # someone else is not held up
    table.close(("A", "a1"))
    table.open("a3", 0, 6, 10, client=a)  # a closed session frees a place
    assert table.active() == 3


def test_per_client_queue_limit_says_busy_but_always_admits_a_first_block(span):
    table = SessionTable(span, budget_bytes=1 << 30, max_length=1000, idle_s=60,
                         limits=ClientLimits(max_sessions=4, max_queued_positions=16))
    session = table.open("a", 0, 6, 100, client=FakeStream("A"))
    table.admit_block(session, 0, 64, queued=0)  # nothing of this client waits: a long block still runs
    table.admit_block(session, 0, 6, queued=10)
    with pytest.raises(SessionError) as e:
        table.admit_block(session, 0, 7, queued=10)
    assert e.value.code == "busy" and 0 < e.value.retry_after_s < 2
