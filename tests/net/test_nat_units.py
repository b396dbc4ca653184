"""NAT pieces that need no root: circuit addresses, reachability answers on the wire, and routing
around relayed hops. The multi-host behaviour is in test_nat.py."""

import pytest

from dsdnode.client.routing import Candidate, best_chain
from dsdnode.net.records import SpanRecord
from dsdnode.net.p2p import NodeInfo
from dsdnode.net.relay import circuit_addr, is_circuit, split_circuit

RELAY = "12D3KooWGJHZRruYDPPRy564A4o2CjXM4pEhy8bpjewcFatAhkwP"


def test_circuit_address_round_trip():
    addr = circuit_addr("/ip4/203.0.113.10/tcp/4001", RELAY)
    assert addr == f"/ip4/203.0.113.10/tcp/4001/p2p/{RELAY}/p2p-circuit"
    assert is_circuit(addr) and not is_circuit("/ip4/203.0.113.10/tcp/4001")
    assert split_circuit(addr) == ("/ip4/203.0.113.10/tcp/4001", RELAY)
    with pytest.raises(ValueError):
        split_circuit("/ip4/203.0.113.10/tcp/4001/p2p-circuit")  # names no relay


def test_info_carries_reachability_and_relay_offer():
    info = NodeInfo("p", {"m": (0, 4)}, (), "private", False)
    assert NodeInfo.decode("p", info.encode()) == info
    offer = NodeInfo.decode("q", NodeInfo("q", {}, (), "public", True).encode())
    assert (offer.reachability, offer.relay) == ("public", True)


def cand(peer, rtt_ms, relayed):
    addrs = [circuit_addr("/ip4/203.0.113.10/tcp/4001", RELAY)] if relayed else ["/ip4/203.0.113.11/tcp/4001"]
    return Candidate(SpanRecord("m", 0, 28, peer, addrs, 100.0, 1000, "0", 1e12), rtt_ms / 1e3)


def test_routing_prefers_direct_at_equal_cost_and_pays_the_relay_link():
    assert best_chain([cand("relayed", 10, True), cand("direct", 10, False)], 28)[0].candidate.record.peer_id == "direct"
    assert best_chain([cand("direct", 10, False), cand("relayed", 10, True)], 28)[0].candidate.record.peer_id == "direct"
    # the extra link shows in the measured RTT: a relayed server that is still faster wins
    assert best_chain([cand("relayed", 5, True), cand("direct", 30, False)], 28)[0].candidate.record.peer_id == "relayed"
