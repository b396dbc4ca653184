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


@dataclass(frozen=True)
class TreeBlock:
    """How a block that is a token tree is laid out: who sees whom, and where each sits.

    mask: [T, T] bool, True where block position i may attend to block position j (its ancestors
    and itself); positions: each block position's position id (commit_len + depth)."""

    mask: torch.Tensor
    positions: list[int]


class Chain(Protocol):
    n_hops: int
    failovers: int  # how many times the chain was rebuilt around a fault so far
    route: list[tuple[str, int, int]]  # (peer id, or "local", first layer, end layer) of each hop

    async def start_session(self, max_length: int) -> None:
        """Open a fresh session (empty KV caches with room for max_length positions) on every hop."""

    async def forward(self, hidden: torch.Tensor, commit_len: int, tree: TreeBlock | None = None,
                      kept: list[int] | None = None) -> ChainOutput:
        """On every hop: keep the `kept` positions of the previous block (indices into it, gathered to
        its start; None keeps it as it is), then the first commit_len cached positions, and run the
        block (a token tree when `tree` is given) through all hops."""

    async def close(self) -> None:
        """End the session and free the hops' caches."""
