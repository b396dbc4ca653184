"""Persistent node identity."""

import asyncio
import os
import stat

import pytest

from dsdnode.net.identity import load_or_create_identity
from dsdnode.net.p2p import P2PNode
from libp2p.peer.id import ID


def peer_id(kp):
    return ID.from_pubkey(kp.public_key).to_base58()


def test_created_with_0600_and_stable(tmp_path):
    path = tmp_path / "nested" / "dir" / "node.key"
    first = load_or_create_identity(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert peer_id(load_or_create_identity(path)) == peer_id(first)

    async def started_id():
        node = await P2PNode.start(identity=load_or_create_identity(str(path)))
        await node.stop()
        assert node.info.addrs == tuple(node.addrs)
        return node.peer_id, node.addrs

    pid, addrs = asyncio.run(started_id())
    assert pid == peer_id(first) and addrs[0].endswith(f"/p2p/{pid}")


def test_ephemeral_identities_differ():
    assert peer_id(load_or_create_identity(None)) != peer_id(load_or_create_identity(None))


@pytest.mark.parametrize("content", [b"", b"not a key", b"\x08\x01\x12\x05short"])
def test_corrupt_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "node.key"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        load_or_create_identity(str(path))


def test_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load_or_create_identity(str(tmp_path))
