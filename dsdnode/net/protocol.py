"""What clients and servers share about sessions: the protocol version and id (the dtypes hidden
states may have are in dtypes.py).

Kept apart from both sides so that client/ never imports server/ (and the other way round): the
wire format itself is in wire.py."""

from __future__ import annotations

# Bumped whenever a message or record changes incompatibly: records carry it, and a node skips
# records of another version with a clear message instead of failing on them mid-session.
PROTOCOL_VERSION = 4  # 3: OpenSession.next_session_id (each hop's session has its own id); 4: OpenSession.wire
SESSION_PROTOCOL = f"/dsdnode/session/{PROTOCOL_VERSION}.0.0"
