"""A loopback port that was free a moment ago (for servers a test starts on a known port)."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
