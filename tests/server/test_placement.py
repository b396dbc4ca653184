import pytest

from dsdnode.net.records import SpanRecord
from dsdnode.net.records import coverage
from dsdnode.server.placement import choose_span, parse_layers


def rec(a, b):
    return SpanRecord("m", a, b, f"p{a}{b}", [], 10.0, 100, "0", 1e12)


def test_empty_swarm_starts_at_zero():
    assert choose_span([], 28, 7) == (0, 7)


def test_picks_the_least_covered_window():
    records = [rec(0, 7), rec(0, 7), rec(7, 14), rec(21, 28)]
    assert coverage(records, 28)[:8] == [2] * 7 + [1]
    assert choose_span(records, 28, 7) == (14, 21)
    assert choose_span(records + [rec(14, 21)], 28, 7) == (7, 14)  # ties broken by total coverage, then position


def test_parse_layers_errors():
    assert parse_layers("3:9", 28) == (3, 9)
    with pytest.raises(ValueError, match="START:END"):
        parse_layers("3-9", 28)
    with pytest.raises(ValueError, match="layers 0:28"):
        parse_layers("20:40", 28)


def test_a_new_server_goes_where_servers_carry_the_most_sessions():
    import dataclasses

    records = [rec(0, 14), rec(14, 28), rec(0, 14)]
    assert choose_span(records, 28, 14) == (14, 28)  # fewest servers
    loaded = [dataclasses.replace(records[0], active_sessions=6), records[1],
              dataclasses.replace(records[2], active_sessions=6)]
    # 12 sessions on two servers of 0:14 (6 each) weigh more than one idle server of 14:28
    assert choose_span(loaded, 28, 14) == (0, 14)
    assert choose_span(loaded + [rec(14, 21)], 28, 7) == (0, 7)
