"""Separate network stacks on one machine: Linux network namespaces, for tests of NAT and relays.

`Internet` builds an "internet" namespace holding a bridge; every public host is a namespace with
one veth on that bridge (203.0.113.0/24, a documentation range). A home is two namespaces: a router
on the bridge (its WAN address in 203.0.113.0/24) that forwards and masquerades (iptables
MASQUERADE on its WAN side: connections from home go out, nothing from outside comes in, and an
unsolicited SYN is dropped, not refused, as by a home router's firewall), and the
home host behind it on a private /24 of its own; the router's uplink can be shaped with tc tbf
(this kernel has no netem: delay comes from the project's userspace latency, net/latency.py).

Every address lives inside namespaces this object created, and `close()` (also on `with` exit)
stops every process started through it (by pid) and deletes every namespace, whatever happened.
Needs root, `ip` (iproute2), `tc` and `iptables` (scripts/system-deps.sh installs them).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field

INTERNET_NET = "203.0.113"
_instances = itertools.count()


def missing_requirements() -> str:
    """Why this machine cannot build namespaces ('' if it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "tc", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run scripts/system-deps.sh)"
    return ""


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    """One namespace a process can run in, with the address others reach it by (a home host's is
    private: only its own router can reach it)."""

    ns: str
    ip: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def launcher(self) -> list[str]:
        """Prefix that runs `python -m dsdnode -v` (info logs) inside this namespace (`ip netns exec`
        execs, so the pid of the Popen is the Python process itself)."""
        return ["ip", "netns", "exec", self.ns, sys.executable, "-m", "dsdnode", "-v"]

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], capture_output=True, text=True,
                              timeout=timeout)


class Internet:
    """A bridge namespace plus public hosts and NATed homes on it; a context manager."""

    def __init__(self) -> None:
        self.prefix = f"dsdt{os.getpid() % 100000}n{next(_instances)}"  # unique while several live at once
        self.namespaces: list[str] = []
        self.hosts: list[Host] = []
        self._next = 0
        self.inet = self._namespace("inet")
        _run("ip", "-n", self.inet, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.inet, "link", "set", "br0", "up")

    def __enter__(self) -> Internet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _namespace(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def _attach(self, ns: str, ifname: str, ip: str) -> None:
        """A veth from `ns` (named ifname, address ip/24) to the bridge."""
        self._next += 1
        port = f"p{self._next}"
        _run("ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.inet)
        _run("ip", "-n", self.inet, "link", "set", port, "master", "br0")
        _run("ip", "-n", self.inet, "link", "set", port, "up")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
        _run("ip", "-n", ns, "link", "set", ifname, "up")

    def public(self, name: str, net: str = INTERNET_NET) -> Host:
        """A host with a public address: anyone on the internet can dial it. `net` (a /24 prefix such as
        "198.51.100") puts it in another network group than the rest; every host reaches every
        other on the bridge through an on-link default route, whatever its /24."""
        ns = self._namespace(name)
        ip = f"{net}.{10 + len(self.hosts)}"
        self._attach(ns, "eth0", ip)
        _run("ip", "-n", ns, "route", "add", "default", "dev", "eth0")
        host = Host(ns, ip)
        self.hosts.append(host)
        return host

    def home(self, name: str, uplink_mbit: float | None = None) -> Host:
        """A host behind its own NAT router; `uplink_mbit` shapes the router's WAN egress with tbf."""
        index = len(self.hosts)
        router = self._namespace(f"{name}r")
        self._attach(router, "wan", f"{INTERNET_NET}.{100 + index}")
        _run("ip", "-n", router, "route", "add", "default", "dev", "wan")  # public hosts of any /24, on-link
        ns = self._namespace(name)
        lan = f"10.{index}.0"
        _run("ip", "link", "add", "lan", "netns", router, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan")
        _run("ip", "-n", router, "link", "set", "lan", "up")
        _run("ip", "-n", ns, "addr", "add", f"{lan}.2/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "route", "add", "default", "via", f"{lan}.1")
        _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _run("ip", "netns", "exec", router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan",
             "-j", "MASQUERADE")
        # like a home router's firewall: drop unsolicited connections from outside instead of refusing
        # them (a refusal would kill a hole punch whose SYN arrives before the mapping exists)
        _run("ip", "netns", "exec", router, "iptables", "-A", "INPUT", "-i", "wan", "-p", "tcp", "--syn", "-j", "DROP")
        if uplink_mbit:
            _run("ip", "netns", "exec", router, "tc", "qdisc", "add", "dev", "wan", "root", "tbf",
                 "rate", f"{uplink_mbit}mbit", "burst", "64kb", "latency", "100ms")
        host = Host(ns, f"{lan}.2")
        self.hosts.append(host)
        return host

    def close(self) -> None:
        """Stop every process started in our namespaces (by pid), then delete every namespace."""
        for host in self.hosts:
            for proc in host.processes:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        proc.kill()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces.clear()
