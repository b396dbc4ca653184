"""The parts of auditing and standing that need no network: tolerance, mismatch search, Sybil caps,
claims against measurements, the ban list, digests, and the generator's rollback."""

from __future__ import annotations

import asyncio
import json
import random
import time
from types import SimpleNamespace

import pytest
import torch

from dsdnode.client.audit import (TOLERANCE, Auditor, HopBlock, HopLog, Verdict, disagreement, draw_panel,
                                  first_mismatch, tolerance)
from dsdnode.client.bans import BanList
from dsdnode.client.generate import GenerationSettings
from dsdnode.client.interface import UNCHECKED, Checkpoint
from dsdnode.client.local import LocalChain
from dsdnode.client.shadow import Mirror, Piece
from dsdnode.client.standing import Standing, TrustSettings, hop_compute_s, ip_group
from dsdnode.client.swarm_chain import ChainFailure, RemoteChain
from dsdnode.models.span import Span
from dsdnode.net.records import SpanRecord
from dsdnode.net.wire import ForwardResult, HopTiming, TensorPayload, digest
from dsdnode.speculative.controller import ControllerSettings
from tests.client.test_generate import make_generator, reference_greedy
from tests.helpers.tiny_models import tiny_model


def record(peer: str, ip: str, start=0, end=10, throughput=100.0, issued=0.0) -> SpanRecord:
    return SpanRecord("m", start, end, peer, [f"/ip4/{ip}/tcp/1"], throughput, 1000, "0", time.time() + 60, issued)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_honest_recomputation_is_within_tolerance_and_a_scaled_one_is_not(tiny_model_dir, dtype):
    """Block by block with rolled-back drafts (how a hop computes) vs one catch-up block (how an
    auditor recomputes): within the dtype's tolerance; x1.01 exceeds the float32 tolerance."""
    span = Span.load(tiny_model_dir, 0, 2, dtype)
    rng = random.Random(0)
    x = torch.randn(1, 40, span.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    hop, audit = span.new_cache(64), span.new_cache(64)
    out = torch.zeros_like(x)
    out[:, :10] = span(x[:, :10], hop, 0)
    pos = 10
    while pos < 40:
        t = min(rng.randint(1, 6), 40 - pos)
        span(torch.randn_like(x[:, :t]), hop, pos)  # drafts that were rejected
        out[:, pos:pos + t] = span(x[:, pos:pos + t], hop, pos)
        pos += t
    again = span(x, audit, 0)
    name = "float32" if dtype == torch.float32 else "bfloat16"
    assert first_mismatch(again, out, TOLERANCE[name]) is None
    if dtype == torch.float32:
        assert first_mismatch(again, out * 1.01, TOLERANCE[name]) == 0


def test_first_mismatch_finds_the_first_wrong_or_non_finite_position():
    a = torch.randn(1, 8, 16)
    b = a.clone()
    assert first_mismatch(b, a, 1e-3) is None
    b[:, 5] *= 1.1
    b[:, 6] = float("nan")
    assert first_mismatch(b, a, 1e-3) == 5
    b[:, 5] = a[:, 5]
    assert first_mismatch(b, a, 1e-3) == 6


def test_ip_groups():
    assert ip_group("/ip4/203.0.113.7/tcp/1") == ip_group("/ip4/203.0.113.200/tcp/9") == "203.0.113.0/24"
    assert ip_group("/ip4/203.0.114.7/tcp/1") == "203.0.114.0/24"
    assert ip_group("/ip4/127.0.0.1/tcp/1") == ip_group("/ip4/127.0.0.2/tcp/1") == "127.0.0.0/24"
    assert ip_group("/ip4/127.0.1.1/tcp/1") == "127.0.1.0/24"  # test swarms place "operators" on loopback nets
    assert ip_group("/ip6/2001:db8:1:2::5/tcp/1") == "2001:db8:1::/48"
    assert ip_group("/dns4/example.org/tcp/1") is None


def test_records_of_one_network_are_capped_per_layer():
    flood = [record(f"sybil{i}", f"198.51.100.{i}") for i in range(10)]
    others = [record("a", "203.0.113.1"), record("b", "203.0.113.2", 10, 20)]
    admitted = Standing(TrustSettings(max_records_per_group=3)).admit(flood + others)
    assert sum(r.peer_id.startswith("sybil") for r in admitted) == 3
    assert {"a", "b"} <= {r.peer_id for r in admitted}
    # records over other layers are not crowded out by the cap
    split = [record(f"s{i}", "198.51.100.1", 2 * i, 2 * i + 2) for i in range(5)]
    assert len(Standing(TrustSettings(max_records_per_group=1)).admit(split)) == 5


def test_a_fast_re_announce_keeps_the_older_record():
    standing = Standing(TrustSettings(min_reannounce_s=5.0))
    first = record("p", "203.0.113.1", throughput=100, issued=1000.0)
    assert standing.rate_limited([first]) == [first]
    assert standing.rate_limited([record("p", "203.0.113.1", throughput=1e6, issued=1001.0)]) == [first]
    later = record("p", "203.0.113.1", throughput=50, issued=1006.0)
    assert standing.rate_limited([later]) == [later]


def test_claims_are_capped_then_replaced_by_measurements_and_a_false_claim_costs_standing():
    standing = Standing()
    honest = [record(f"h{i}", f"203.0.113.{i}", throughput=100.0) for i in range(3)]
    liar = record("liar", "198.51.100.1", throughput=1e6)
    records = honest + [liar]
    # unmeasured: the claim counts at most CLAIM_CAP x the median claim (0.1 ms a layer here)
    assert standing.s_per_layer(liar, records) == pytest.approx(standing.s_per_layer(honest[0], records) / 2)
    standing.measured(liar, 10, 0.05)  # 5 ms a layer measured against a claimed 0.1 microseconds
    assert standing.s_per_layer(liar, records) == pytest.approx(0.005)
    assert standing.penalty("liar") > 1 and standing.penalty("h0") == 1
    standing.failed("h1", "refused")
    assert standing.penalty("h1") == 2


def test_hop_compute_from_copy_arrivals():
    # links of 10 ms one way everywhere (RTT 20 ms); hops compute 5, 7 and 3 ms
    arrivals = [0.020 + 0.005, 0.020 + 0.005 + 0.010 + 0.007, 0.020 + 0.005 + 0.010 + 0.007 + 0.010 + 0.003]
    assert hop_compute_s(0.0, arrivals, [0.02] * 3) == pytest.approx([0.005, 0.007, 0.003])


def test_ban_list_round_trip_and_expiry(tmp_path):
    bans = BanList(tmp_path / "sub" / "bans.json")
    assert bans.active() == {}
    bans.add("p1", "m", (0, 15), "wrong outputs")
    bans.add("p2", "m", (15, 30), "old", ban_s=-1.0)  # already expired
    active = bans.active()
    assert set(active) == {"p1"} and active["p1"].layers == (0, 15) and active["p1"].reason == "wrong outputs"
    assert len(json.loads(bans.path.read_text())) == 1
    bans.path.write_text("{not json")
    assert BanList(bans.path).active() == {}  # unreadable: no bans, no crash


def test_a_hop_that_computed_on_another_input_is_caught_by_its_digest():
    sent = TensorPayload.from_torch(torch.ones(1, 2, 4))
    copy0 = TensorPayload.from_torch(torch.full((1, 2, 4), 2.0))
    pushed = TensorPayload.from_torch(torch.full((1, 2, 4), 3.0))  # what hop 0 really pushed on
    legs = [SimpleNamespace(peer_id="hop0"), SimpleNamespace(peer_id="hop1")]

    def result(payload, timings):
        return ForwardResult("s", 1, payload, [HopTiming(f"hop{i}", 0, 0, 0, d) for i, d in enumerate(timings)])
    honest = [result(copy0, [digest(sent)]), result(copy0, [digest(sent), digest(copy0)])]
    RemoteChain._check_digests(legs, sent, honest)
    lying = [result(copy0, [digest(sent)]), result(copy0, [digest(sent), digest(pushed)])]
    with pytest.raises(ChainFailure) as e:
        RemoteChain._check_digests(legs, sent, lying)
    assert e.value.suspects == {"hop0": "digest_mismatch", "hop1": "digest_mismatch"}


class _CaughtLiar(LocalChain):
    """An in-process chain whose output is wrong in one round until an audit says so at the next
    checkpoint: the generator must drop what followed and give the honest text."""

    def __init__(self, spans, wrong_round: int):
        super().__init__(spans)
        self.round, self.wrong_round, self.wrong_at = 0, wrong_round, None

    async def forward(self, hidden, commit_len, tree=None, kept=None):
        out = await super().forward(hidden, commit_len, tree, kept)
        if self.round == self.wrong_round and self.wrong_at is None:
            self.wrong_at = commit_len
            out.hidden = out.hidden * 1.5 + 1
        return out

    async def checkpoint(self) -> Checkpoint:
        self.round += 1
        if self.wrong_at is not None and self.round == self.wrong_round + 2:
            return Checkpoint(self.wrong_at, rollback_to=self.wrong_at)
        return Checkpoint(self.wrong_at if self.wrong_at is not None and self.round <= self.wrong_round + 2
                          else UNCHECKED)

    async def finish(self, path=(0,)) -> Checkpoint:
        return await self.checkpoint()


def test_a_rollback_drops_the_tokens_after_the_wrong_position_and_the_text_is_honest():
    target = tiny_model("llama", seed=3)
    prompt = [5, 17, 33, 2, 41]
    settings = GenerationSettings(max_new_tokens=30, controller=ControllerSettings(k_fixed=3))
    gen = make_generator(target, target, 2, 2, settings)
    gen.chain = _CaughtLiar(gen.chain.spans, wrong_round=3)
    streamed = []
    result = asyncio.run(gen.generate(prompt, streamed.extend))
    assert gen.chain.wrong_at is not None
    assert result.tokens == streamed == reference_greedy(target, prompt, 30)


def test_swarm_listing_shows_banned_peers_and_why(tmp_path, monkeypatch, capsys):
    from dsdnode.cli_node import _print_model

    monkeypatch.setenv("DSDNODE_BANS", str(tmp_path / "bans.json"))
    BanList().add("12D3bad", "m", (15, 30), "wrong outputs for layers 15:30 of m from position 9")
    bans = BanList().active()
    report = {"model": "m", "num_layers": 30, "served": True, "uncovered_layers": [], "coverage": [1] * 30,
              "local_weights": None, "incompatible": {},
              "peers": [{"peer_id": "12D3bad", "start": 15, "end": 30, "addrs": [], "throughput": 1e6,
                         "free_cache_tokens": 100, "version": "0", "device": "cpu", "expires": 0, "rtt_ms": 1.0,
                         "weights": "ab" * 32, "relayed": False, "active_sessions": 0, "queued_positions": 0,
                         "reachability": "public", "banned": bans["12D3bad"].reason}],
              "banned": [{"peer_id": b.peer_id, "layers": list(b.layers), "reason": b.reason, "until": b.until}
                         for b in bans.values()]}
    _print_model(report, peers=True)
    out = capsys.readouterr().out
    assert "12D3bad  layers  15:30" in out and "BANNED" in out
    assert "banned here until" in out and "wrong outputs for layers 15:30 of m from position 9" in out


def test_panels_are_drawn_at_random_from_independent_groups_and_cover_a_hop_piecewise():
    """Auditors: random among eligible servers, never of an avoided group; one server covering the hop
    beats pieces; with no such server, several servers cover it piecewise."""
    rng = random.Random(1)
    whole = [(record(f"w{i}", f"198.51.{i}.1", 0, 30), f"g{i}") for i in range(4)]
    drawn = [draw_panel(whole, 0, 30, {"g0"}, rng) for _ in range(200)]
    assert all(len(p) == 1 and p[0].group != "g0" for p in drawn)
    assert len({p[0].peer_id for p in drawn}) == 3  # each of the other three is drawn
    pieces = [(record("a", "198.51.7.1", 0, 15), "g7"), (record("b", "198.51.8.1", 10, 30), "g8")]
    panel = draw_panel(pieces, 0, 30, set(), rng)
    assert [(p.peer_id, p.start, p.end) for p in panel] == [("a", 0, 15), ("b", 15, 30)]
    assert draw_panel(pieces, 0, 30, {"g8"}, rng) is None  # layers 15:30 only in an avoided group
    assert [p.peer_id for p in draw_panel(pieces + whole[:1], 0, 30, set(), rng)] == ["w0"]


def test_a_small_steady_perturbation_fails_the_window_mean_though_every_position_passes():
    """bfloat16: 5 % on every position is within the per-position bound (0.1) but not the window's
    mean bound (0.04); honest rounding (about 1-2 % measured) passes both; a short window is not judged
    by its mean."""
    gen = torch.Generator().manual_seed(0)
    want = torch.randn(1, 30, 64, generator=gen)

    def moved(rel: float, positions: int = 30) -> torch.Tensor:
        noise = torch.randn(1, positions, 64, generator=gen)
        return want[:, :positions] + noise / noise.norm(dim=-1, keepdim=True) * want[:, :positions].norm(dim=-1, keepdim=True) * rel

    bf16 = tolerance("bfloat16", "bfloat16")
    assert first_mismatch(moved(0.05), want, bf16[0]) is None
    assert disagreement(moved(0.05), want, bf16) == 0
    assert disagreement(moved(0.015), want, bf16) is None
    assert disagreement(moved(0.05, 4), want[:, :4], bf16) is None
    assert disagreement(moved(0.2), want, bf16) == 0  # beyond the per-position bound at position 0


def test_a_wrong_row_of_the_logged_blocks_rolls_back_to_its_position_or_its_tree_block_start():
    """An audit compares the rows of a hop's blocks (drafts included); a wrong row of a chain block rolls
    the generation back to that row's position, one of a token tree to where the tree began."""
    h = HopLog(record("p", "10.0.0.1"), 0, 10, "float32")
    rows = lambda t: torch.zeros(1, t, 4)  # noqa: E731
    h.blocks = [HopBlock(1, 0, rows(8), rows(8)),  # prefill: positions 0..7
                HopBlock(2, 8, rows(3), rows(3)),  # a chain block: positions 8, 9, 10
                HopBlock(3, 9, rows(4), rows(4), mask=torch.ones(4, 4, dtype=torch.bool), positions=[9, 10, 10, 11])]
    assert h.outputs(1, 3).shape == (1, 7, 4)
    assert [h.rollback_position(0, r) for r in (0, 7, 8, 10)] == [0, 7, 8, 10]
    assert [h.rollback_position(1, r) for r in (2, 3, 6)] == [10, 9, 9]
    with pytest.raises(IndexError):
        h.rollback_position(1, 7)


class _Route:
    """A shadow route that has computed these outputs per mirror (the network part is what
    tests/client/test_audit_swarm.py runs with real servers)."""

    def __init__(self, mirrors, outs):
        self.mirrors, self.outs, self.failure, self.closed = mirrors, outs, None, False
        self.pieces = [p for m in mirrors for p in m.pieces]

    async def outputs(self, last):
        return self.outs

    async def close(self):
        self.closed = True


@pytest.mark.parametrize("audits", [True, False])
def test_a_disagreement_in_a_shadow_route_voids_the_comparisons_after_it(tmp_path, audits):
    """Hop 0 of a 3-hop route disagrees with its mirror in block 1 (of 2): hop 1's mirror computed on
    the mirrors' inputs, not hop 1's, so its comparison -- though it disagrees too -- is void: hop 1
    is left to a panel of its own (None), not disputed, and the shadow route is dropped. Hop 0 is
    disputed (audits: an independent mirror; no second panel here, so excluded for the chain) or,
    mirrored by its own server (a feeder, no audit), excluded for answering one block two ways; the
    rollback is to the disputed block's first position."""
    block = lambda seed, t: torch.randn(1, t, 8, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    hops = [HopLog(record(f"h{i}", f"10.0.{i}.1", 10 * i, 10 * i + 10), 10 * i, 10 * i + 10, "float32")
            for i in range(3)]
    for i, h in enumerate(hops):
        h.blocks = [HopBlock(1, 0, block(i, 4), block(10 + i, 4)), HopBlock(2, 4, block(i, 2), block(20 + i, 2))]
    # mirror outputs: hop 0's differs in block 1, hop 1's everywhere (as it would after a wrong hop 0)
    outs = [[hops[0].blocks[0].outputs, hops[0].blocks[1].outputs + 1], [block(99, 4), block(98, 2)],
            [hops[2].blocks[0].outputs, hops[2].blocks[1].outputs]]
    mirrors = [Mirror((Piece(record(f"m{i}", f"10.1.{i}.1", 10 * i, 10 * i + 10), f"g{i}", 10 * i, 10 * i + 10),),
                      audits or i > 0) for i in range(3)]
    auditor = Auditor(None, "m", "w", "float32", 8, 64, lambda h: [], lambda p: f"group of {p}",
                      Standing(TrustSettings()), BanList(tmp_path / "bans.json"))
    auditor.logs, auditor.shadow = hops, _Route(mirrors, outs)
    route = auditor.shadow

    verdicts = asyncio.run(auditor._audit_route([(h, 0, 2) for h in hops], 6))
    assert isinstance(verdicts[0], Verdict) and verdicts[0].rollback_to == 4
    assert verdicts[0].excluded.get("h0") == ("disputed_results" if audits else "inconsistent results")
    assert verdicts[1] is None and verdicts[2] is None  # void from block 1 on: audited by panels of their own
    assert route.closed and auditor.shadow is None
    assert auditor.stats.routed == (1 if audits else 0) and auditor.stats.mismatches == (1 if audits else 0)


def test_who_a_stall_is_blamed_on_follows_the_stalls_seen_before():
    """A pass stalled after hop p's copy came and before hop j's (every hop answering pings): a first
    stall pauses j; p stalling again at another next hop blames p; the same pair again excludes j
    (unproven); j stalling behind another hop too blames j; a stall at the first hop excludes it."""
    chain = SimpleNamespace(_stalls=set(), relay=False)

    def stall(*peers, copies=1):  # the first `copies` hops' copies came
        legs = [SimpleNamespace(peer_id=p) for p in peers]
        return RemoteChain._stalled(chain, legs, {(1, i): None for i in range(copies)}, 1)

    assert stall("p", "a") == {"a": "stalled"}
    assert stall("p", "b") == {"p": "its next hops stall"}
    chain._stalls = set()
    assert stall("x", "j") == {"j": "stalled"}
    assert stall("x", "j") == {"j": "stalled again"}
    assert stall("y", "j") == {"j": "stalls behind several hops"}
    assert stall("z", "w", copies=0) == {"z": "stalled on the client's block"}


def test_an_auditor_that_answers_busy_is_not_marked():
    """A server refuses a shadow session as `busy` when its budget is full or a replica of its layers
    holds fewer sessions (server/load.py): no fault, so no mark -- as routing treats `busy`. Any other
    failure of an auditor's session marks it."""
    from dsdnode.client.shadow import AuditorBusy, AuditUnavailable, _ask
    from dsdnode.net.wire import ErrorReply, SessionOpened, WireLimits, encode

    class Replies:
        def __init__(self, reply):
            self.reply = reply

        async def send(self, data):
            pass

        async def recv(self, timeout=None):
            return encode(self.reply)

    busy = ErrorReply("busy", "a replica of these layers holds fewer sessions", retry_after_s=1.0)
    with pytest.raises(AuditorBusy):
        asyncio.run(_ask(Replies(busy), None, SessionOpened, "B", WireLimits()))
    with pytest.raises(AuditUnavailable) as refused:
        asyncio.run(_ask(Replies(ErrorReply("wrong_span", "no")), None, SessionOpened, "W", WireLimits()))
    assert not isinstance(refused.value, AuditorBusy)

    standing = Standing()
    auditor = SimpleNamespace(standing=standing)
    Auditor._auditor_failed(auditor, AuditorBusy("auditor B answered busy", "B"))
    Auditor._auditor_failed(auditor, AuditUnavailable("a stall between two pieces"))  # names no one
    assert standing.penalty("B") == 1.0
    Auditor._auditor_failed(auditor, refused.value)
    assert standing.penalty("W") == 2.0
