"""What clients and servers share about sessions: the protocol id and the dtypes of hidden states.

Kept apart from both sides so that client/ never imports server/ (and the other way round): the
wire format itself is in wire.py."""

from __future__ import annotations

import torch

# Bumped whenever a message or record changes incompatibly: records carry it, and a node skips
# records of another version with a clear message instead of failing on them mid-session.
PROTOCOL_VERSION = 3  # 3: OpenSession.next_session_id (each hop's session has its own id)
SESSION_PROTOCOL = f"/dsdnode/session/{PROTOCOL_VERSION}.0.0"
HIDDEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in HIDDEN_DTYPES.items()}
