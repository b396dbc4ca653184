"""A hostile client for tests/server/test_abuse.py, run inside a network namespace: throw-away peer
ids that each open a max-length session on one server and write as many positions as the server
lets them, then keep those sessions busy (one position a second) so none of them is idle.

Prints one JSON line once it holds what it could get: {"ids", "opened", "positions", "refusals"};
then holds until killed.
    python -m tests.helpers.kv_squatter SERVER_MULTIADDR SERVER_PEER_ID MODEL WEIGHTS IDS MAX_LENGTH HIDDEN
"""

from __future__ import annotations

import asyncio
import json
import sys

import torch

from dsdnode.net.identity import load_or_create_identity
from dsdnode.net.p2p import P2PNode, PeerInfo
from dsdnode.net.protocol import SESSION_PROTOCOL
from dsdnode.net.wire import ErrorReply, Forward, ForwardResult, OpenSession, TensorPayload, WireLimits, decode, encode

BLOCK = 64


async def squat(addr: str, peer_id: str, model: str, weights: str, index: int, max_length: int, hidden: int,
                refusals: dict, held: list) -> None:
    node = await P2PNode.start(identity=load_or_create_identity(None), client=True)
    stream = await node.open_stream(PeerInfo(peer_id, (addr,)), SESSION_PROTOCOL)
    sid = f"squat-{index}"

    async def ask(msg):
        await stream.send(encode(msg))
        return decode(await stream.recv(timeout=60), WireLimits())

    reply = await ask(OpenSession(sid, model, 0, 30, max_length, None, None, "float32", weights))
    if isinstance(reply, ErrorReply):
        refusals[reply.code] = refusals.get(reply.code, 0) + 1
        held.append((index, 0, None))
        return
    length, step = 0, 0
    while length + BLOCK <= max_length:
        step += 1
        reply = await ask(Forward(sid, step, length, TensorPayload.from_torch(torch.randn(1, BLOCK, hidden)), None, []))
        if not isinstance(reply, ForwardResult):
            refusals[reply.code] = refusals.get(reply.code, 0) + 1
            break
        length += BLOCK
    held.append((index, length, (stream, sid, step)))


async def keep_busy(held: list, hidden: int) -> None:
    while True:
        await asyncio.sleep(1.0)
        for i, (index, length, live) in enumerate(held):
            if live is None or length == 0:
                continue
            stream, sid, step = live
            try:  # rewrite the last position: the session stays active and no bigger
                await stream.send(encode(Forward(sid, step + 1, length - 1,
                                                 TensorPayload.from_torch(torch.randn(1, 1, hidden)), None, [])))
                await stream.recv(timeout=30)
                held[i] = (index, length, (stream, sid, step + 1))
            except Exception:
                held[i] = (index, length, None)


async def main(addr, peer_id, model, weights, ids, max_length, hidden) -> None:
    torch.set_num_threads(1)
    refusals: dict = {}
    held: list = []
    await asyncio.gather(*(squat(addr, peer_id, model, weights, i, int(max_length), int(hidden), refusals, held)
                           for i in range(int(ids))))
    print(json.dumps({"ids": int(ids), "opened": sum(1 for h in held if h[2] is not None),
                      "positions": sum(h[1] for h in held), "refusals": refusals}), flush=True)
    await keep_busy(held, int(hidden))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
