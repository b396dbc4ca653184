"""Standing under a Sybil world: claims capped by measurements only, marks that expire, a bounded
table, caps per observed group, bans keyed by group (fast, no network)."""

from __future__ import annotations

import time

import pytest

from dsdnode.client import standing as standing_module
from dsdnode.client.bans import BanList
from dsdnode.client.standing import Standing, TrustSettings, observed_group
from tests.client.test_audit import record


def test_unmeasured_claims_cannot_move_the_claim_cap():
    """Six Sybils claiming 1e6 tokens/s: before, the median claim was theirs and an unmeasured Sybil
    was rated 20,000x faster per layer than an honest server; now the cap comes from what was measured."""
    standing = Standing()
    honest = [record(f"h{i}", f"203.0.113.{i}", throughput=100.0) for i in range(2)]
    sybils = [record(f"s{i}", f"198.51.100.{i}", throughput=1e6) for i in range(6)]
    records = honest + sybils
    for h in honest:
        standing.measured(h, 10, 0.01)  # 1 ms a layer, as claimed
    measured = standing.s_per_layer(honest[0], records)
    assert measured == pytest.approx(1e-3)
    assert standing.s_per_layer(sybils[0], records) == pytest.approx(measured / standing_module.CLAIM_CAP)
    # nothing measured yet: the slowest claim is the reference, however many fast claims there are
    fresh = Standing()
    assert fresh.s_per_layer(sybils[0], records) == pytest.approx(fresh.s_per_layer(honest[0], records)
                                                                   / standing_module.CLAIM_CAP)


def test_every_mark_expires_the_false_claim_too(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(standing_module.time, "monotonic", lambda: now[0])
    standing = Standing()
    liar = record("liar", "198.51.100.1", throughput=1e6)
    standing.measured(liar, 10, 0.05)
    standing.failed("liar", "refused")
    assert standing.penalty("liar") == 2 * standing_module.OVERCLAIM_PENALTY
    now[0] += standing_module.MARK_MEMORY_S + 1
    assert standing.penalty("liar") == 1.0


def test_a_hop_over_a_few_layers_of_its_span_is_not_judged_against_its_claim():
    """1 layer of a 10-layer span at 60 ms (per-hop costs, not its layers): no false claim; the same
    rate over 4 layers or more is one (and so is 1 layer of a 1-layer span, 20x its claim)."""
    few, many, one = Standing(), Standing(), Standing()
    rec = record("p", "198.51.100.1", throughput=100.0)  # layers 0:10, 1 ms per layer claimed
    few.measured(rec, 1, 0.06)
    many.measured(rec, 4, 0.24)
    one.measured(record("q", "198.51.100.2", start=0, end=1, throughput=100.0), 1, 0.2)  # 10 ms claimed
    assert few.penalty("p") == 1.0
    assert many.penalty("p") == standing_module.OVERCLAIM_PENALTY == one.penalty("q")


def test_the_table_stays_bounded_and_keeps_marked_peers(monkeypatch):
    monkeypatch.setattr(standing_module, "MAX_PEERS", 100)
    standing = Standing()
    standing.failed("marked", "wrong results")
    for i in range(1000):
        standing.measured(record(f"p{i}", "198.51.100.1"), 10, 0.01)
    assert len(standing.peers) <= 100
    assert standing.penalty("marked") == 2.0
    assert "p999" in standing.peers  # the latest stay


def test_caps_count_the_observed_group_not_the_claimed_one():
    """12 records of one machine that claim 12 networks pass a cap of 3 by their claims; counted by
    where the client reached them (one group), 3 pass. Records that claim the honest operators' /24 do
    not crowd the honest ones out when observed elsewhere."""
    sybils = [record(f"s{i}", f"10.{i}.0.1") for i in range(12)]
    honest = [record(f"h{i}", f"203.0.113.{i}") for i in range(5)]
    spoofers = [record(f"x{i}", "203.0.113.99") for i in range(3)]
    observed = {**{r.peer_id: "198.51.100.0/24" for r in sybils + spoofers},
                **{r.peer_id: "203.0.113.0/24" for r in honest}}
    standing = Standing(TrustSettings(max_records_per_group=5))
    assert len(standing.admit(sybils, lambda r: "claims:" + r.addrs[0])) == 12  # what claims alone allowed
    admitted = {r.peer_id for r in standing.admit(sybils + honest + spoofers, lambda r: observed[r.peer_id])}
    assert {r.peer_id for r in honest} <= admitted
    assert len(admitted - {r.peer_id for r in honest}) == 5


def test_observed_groups():
    assert observed_group("203.0.113.7", False) == "203.0.113.0/24"
    assert observed_group("127.0.2.1", False) == "127.0.2.0/24" != observed_group("127.0.3.1", False)
    assert observed_group("203.0.113.7", True) == "relayed:203.0.113.0/24"  # behind a relay: the relay's network
    assert observed_group("2001:db8:1:2::5", False) == "2001:db8:1::/48"


def test_bans_keep_the_observed_group_and_stay_bounded(tmp_path, monkeypatch):
    from dsdnode.client import bans as bans_module
    monkeypatch.setattr(bans_module, "MAX_BANS", 3)
    bans = BanList(tmp_path / "bans.json")
    bans.add("a", "m", (0, 10), "wrong outputs", group="198.51.100.0/24")
    assert bans.groups() == {"198.51.100.0/24"}
    for i in range(5):
        bans.add(f"b{i}", "m", (0, 10), "wrong outputs", ban_s=100 + i)
    assert len(bans.active()) == 3 and "a" in bans.active()  # the soonest to expire went first
    assert time.time() < min(b.until for b in bans.active().values())
