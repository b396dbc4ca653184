import asyncio
import time

import pytest

from dsdnode.client.routing import Candidate, NoRoute, best_chain, with_load
from dsdnode.client.standing import Standing
from dsdnode.net.p2p import P2PNode
from dsdnode.net.records import SpanRecord


def cand(peer, a, b, rtt_ms, tok_s=100.0):
    return Candidate(SpanRecord("m", a, b, peer, [], tok_s, 1000, "0", 1e12), rtt_ms / 1e3)


def spans(chain):
    return [(h.candidate.record.peer_id, h.start, h.end) for h in chain]


def test_prefers_fewer_faster_hops():
    cs = [cand("a", 0, 14, 10), cand("b", 14, 28, 10), cand("c", 0, 28, 5, tok_s=50), cand("d", 0, 28, 200)]
    assert spans(best_chain(cs, 28)) == [("c", 0, 28)]
    cs[2] = cand("c", 0, 28, 5, tok_s=2)  # a slow whole-model server loses to two fast halves
    assert spans(best_chain(cs, 28)) == [("a", 0, 14), ("b", 14, 28)]


def test_overlapping_spans_use_sub_ranges():
    cs = [cand("a", 0, 10, 5), cand("b", 5, 20, 5), cand("c", 15, 28, 5)]
    chain = best_chain(cs, 28)
    assert [h.candidate.record.peer_id for h in chain] == ["a", "b", "c"]
    assert chain[0].start == 0 and chain[-1].end == 28
    assert all(x.end == y.start for x, y in zip(chain, chain[1:]))  # contiguous
    assert all(h.candidate.record.start <= h.start < h.end <= h.candidate.record.end for h in chain)
    # b announces 15 layers at the same speed as a's 10, so it is cheaper per layer and takes 5:20
    assert (chain[1].start, chain[1].end) == (5, 20)


def test_uncovered_layers_are_named():
    with pytest.raises(NoRoute, match="layers 10-13, 27"):
        best_chain([cand("a", 0, 10, 5), cand("b", 14, 27, 5)], 28)


def test_a_server_is_used_once_per_chain_even_when_sub_spans_would_fit_its_cache():
    """A server whose free cache holds a third of the session over its span must not appear as three hops."""
    full = SpanRecord("m", 0, 30, "a", [], 100.0, 40, "0", 1e12)  # 40 positions free over 30 layers
    chain = best_chain([Candidate(full, 0.001), cand("b", 0, 30, 50)], 30, session_length=100)
    assert spans(chain) == [("b", 0, 22), ("a", 22, 30)]  # a holds 40 * 30 / 100 = 12 layers of the session
    with pytest.raises(NoRoute):
        best_chain([Candidate(full, 0.001)], 30, session_length=100)


def test_prefers_the_less_loaded_of_two_equal_servers():
    import dataclasses

    a, b = cand("a", 0, 28, 10), cand("b", 0, 28, 10)
    loaded = Candidate(dataclasses.replace(a.record, active_sessions=5), a.rtt_s)
    assert spans(best_chain([loaded, b], 28)) == [("b", 0, 28)]
    assert spans(best_chain([b, Candidate(dataclasses.replace(b.record, peer_id="c", active_sessions=1), 0.010),
                             loaded], 28)) == [("b", 0, 28)]
    # load never outweighs a much faster link
    far = cand("b", 0, 28, 400)
    assert spans(best_chain([loaded, far], 28)) == [("a", 0, 28)]


def test_chains_spread_over_replicas_in_proportion_to_capacity():
    """Chains that read the same records at once (none sees the others' sessions yet) pick each
    replica in proportion to its capacity (1 / cost): equal replicas evenly, a replica twice as fast
    for two thirds of them, a much faster one for most but not all; one chain keeps its choice."""
    import statistics

    seeds = [f"chain-{i}" for i in range(2000)]

    def share_of_a(a, b):
        return [spans(best_chain([a, b], 2, seed=s))[0][0] for s in seeds].count("a") / len(seeds)

    b = cand("b", 0, 2, 10)  # cost: 10 ms link + 10 ms compute
    assert 0.46 <= share_of_a(cand("a", 0, 2, 10), b) <= 0.54  # equal: 1/2
    assert 0.62 <= share_of_a(cand("a", 0, 2, 5, tok_s=200.0), b) <= 0.72  # twice as fast: 2/3
    assert 0.86 <= share_of_a(cand("a", 0, 2, 1, tok_s=1000.0), b) <= 0.95  # ten times: 10/11
    # 30 % cheaper (14 ms against 20): 20/34 = 0.59; under the old fixed preference of at most 30 %
    # it took every chain
    assert 0.54 <= share_of_a(cand("a", 0, 2, 4), b) <= 0.64
    a = cand("a", 0, 2, 10)
    assert all(best_chain([a, b], 2, seed=s) == best_chain([b, a], 2, seed=s) for s in seeds[:20])
    assert spans(best_chain([a, cand("b", 0, 2, 11)], 2)) == [("a", 0, 2)]  # no seed: the cheapest
    # 8 chains at once over two equal replicas: as good as a fair coin, which is the best any choice
    # can do without seeing the others (the busiest holds 63.7 % of 8 on average)
    busiest = [max(n := [spans(best_chain([a, b], 2, seed=s))[0][0] for s in seeds[w:w + 8]].count("a"), 8 - n)
               for w in range(0, len(seeds), 8)]
    assert 0.60 <= statistics.mean(busiest) / 8 <= 0.67


def test_announced_sessions_shift_later_chains_to_the_other_replica():
    import dataclasses

    a, b = cand("a", 0, 2, 0), cand("b", 0, 2, 0)
    loaded = Candidate(dataclasses.replace(a.record, active_sessions=10), a.rtt_s)  # cost x 2
    picks = [spans(best_chain([loaded, b], 2, seed=f"chain-{i}"))[0][0] for i in range(2000)]
    assert 0.28 <= picks.count("a") / len(picks) <= 0.38  # 1/3


def test_a_slow_hop_is_replaced_only_where_others_serve_its_layers(tmp_path):
    """Pacing replaces a slow-walking hop mid-generation; where no other servers cover its layers the
    replacement would end the generation (NoRoute), so the router says it cannot route around."""
    from dsdnode.client.bans import BanList
    from dsdnode.client.router import Router
    from dsdnode.client.standing import Standing

    router = Router(None, "m", 30, "0", Standing(), BanList(tmp_path / "bans.json"))
    router.records = [SpanRecord("m", a, b, peer, [], 10.0, 1000, "0", 1e12)
                      for peer, a, b in [("a", 0, 15), ("b", 15, 30), ("c", 0, 10), ("d", 8, 15)]]
    assert router.can_route_around("a", 0, 15)  # c and d together serve 0:15
    assert not router.can_route_around("b", 15, 30)  # nobody else serves 15:30
    router.exclude("d", "lost", "d was lost")
    assert not router.can_route_around("a", 0, 15)  # 10:15 is left to a alone


def test_the_fresh_load_a_server_answers_replaces_its_records_but_a_claim_stays_capped():
    """Real libp2p hosts on loopback: a server answers its load now (4 sessions, 50 ms a pass); the
    client routes on that rather than its record's (0 sessions, 10 tokens/s). A server that answers
    nothing for the model keeps its record. A claimed pass 1000x faster than measured elsewhere still
    counts only CLAIM_CAP x faster than what the client measured."""
    async def body():
        busy, quiet, client = await asyncio.gather(P2PNode.start(relay_service=False), P2PNode.start(relay_service=False),
                                                   P2PNode.start(relay_service=False))
        try:
            busy.load_status = lambda: {"m": (4, 0.05)}
            quiet.load_status = lambda: {"other": (9, 0.5)}
            recs = [SpanRecord("m", 0, 2, n.peer_id, list(n.addrs), 10.0, 1000, "0", 1e12) for n in (busy, quiet)]
            fresh = await with_load(client, recs, "m")
            assert (fresh[busy.peer_id].active_sessions, fresh[busy.peer_id].throughput) == (4, pytest.approx(20.0))
            assert fresh[quiet.peer_id] is recs[1]
            standing = Standing()
            standing.measured(recs[1], 2, 0.2)  # 0.1 s per layer measured of the quiet one
            liar = SpanRecord("m", 0, 2, "liar", [], 1e6, 1000, "0", 1e12)
            assert standing.s_per_layer(liar, [recs[1], liar]) == pytest.approx(0.1 / 2)
        finally:
            await asyncio.gather(busy.stop(), quiet.stop(), client.stop())

    asyncio.run(body())


def test_a_client_of_any_age_looks_again_when_the_dht_answered_in_part(tmp_path):
    """Seen in a 63-peer swarm under a 50-id flood: a client's discover() found only some shards'
    directory peers answering, and it failed at once with "no live servers" (it looked again only
    while its node was under 20 s old), though every honest record was stored. A partial answer is
    looked at again, with growing pauses, whatever the node's age. Real libp2p hosts on loopback; the
    DHT's answers are scripted (two partial ones, then the server's record)."""
    from dsdnode.client.bans import BanList
    from dsdnode.client.router import Router
    from dsdnode.client.standing import Standing

    async def body():
        server, client = await asyncio.gather(P2PNode.start(relay_service=False), P2PNode.start(relay_service=False))
        try:
            client.started_at -= 3600  # an old node: a long-running API server, say
            record = SpanRecord("m", 0, 2, server.peer_id, list(server.addrs), 10.0, 1000, "0", time.time() + 120,
                                weights="w")
            answers = [[], [], [record]]

            async def discover(model):
                found = answers.pop(0)
                client.dht.last_discovery_partial = not found
                return found

            client.dht.discover = discover
            router = Router(client, "m", 2, "w", Standing(), BanList(tmp_path / "bans.json"))
            hops = await router.route(64)
            assert [h.candidate.record.peer_id for h in hops] == [server.peer_id] and not answers
        finally:
            await asyncio.gather(server.stop(), client.stop())

    asyncio.run(body())
