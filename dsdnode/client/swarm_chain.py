"""A chain of remote servers: one session along a routed chain, push forwarding, failover.

The client opens a stream to every hop and sends each an OpenSession naming the next hop. A block
goes to hop 1 only; hops push it on; the last hop answers on its client stream. The client keeps
the hidden states it has sent for the committed prefix, so when a hop dies or fails it re-routes
around the failed peers, opens a new session and replays the prefix to the new chain: the output is
the same as without the failure. Failover is bounded (never loops) and each failure excludes the
peers that caused it."""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

import torch

from ..net.latency import LinkLatency
from ..net.p2p import P2PNode, PeerInfo, Stream, StreamClosed
from ..net.stream import close_quietly
from ..net.wire import (CloseSession, ErrorReply, Forward, ForwardResult, OpenSession, SessionOpened,
                        TensorPayload, WireError, WireLimits, decode, encode)
from ..server.daemon import PROTOCOL
from .interface import ChainOutput
from .routing import Hop, best_chain, live_candidates

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ChainFailure(RuntimeError):
    def __init__(self, message: str, peer_id: str | None = None, code: str | None = None):
        super().__init__(message)
        self.peer_id, self.code = peer_id, code


@dataclass
class _Leg:
    hop: Hop
    stream: Stream
    reader: asyncio.Task | None = None


class RemoteChain:
    def __init__(self, node: P2PNode, model: str, num_layers: int, hidden_size: int, *,
                 dtype: torch.dtype = torch.bfloat16, max_failovers: int = 3, step_timeout_s: float = 120.0,
                 max_block: int = 64):
        self.node, self.model, self.num_layers, self.hidden_size = node, model, num_layers, hidden_size
        self.dtype_name = DTYPE_NAMES[dtype]
        self.max_failovers, self.step_timeout_s, self.max_block = max_failovers, step_timeout_s, max_block
        self.legs: list[_Leg] = []
        self.excluded: set[str] = set()
        self.failovers = 0
        self._results: asyncio.Queue = asyncio.Queue()
        self._step = 0
        self._history: torch.Tensor | None = None  # inputs of the committed prefix, for replay
        self._max_length = 0
        self.session_id = ""
        self.route: list[tuple[str, int, int]] = []  # (peer id, start, end) of the latest session's hops

    @property
    def n_hops(self) -> int:
        return len(self.legs) or 1

    async def start_session(self, max_length: int) -> None:
        self._max_length, self._history = max_length, None
        await self._open()

    async def forward(self, hidden: torch.Tensor, commit_len: int) -> ChainOutput:
        self._remember(hidden, commit_len)
        failure: ChainFailure | None = None
        for _ in range(self.max_failovers + 1):
            try:
                if failure is not None:
                    await self._fail_over(failure)
                    await self._replay(commit_len)
                return await self._forward_once(hidden, commit_len)
            except ChainFailure as e:
                failure = e
        raise ChainFailure(f"gave up after {self.max_failovers} failovers; last failure: {failure}")

    async def shutdown(self) -> None:
        """Close the session and leave the swarm."""
        await self.close()
        await self.node.stop()

    async def close(self) -> None:
        legs, self.legs = self.legs, []
        for leg in legs:
            if leg.reader:
                leg.reader.cancel()
            try:
                await leg.stream.send(encode(CloseSession(self.session_id)))
                await leg.stream.close()
            except Exception:
                pass

    # ---- session ------------------------------------------------------------------------
    async def _open(self) -> None:
        candidates = await live_candidates(self.node, self.model, self.excluded)
        hops = best_chain(candidates, self.num_layers)
        self.session_id = secrets.token_hex(8)
        self._results = asyncio.Queue()
        streams = []
        try:
            for hop in hops:
                streams.append(await self.node.open_stream(hop.candidate.peer, PROTOCOL))
            await asyncio.gather(*(self._open_leg(hops, i, streams[i]) for i in range(len(hops))))
        except (ChainFailure, StreamClosed, ConnectionError, TimeoutError) as e:
            for s in streams:
                await close_quietly(s)
            if isinstance(e, ChainFailure):
                raise
            raise ChainFailure(f"opening the session failed: {e}") from None
        self.legs = [_Leg(h, s) for h, s in zip(hops, streams)]
        self.route = [(h.candidate.record.peer_id, h.start, h.end) for h in hops]
        for leg in self.legs:
            leg.reader = asyncio.create_task(self._read(leg, self._results))
        log.info("session %s along %s", self.session_id, self.route)

    def _next_hop(self, hops: list[Hop], i: int):
        """The span record hop i pushes its output to (None: it answers the client)."""
        return hops[i + 1].candidate.record if i + 1 < len(hops) else None

    async def _open_leg(self, hops: list[Hop], i: int, stream: Stream) -> None:
        hop = hops[i]
        nxt = self._next_hop(hops, i)
        pushed_by = hops[i - 1].candidate.record.peer_id if i > 0 and self._next_hop(hops, i - 1) else None
        await stream.send(encode(OpenSession(self.session_id, self.model, hop.start, hop.end, self._max_length,
                                             nxt.peer_id if nxt else None, pushed_by, self.dtype_name)))
        reply = decode(await stream.recv(timeout=30), WireLimits())
        if isinstance(reply, ErrorReply):
            raise ChainFailure(f"{hop.candidate.record.peer_id} refused the session: {reply.code}: {reply.message}",
                               hop.candidate.record.peer_id, reply.code)
        if not isinstance(reply, SessionOpened):
            raise ChainFailure(f"unexpected {type(reply).__name__}", hop.candidate.record.peer_id)

    async def _read(self, leg: _Leg, results: asyncio.Queue) -> None:
        """Everything a hop sends us: the result (last hop) or errors (any hop)."""
        peer = leg.hop.candidate.record.peer_id
        limits = WireLimits(hidden_size=self.hidden_size, max_block=self.max_block, max_length=self._max_length)
        while True:
            try:
                msg = decode(await leg.stream.recv(), limits)
            except (StreamClosed, ConnectionError) as e:
                await results.put(ChainFailure(f"lost the stream to {peer}: {e}", peer))
                return
            except WireError as e:
                await results.put(ChainFailure(f"bad reply from {peer}: {e}", peer))
                return
            if isinstance(msg, ForwardResult):
                await results.put(msg)
            elif isinstance(msg, ErrorReply):
                await results.put(ChainFailure(f"{peer}: {msg.code}: {msg.message}", peer, msg.code))

    # ---- blocks -------------------------------------------------------------------------
    async def _forward_once(self, hidden: torch.Tensor, commit_len: int) -> ChainOutput:
        got = await self._step_through(0, hidden, commit_len)
        return ChainOutput(got.hidden.to_torch(), [t.compute_s for t in got.timings])

    async def _step_through(self, leg_index: int, hidden: torch.Tensor, commit_len: int) -> ForwardResult:
        """Send a block to one leg and wait for the result of that step (from whichever hop answers)."""
        if not self.legs:
            raise ChainFailure("no open session")
        self._step += 1
        msg = Forward(self.session_id, self._step, commit_len, TensorPayload.from_torch(hidden), None, [])
        peer = self.route[leg_index][0]
        try:
            await self.legs[leg_index].stream.send(encode(msg))
        except (StreamClosed, ConnectionError) as e:
            raise ChainFailure(f"cannot send to {peer}: {e}", peer) from None
        while True:
            try:
                got = await asyncio.wait_for(self._results.get(), self.step_timeout_s)
            except asyncio.TimeoutError:
                raise ChainFailure(f"no answer within {self.step_timeout_s} s") from None
            if isinstance(got, ChainFailure):
                raise got
            if got.step_id == self._step:
                return got

    def _remember(self, hidden: torch.Tensor, commit_len: int) -> None:
        """Keep the inputs of every position: a new chain is rebuilt from them."""
        if self._history is None:
            self._history = torch.zeros(1, self._max_length, hidden.shape[-1], dtype=hidden.dtype)
        self._history[:, commit_len:commit_len + hidden.shape[1]] = hidden

    async def _replay(self, commit_len: int) -> None:
        for at in range(0, commit_len, self.max_block):
            chunk = self._history[:, at:min(commit_len, at + self.max_block)]
            await self._forward_once(chunk, at)

    async def _fail_over(self, failure: ChainFailure) -> None:
        """Exclude the peers behind a failure, then open a new session on a new route."""
        self.failovers += 1
        suspects = {failure.peer_id} if failure.peer_id else set()
        dead = await self._unreachable_hops()
        if dead:  # a hop that does not answer explains the failure better than the hop that reported it
            suspects = dead
        if not suspects:  # a timeout with every hop alive: we cannot tell, so avoid the whole route
            suspects = {peer for peer, _, _ in self.route}
        log.warning("chain failure (%s); excluding %s and re-routing", failure, sorted(suspects))
        self.excluded |= suspects
        await self.close()
        await self._open()

    async def _unreachable_hops(self) -> set[str]:
        async def alive(leg: _Leg) -> bool:
            try:
                await self.node.ping(leg.hop.candidate.peer, timeout=3.0)
                return True
            except Exception:
                return False
        states = await asyncio.gather(*(alive(leg) for leg in self.legs))
        return {leg.hop.candidate.record.peer_id for leg, ok in zip(self.legs, states) if not ok}


async def connect_chain(model: str, config, bootstrap: list[str], dtype: torch.dtype = torch.bfloat16,
                        link_latency_ms: float = 0.0) -> RemoteChain:
    """Join the swarm from `bootstrap`; the chain opens its session (and routes) on start_session."""
    if not bootstrap:
        raise ValueError("give --bootstrap or --peers to join a swarm, or --local to run without one")
    node = await P2PNode.start(bootstrap=bootstrap, latency=LinkLatency(link_latency_ms))
    return RemoteChain(node, model, config.num_hidden_layers, config.hidden_size, dtype=dtype)
