"""What the generation loop needs from a chain of servers, whether in-process or over libp2p."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class ChainOutput:
    hidden: torch.Tensor  # [1, T, H] final hidden states of the block
    hop_compute_s: list[float] = field(default_factory=list)  # per hop, for this block
    # between consecutive hops: the next hop's receive time minus this hop's send time (two machines'
    # clocks: exact on one machine, off by their skew across machines)
    hop_link_s: list[float] = field(default_factory=list)
    block_bytes: int = 0  # the block's frame on one link (each hop pushes one of about this size on)
    reply_bytes: int = 0  # what came back to the client: the result and every hop's copy of its output


@dataclass(frozen=True)
class TreeBlock:
    """How a block that is a token tree is laid out: who sees whom, and where each sits.

    mask: [T, T] bool, True where block position i may attend to block position j (its ancestors
    and itself); positions: each block position's position id (commit_len + depth)."""

    mask: torch.Tensor
    positions: list[int]
UNCHECKED = 1 << 62  # Checkpoint.verified of a chain that does not audit: everything counts as checked


@dataclass
class Checkpoint:
    """Where a chain's audits stand. verified: outputs of positions [0, verified) are checked (or could
    not be), so a token whose position's output produced it may be handed out. rollback_to: an audit
    found a wrong output at this position: tokens produced from it on must be dropped (the chain has
    excluded the server and recomputes on another route)."""

    verified: int
    rollback_to: int | None = None


class Chain(Protocol):
    n_hops: int
    failovers: int  # how many times the chain was rebuilt around a fault so far
    route: list[tuple[str, int, int]]  # (peer id, or "local", first layer, end layer) of each hop
    # layer ranges whose outputs were released without an audit (no independent server could recompute
    # them); a chain whose trust settings require audits refuses (AuditUnavailable) instead
    unaudited_layers: list[tuple[int, int]]

    async def start_session(self, max_length: int) -> None:
        """Open a fresh session (empty KV caches with room for max_length positions) on every hop."""

    async def forward(self, hidden: torch.Tensor, commit_len: int, tree: TreeBlock | None = None,
                      kept: list[int] | None = None) -> ChainOutput:
        """On every hop: keep the `kept` positions of the previous block (indices into it, gathered to
        its start; None keeps it as it is), then the first commit_len cached positions, and run the
        block (a token tree when `tree` is given) through all hops."""

    async def prefill(self, hidden: torch.Tensor, chunk: int | None = None) -> list[ChainOutput]:
        """Compute positions [0, len) of a fresh session in chunks of `chunk` positions (None: the
        chunk the chain's measured costs say is fastest, client/prefill.py), sent back to back where
        the chain can, so its hops work on successive chunks at once. One output per chunk."""

    async def checkpoint(self) -> Checkpoint:
        """After each round: the verdict of an audit that has finished; starts one when due (without
        waiting for it)."""

    async def finish(self, path: list[int] = (0,)) -> Checkpoint:
        """Before a generation returns: audits every position not yet audited and waits for the verdict.
        path: the accepted path of the last block (block indices; a chain of drafts is 0, 1, ...)."""

    async def close(self) -> None:
        """End the session and free the hops' caches."""
