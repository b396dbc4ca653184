"""Persistent libp2p identity (Ed25519), so a node keeps its peer id across restarts.

Span records on the DHT are keyed and signed by the peer id; a node that changed id on
every restart would leave stale records behind and lose the clients' latency history.
The key file holds the standard libp2p protobuf-serialized private key (same format as
go-libp2p key files), readable only by its owner (mode 0600).
"""

from __future__ import annotations

import logging
import os
import stat

from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key

from ..files import write_atomic
from ..errors import BadValue

log = logging.getLogger(__name__)


def load_or_create_identity(path: str | os.PathLike[str] | None) -> KeyPair:
    """Load the Ed25519 key pair stored at `path`, creating it (0600) if missing.

    `None` gives an ephemeral identity (tests, throwaway clients). A file that exists but is
    not an Ed25519 libp2p private key raises ValueError naming the path: silently replacing
    it would change the node's peer id.
    """
    if path is None:
        return create_new_key_pair()
    path = os.fspath(path)
    if os.path.isdir(path):
        raise BadValue(f"identity path {path} is a directory, expected a key file")
    if os.path.exists(path):
        return _load(path)
    key_pair = create_new_key_pair()
    _write_private(path, key_pair.private_key.serialize())
    log.info("created new node identity at %s", path)
    return key_pair


def _load(path: str) -> KeyPair:
    with open(path, "rb") as f:
        data = f.read()
    try:
        private_key = deserialize_private_key(data)
    except Exception as exc:  # protobuf/nacl raise many types; all mean "not a key"
        raise BadValue(f"identity file {path} is corrupt (not a libp2p private key): {exc}") from None
    if not isinstance(private_key, Ed25519PrivateKey) or len(private_key.to_bytes()) != 32:
        raise BadValue(f"identity file {path} does not hold an Ed25519 private key")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        log.warning("identity file %s is readable by others (mode %o); expected 0600", path, mode)
    return KeyPair(private_key, private_key.get_public_key())


def _write_private(path: str, data: bytes) -> None:
    """Write atomically with mode 0600 from the start (never briefly world-readable)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    write_atomic(path, data, 0o600)
