"""The reachability quorum (net/reachability.py): a node is public only once peers of 2 network
groups dialled it back, so a lying peer alone cannot make it public. With real processes on
loopback here; behind a real NAT, the same liar cannot keep a server from reserving relays
(tests/net/test_nat.py)."""

from __future__ import annotations

import pytest

from dsdnode.net.reachability import PRIVATE, PUBLIC, UNKNOWN, judge
from tests.helpers.p2p_node import NodeProcess

A, B = "203.0.113.0/24", "198.51.100.0/24"
HERE = "/ip4/203.0.113.7/tcp/4001"


@pytest.mark.parametrize("answers, status", [
    ([(A, HERE)], UNKNOWN),  # one "yes" (perhaps a lie) is no quorum
    ([(A, HERE), (A, HERE)], UNKNOWN),  # nor are many from one network
    ([(A, HERE), (B, HERE)], PUBLIC),
    ([(A, HERE), (B, None)], PRIVATE),  # a liar's "yes" and an honest "no": relays are reserved
    ([(A, HERE), (B, HERE), (B, None)], PUBLIC),  # a quorum outvotes one "no"
    ([(A, HERE), (A, HERE), (B, None)], UNKNOWN),  # one lost dial-back does not stop a node listening
    ([(A, None)], PRIVATE),
    ([], UNKNOWN),
])
def test_public_needs_dialbacks_from_two_networks(answers, status):
    verdict = judge(answers, asked=4)
    assert verdict.status == status
    assert verdict.addr == (HERE if status == PUBLIC else "")


@pytest.mark.heavy
@pytest.mark.timeout(300)
def test_a_lying_dialback_peer_alone_does_not_make_a_node_public():
    # a local swarm: each loopback peer is a network group of its own, so only the number of peers counts
    with NodeProcess.start(lie_dialback=True, local_swarm=True) as liar, \
            NodeProcess.start(bootstrap=[f"{liar.addrs[0]}/p2p/{liar.peer_id}"], local_swarm=True) as node:
        assert node.ready["reachability"] == "unknown"  # before the quorum, the liar's "yes" made it public
        assert node.ready["relay_service"] is True  # not known private: it offers its relay and asks again later
