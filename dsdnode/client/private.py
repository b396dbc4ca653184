"""Private layers: the client runs the target's first N layers itself, so no server sees token embeddings.

The first hop of a swarm chain receives the embeddings of the prompt and of every token, which a
nearest-neighbour lookup in the embedding table inverts to the text (README, "Privacy"). With
`private_layers = N` the client computes layers [0, N) in its own process (a LocalChain of one
span, as `--local` does) and routes the swarm from layer N on: servers receive only hidden states
after N layers. That hides the embeddings, not the text: hidden states after a few layers can
still be inverted in part (published attacks recover much of the text from middle layers), so it
raises the cost of reading along, no more. Its cost: the client holds N layers' weights and
their KV cache, and computes them on every block before the block leaves (BENCHMARKS.md).

Exact by construction: each block goes through the same layers in the same order, with the same
commit_len and kept path on the local span as on every server, so greedy decoding gives the
target's tokens (float32: the same as the plain chain). Audits, failovers and replays concern the
swarm part only: the local span is the user's own, and a replay resends the local span's outputs,
which the swarm chain keeps as its history."""

from __future__ import annotations

from .interface import Chain, ChainOutput, Checkpoint, TreeBlock
from .local import LocalChain


class PrivateLayersChain:
    """A LocalChain of the first layers, then a swarm chain (RemoteChain routed from their end)."""

    def __init__(self, local: LocalChain, swarm: Chain):
        self.local, self.swarm = local, swarm

    @property
    def n_hops(self) -> int:
        return self.local.n_hops + self.swarm.n_hops

    @property
    def failovers(self) -> int:
        return self.swarm.failovers

    @property
    def route(self) -> list[tuple[str, int, int]]:
        return self.local.route + self.swarm.route

    @property
    def unaudited_layers(self) -> list[tuple[int, int]]:
        return self.swarm.unaudited_layers

    @property
    def auditor(self):
        """The swarm chain's auditor (the local span has nothing to audit)."""
        return getattr(self.swarm, "auditor", None)

    async def start_session(self, max_length: int) -> None:
        await self.local.start_session(max_length)
        await self.swarm.start_session(max_length)

    async def forward(self, hidden, commit_len: int, tree: TreeBlock | None = None,
                      kept: list[int] | None = None) -> ChainOutput:
        mine = await self.local.forward(hidden, commit_len, tree, kept)
        out = await self.swarm.forward(mine.hidden, commit_len, tree, kept)
        out.hop_compute_s = mine.hop_compute_s + out.hop_compute_s
        return out

    async def prefill(self, hidden, chunk: int | None = None) -> list[ChainOutput]:
        """The whole prompt through the local span in one block (nothing crosses a wire yet), then the
        swarm's prefill of its output in the swarm's chunks."""
        mine = await self.local.forward(hidden, 0)
        return await self.swarm.prefill(mine.hidden, chunk)

    async def checkpoint(self) -> Checkpoint:
        return await self.swarm.checkpoint()

    async def finish(self, path: list[int] = (0,)) -> Checkpoint:
        return await self.swarm.finish(path)

    async def close(self) -> None:
        try:
            await self.swarm.close()
        finally:
            await self.local.close()
