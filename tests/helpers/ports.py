"""A loopback port that was free a moment ago (for servers a test starts on a known port).

Drawn below the kernel's ephemeral range: a port the kernel hands out (to a socket bound to port 0,
or as an outgoing connection's source port) could be taken by any of the parallel tests' hundreds of
libp2p connections between our check and the server's bind (seen: "cannot serve metrics on
127.0.0.1:51059: Address already in use" in a full parallel run)."""

import random
import socket


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    low = min(_ephemeral_low(), 32768)
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no luck below the range: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
