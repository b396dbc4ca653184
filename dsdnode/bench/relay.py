"""A client-relayed chain: the way Petals routes a block, kept as a benchmark baseline.

Each server holds a single-hop session (OpenSession with next_hop=None) and answers the client;
the client carries the block from hop to hop itself. A round therefore crosses 2N links instead of
the N+1 of push forwarding (RemoteChain). Everything else -- routing, session opening, readers,
failover and replay -- is RemoteChain's: only the next hop and the block path differ.
"""

from __future__ import annotations

import torch

from ..client.interface import ChainOutput
from ..client.routing import Hop
from ..client.swarm_chain import RemoteChain


class RelayChain(RemoteChain):
    def _next_hop(self, hops: list[Hop], i: int):
        return None  # every hop answers the client, which relays to the next

    async def _forward_once(self, hidden: torch.Tensor, commit_len: int) -> ChainOutput:
        computes: list[float] = []
        for i in range(len(self.legs) or 1):  # no legs: _step_through raises "no open session"
            got = await self._step_through(i, hidden, commit_len)
            hidden = got.hidden.to_torch()
            computes += [t.compute_s for t in got.timings]
        return ChainOutput(hidden, computes)
