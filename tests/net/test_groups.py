"""Network groups and dialable addresses (net/groups.py) and the next-hop address filter."""

import pytest

from dsdnode.net.groups import dialable, network_group
from dsdnode.net.p2p import PeerInfo
from dsdnode.server.next_hops import DialRate, allowed_hop
from dsdnode.server.sessions import SessionError


def test_groups_come_from_the_address_and_loopback_is_one_unless_the_swarm_is_local():
    assert network_group("203.0.113.7", "A", False) == network_group("203.0.113.200", "B", False) == "203.0.113.0/24"
    assert network_group("203.0.114.7", "A", False) == "203.0.114.0/24"
    assert network_group("2001:db8:1:2::5", "A", False) == "2001:db8:1::/48"
    assert network_group("::ffff:198.51.100.9", "A", False) == "198.51.100.0/24"
    assert network_group("127.0.0.1", "A", False) == network_group("::1", "B", False) == "loopback"
    assert network_group("127.0.0.1", "A", True) != network_group("127.0.0.1", "B", True)
    assert network_group(None, "A", True) == network_group("garbage", "B", False) == "unknown"


@pytest.mark.parametrize("addr, local, ok", [
    ("/ip4/8.8.8.8/tcp/4001", False, True),
    ("/ip6/2606:4700::1111/tcp/4001", False, True),
    ("/ip4/127.0.0.1/tcp/4001", False, False),
    ("/ip4/10.1.2.3/tcp/4001", False, False),
    ("/ip4/169.254.169.254/tcp/80", False, False),  # a cloud metadata address
    ("/ip4/192.168.1.1/tcp/80", False, False),
    ("/ip6/::1/tcp/4001", False, False),
    ("/ip4/0.0.0.0/tcp/4001", False, False),
    ("/dns4/example.com/tcp/4001", False, False),  # a name could resolve to anything
    ("/ip4/1.1.1.1/tcp/4001/p2p/12D3KooWRelay/p2p-circuit", False, True),  # a circuit: by its relay
    ("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWRelay/p2p-circuit", False, False),
    ("/ip4/127.0.0.1/tcp/4001", True, True),
    ("/ip4/10.1.2.3/tcp/4001", True, True),
])
def test_only_globally_routable_addresses_are_dialled_unless_the_swarm_is_local(addr, local, ok):
    assert dialable(addr, local) is ok


def test_a_next_hop_with_no_dialable_address_is_refused_before_any_dial():
    hop = PeerInfo("P", ("/ip4/127.0.0.1/tcp/1", "/ip4/8.8.4.4/tcp/4001"))
    assert allowed_hop(hop, False).addrs == ("/ip4/8.8.4.4/tcp/4001",)
    with pytest.raises(SessionError) as e:
        allowed_hop(PeerInfo("P", ("/ip4/127.0.0.1/tcp/1", "/ip4/10.0.0.1/tcp/2")), False)
    assert e.value.code == "bad_next_hop"


def test_next_hop_dials_are_rate_limited_per_opener_and_per_group():
    rate = DialRate(per_opener=2, per_group=3, window_s=60)
    rate.take("A", "g")
    rate.take("A", "g")
    with pytest.raises(SessionError) as e:
        rate.take("A", "g")
    assert e.value.code == "busy" and e.value.retry_after_s > 0
    rate.take("B", "g")  # another id of the same network: one more, then the network is spent
    with pytest.raises(SessionError):
        rate.take("C", "g")
    rate.take("D", "h")
