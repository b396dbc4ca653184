"""Network groups and dialable addresses: who counts as one party, and where a node may dial.

A peer id costs nothing to make; an address does. Limits that a throw-away id must not escape
(sessions and KV cache per client, relay reservations and circuits, reachability votes) are
therefore also kept per *network group*: the group of the IP address a connection actually comes
from, as the kernel reported it, never an address a peer claims. A group is an IPv4 /24 or an IPv6
/48 (what one household, small provider customer or cloud tenant typically gets; the same
granularity Bitcoin Core uses to spread its peers). All of loopback is one group: on a machine
serving the public, every local process is one party. A *local swarm* (`local_swarm = true`:
tests, `dsdnode bench`, the demo, a swarm on one machine or a private network) is the exception:
there, each loopback peer id is its own group, since each local process stands for a machine. A
relayed connection comes from its relay's address, so it counts in the relay's group (the relay
limits the circuits per group of the dialers it serves, `net/relay.py`).

Dialing: a node dials a next hop (an address learnt from a record a peer signed itself, so chosen
by whoever made that peer) only at globally routable addresses, so a swarm member cannot make a
public server probe its loopback, its LAN or a cloud metadata address. A local swarm allows any
address: its members are on loopback or a private network by design."""

from __future__ import annotations

import ipaddress

IPV4_GROUP_PREFIX = 24
IPV6_GROUP_PREFIX = 48
LOOPBACK_GROUP = "loopback"
UNKNOWN_GROUP = "unknown"  # no address known (fails closed: all such connections share one group)


def network_group(ip: str | None, peer_id: str | None, local_swarm: bool) -> str:
    """The group a connection from `ip` (by peer `peer_id`) counts in."""
    try:
        addr = ipaddress.ip_address(ip) if ip else None
    except ValueError:
        addr = None
    if addr is None:
        return UNKNOWN_GROUP
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return f"{LOOPBACK_GROUP}/{peer_id}" if local_swarm and peer_id else LOOPBACK_GROUP
    prefix = IPV4_GROUP_PREFIX if addr.version == 4 else IPV6_GROUP_PREFIX
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def multiaddr_ip(addr: str) -> str | None:
    """The IP of the first /ip4 or /ip6 component of a multiaddr string (None if there is none)."""
    parts = addr.split("/")
    for i, part in enumerate(parts[:-1]):
        if part in ("ip4", "ip6"):
            return parts[i + 1]
    return None


def is_global_ip(ip: str | None) -> bool:
    try:
        addr = ipaddress.ip_address(ip) if ip else None
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr is not None and addr.is_global and not addr.is_multicast


def dialable(addr: str, local_swarm: bool) -> bool:
    """May this node dial `addr` for a peer? Only an address whose IP part (for a circuit address:
    the relay's) is globally routable, unless the swarm is local. A DNS name is refused (its answer
    could be anything)."""
    ip = multiaddr_ip(addr)
    if ip is None:
        return False
    return local_swarm or is_global_ip(ip)


def dialable_addrs(addrs: list[str] | tuple[str, ...], local_swarm: bool) -> list[str]:
    return [a for a in addrs if dialable(a, local_swarm)]
