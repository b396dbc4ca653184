"""Shadow sessions: what an auditing server is sent, shaped so that it cannot tell an audit from a real session.

An audit (client/audit.py) has other servers recompute a hop's blocks. A server that can tell when
it audits can lie only then (to frame the hop) or only when it does not (to pass its own wrong work
off), so what it is sent must look like what a real session is sent:

- ShadowRoute, the ordinary form. Every hop of the route is mirrored by pieces on other servers,
  and the pieces are chained like a real route: the client opens, from an identity made for this
  shadow route, a session on each piece naming its previous and next piece (ids of their own, as a
  real client gives its hops); it sends the first piece the blocks the route's first hop was sent,
  one at a time -- each once the route computed it and every piece's copy of the last came back, as
  a real client waits for a pass -- and each piece pushes its output on (stamped with its HopTiming) and sends the
  opener a copy. So a piece sees what a real hop at its place sees: a previous hop pushing to it,
  a next hop to push to, one block per round, the route's block shapes. A hop whose layers no
  independent server serves is mirrored by its own server, as a feeder: not an audit, only what
  carries the blocks to the pieces after it (its copy is still compared with the hop's output, so
  a feeder that answers one block two ways cannot bend the comparisons after it).
- ShadowSession, one server fed by the client itself, blocks back to back: what a second opinion
  in a dispute and the re-audit of a hop whose route comparison was voided use (recognisable as
  such: docs/ARCHITECTURE.md, "Shadow sessions")."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

import torch

from ..errors import PeerError
from ..net.p2p import P2PNode, PeerInfo, Stream
from ..net.protocol import SESSION_PROTOCOL
from ..net.records import SpanRecord
from ..net.stream import close_quietly
from ..net.wire import (CloseSession, ErrorReply, Forward, ForwardResult, OpenSession, SessionOpened, TensorPayload,
                        WireLimits, decode, digest, encode, hidden_payload)

AUDIT_TIMEOUT_S = 20.0  # a shadow session's answer (to its open, or to one block)


class AuditUnavailable(PeerError, RuntimeError):
    """The auditor could not do the work (refused, unreachable, slow, unusable reply)."""

    def __init__(self, message: str, peer: str = ""):
        super().__init__(message)
        self.peer = peer


class AuditStalled(AuditUnavailable):
    """The auditor sent nothing within AUDIT_TIMEOUT_S."""


class AuditorBusy(AuditUnavailable):
    """The auditor answered `busy` (its budget is full, or a replica of its layers holds fewer
    sessions: server/load.py): no fault of its own, so, as in routing, no mark."""


class UnlikeAuditor(AuditUnavailable):
    """The auditor computes in another dtype than the audited hop: no fault, but no comparison."""


@dataclass(frozen=True)
class HopBlock:
    """One block as a hop of the route was sent it -- its step id, commit_len, inputs and token tree
    -- and the outputs it returned. A shadow session is sent the same blocks (the hop's own block
    shapes, rolled-back drafts included), so what an auditor sees is what the hop saw."""

    step: int
    commit_len: int
    inputs: torch.Tensor  # [1, T, H]
    outputs: torch.Tensor
    mask: torch.Tensor | None = None  # a token tree's attention mask (Forward.attention_mask)
    positions: list[int] | None = None
    kept: list[int] | None = None
    queued: bool = False  # sent right after the block before it, not after its answer (a prefill's chunks)

    def first_position(self, row: int) -> int:
        """Where a wrong output in `row` means the generation must roll back to: the row's own
        position in a chain block; in a token tree, whose rows are not in sequence, the block's start."""
        return self.commit_len if self.mask is not None else self.commit_len + row


class ShadowSession:
    """A session on an auditing server, fed by the client itself (request/response on one stream),
    opened from an identity of its own (`Auditor` gives every panel a fresh one)."""

    def __init__(self, record: SpanRecord, stream: Stream, session_id: str, limits: WireLimits, wire: str = "exact"):
        self.record, self.stream, self.session_id, self.limits = record, stream, session_id, limits
        self.wire = wire  # the audited route's wire mode: a shadow rounds its inputs and outputs alike
        self.compute_dtype = ""
        self.replayed = 0  # blocks of the hop's log this session has been sent

    @classmethod
    async def open(cls, node: P2PNode, record: SpanRecord, model: str, weights: str, start: int, end: int,
                   max_length: int, dtype: str, limits: WireLimits, wire: str = "exact") -> ShadowSession:
        stream = await _open_stream(node, record)
        shadow = cls(record, stream, secrets.token_hex(8), limits, wire)
        try:
            opened = await _ask(stream, OpenSession(shadow.session_id, model, start, end, max_length, None, None, dtype,
                                                    weights, None, wire), SessionOpened, record.peer_id, limits)
        except BaseException:
            await close_quietly(stream)
            raise
        shadow.compute_dtype = opened.compute_dtype
        return shadow

    async def run(self, blocks: list[HopBlock], hiddens: list[torch.Tensor]) -> list[torch.Tensor]:
        """This piece's outputs for `blocks` (the next ones of the hop's log), given these inputs: each
        sent as the hop was sent it. They are sent back to back (the server runs a stream's blocks in
        order, as it does a prefill's chunks) while the answers are read: one round trip, not one per block."""
        async def send() -> None:
            for block, hidden in zip(blocks, hiddens):
                mask = None if block.mask is None else TensorPayload.from_torch(block.mask)
                await _send(self.stream, Forward(self.session_id, block.step, block.commit_len,
                                                 hidden_payload(hidden, self.wire), mask, [], block.positions, block.kept),
                            self.record.peer_id)

        async def receive() -> list[torch.Tensor]:
            outs = []
            for block, hidden in zip(blocks, hiddens):
                got = await _ask(self.stream, None, ForwardResult, self.record.peer_id, self.limits)
                if got.step_id != block.step or tuple(got.hidden.shape) != tuple(hidden.shape):
                    raise AuditUnavailable(f"auditor {self.record.peer_id} answered a block with step {got.step_id}, "
                                           f"shape {list(got.hidden.shape)}", self.record.peer_id)
                outs.append(got.hidden.to_torch())
                self.replayed += 1
            return outs

        sending = asyncio.create_task(send())
        try:
            outs = await receive()
        finally:
            if not sending.done():
                sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        return outs

    async def close(self) -> None:
        await _close(self.stream, self.session_id)


@dataclass(frozen=True)
class Piece:
    """One server of an audit panel, the layers it recomputes, and its observed network group."""

    record: SpanRecord
    group: str
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


@dataclass(frozen=True)
class Mirror:
    """The pieces that recompute one hop's layers in a shadow route; audits: they are independent
    of the hop (a panel), else they are the hop's own server (a feeder, no audit)."""

    pieces: tuple[Piece, ...]
    audits: bool


class ShadowRoute:
    """Shadow sessions chained by pushes along the pieces of every hop's mirror, fed the route's blocks
    as a real client feeds a route (see the module's docstring). `outputs(last)` gives, per mirror,
    the output of its last piece for each block of the route from the first."""

    def __init__(self, node: P2PNode, mirrors: list[Mirror], streams: list[Stream], ids: list[str],
                 compute_dtypes: list[str], limits: WireLimits, wire: str = "exact"):
        self.node, self.mirrors, self.streams, self.ids, self.limits = node, mirrors, streams, ids, limits
        self.wire = wire  # the audited route's wire mode: the shadow route rounds at the same links
        self.pieces = [p for m in mirrors for p in m.pieces]
        self.compute_dtypes = compute_dtypes  # what each piece says its layers compute in
        self.mirror_of = [i for i, m in enumerate(mirrors) for _ in m.pieces]  # the mirror of each piece
        self.outs: list[list[torch.Tensor]] = [[] for _ in mirrors]
        self.fed = 0  # blocks of the route whose every copy came back
        self.failure: AuditUnavailable | None = None
        self._progress = asyncio.Event()
        self._feeding: asyncio.Task | None = None

    @classmethod
    async def open(cls, mirrors: list[Mirror], model: str, weights: str, max_length: int, dtype: str,
                   limits: WireLimits, like: P2PNode, wire: str = "exact") -> ShadowRoute:
        """Sessions on every piece, from a fresh identity (started like the client's node `like`)."""
        node = await P2PNode.start(client=True, latency=like.latency, max_frame_bytes=like.max_frame_bytes)
        pieces = [p for m in mirrors for p in m.pieces]
        ids = [secrets.token_hex(8) for _ in pieces]

        async def open_one(j: int) -> tuple[Stream, str]:
            p = pieces[j]
            nxt = pieces[j + 1].peer_id if j + 1 < len(pieces) else None
            msg = OpenSession(ids[j], model, p.start, p.end, max_length, nxt, pieces[j - 1].peer_id if j else None,
                              dtype, weights, ids[j + 1] if nxt else None, wire)
            stream = await _open_stream(node, p.record)
            try:
                opened = await _ask(stream, msg, SessionOpened, p.peer_id, WireLimits())
            except BaseException:
                await close_quietly(stream)
                raise
            return stream, opened.compute_dtype

        try:
            opened = await asyncio.gather(*(open_one(j) for j in range(len(pieces))), return_exceptions=True)
        except BaseException:  # cancelled (the route closed meanwhile): each piece closed its own stream
            await node.stop()
            raise
        failures = [e for e in opened if isinstance(e, BaseException)]
        if failures:
            await asyncio.gather(*(close_quietly(o[0]) for o in opened if not isinstance(o, BaseException)))
            await node.stop()
            raise failures[0]
        return cls(node, mirrors, [o[0] for o in opened], ids, [o[1] for o in opened], limits, wire)

    def start(self, blocks: list[HopBlock], grew: asyncio.Event) -> None:
        """Feed `blocks` (the route's first hop's log, which grows; `grew` is set when it does)."""
        self._feeding = asyncio.create_task(self._feed(blocks, grew))

    async def outputs(self, last: int) -> list[list[torch.Tensor]]:
        """Per mirror, its outputs of blocks [0, last) (at least) of the route, once computed."""
        while self.fed < last:
            if self.failure is not None:
                raise self.failure
            self._progress.clear()
            await self._progress.wait()  # the feed's per-block timeouts bound the wait
        return self.outs

    async def _feed(self, blocks: list[HopBlock], grew: asyncio.Event) -> None:
        try:
            while True:
                while self.fed >= len(blocks):
                    grew.clear()
                    await grew.wait()
                run = 1  # with the blocks the client sent right after it, as it sent them
                while self.fed + run < len(blocks) and blocks[self.fed + run].queued:
                    run += 1
                await self._pass(blocks[self.fed:self.fed + run])
                self.fed += run
                self._progress.set()
        except AuditUnavailable as e:
            self.failure = e
        except Exception as e:  # whatever else went wrong, the audit must not wait for it
            self.failure = AuditUnavailable(f"the shadow route failed: {e!r}")
        except asyncio.CancelledError:
            self.failure = AuditUnavailable("the shadow route was closed")
            raise
        finally:
            self._progress.set()

    async def _pass(self, blocks: list[HopBlock]) -> None:
        """Blocks sent back to back through every piece (pushed on from piece to piece); each mirror's
        outputs kept."""
        sent = []
        for block in blocks:
            sent.append(hidden_payload(block.inputs, self.wire))
            mask = None if block.mask is None else TensorPayload.from_torch(block.mask)
            await _send(self.streams[0], Forward(self.ids[0], block.step, block.commit_len, sent[-1], mask, [],
                                                 block.positions, block.kept), self.pieces[0].peer_id)
        for block, given in zip(blocks, sent):
            got = await asyncio.gather(*(_ask(s, None, ForwardResult, p.peer_id, self.limits)
                                         for s, p in zip(self.streams, self.pieces)), return_exceptions=True)
            for j, result in enumerate(got):
                if isinstance(result, BaseException):
                    if isinstance(result, AuditStalled) and j and not isinstance(got[j - 1], BaseException):
                        # the piece before answered, this one never did: it hung or was never pushed the
                        # block, which the client cannot tell apart (as in a real route): no one is to blame
                        raise AuditUnavailable(f"the shadow route stalled between {self.pieces[j - 1].peer_id} and "
                                               f"{self.pieces[j].peer_id}")
                    raise result
            for j, (p, result) in enumerate(zip(self.pieces, got)):
                if (result.step_id != block.step or result.session_id != self.ids[j] or len(result.timings) != j + 1
                        or tuple(result.hidden.shape) != tuple(block.inputs.shape)):
                    raise AuditUnavailable(f"auditor {p.peer_id} answered step {result.step_id} with "
                                           f"{list(result.hidden.shape)} and {len(result.timings)} timings", p.peer_id)
                if result.timings[-1].input_digest != digest(given):  # it or the piece before lied: no comparison
                    raise AuditUnavailable(f"auditor {p.peer_id} computed on another input than it was pushed", p.peer_id)
                given = result.hidden
            for j, i in enumerate(self.mirror_of):
                if j + 1 == len(got) or self.mirror_of[j + 1] != i:  # the mirror's last piece: its output
                    self.outs[i].append(got[j].hidden.to_torch())

    async def close(self) -> None:
        if self._feeding is not None:
            self._feeding.cancel()
            await asyncio.gather(self._feeding, return_exceptions=True)
        await asyncio.gather(*(_close(s, i) for s, i in zip(self.streams, self.ids)))
        await self.node.stop()


async def _open_stream(node: P2PNode, record: SpanRecord) -> Stream:
    try:
        return await node.open_stream(PeerInfo(record.peer_id, tuple(record.addrs)), SESSION_PROTOCOL,
                                      timeout=AUDIT_TIMEOUT_S)
    except Exception as e:
        raise AuditUnavailable(f"cannot reach auditor {record.peer_id}: {e!r}", record.peer_id) from None


async def _close(stream: Stream, session_id: str) -> None:
    try:
        await asyncio.wait_for(stream.send(encode(CloseSession(session_id))), 2.0)
    except Exception:
        pass
    await close_quietly(stream)


async def _send(stream: Stream, msg, peer: str) -> None:
    try:
        await stream.send(encode(msg))
    except Exception as e:
        raise AuditUnavailable(f"auditor {peer}: {e!r}", peer) from None


async def _ask(stream: Stream, msg, want: type, peer: str, limits: WireLimits):
    """Send `msg` (None: nothing) and read the answer, which must be a `want`."""
    if msg is not None:
        await _send(stream, msg, peer)
    try:
        reply = decode(await stream.recv(timeout=AUDIT_TIMEOUT_S), limits)
    except TimeoutError as e:
        raise AuditStalled(f"auditor {peer}: {e!r}", peer) from None
    except Exception as e:
        raise AuditUnavailable(f"auditor {peer}: {e!r}", peer) from None
    if isinstance(reply, ErrorReply) or not isinstance(reply, want):
        what = f"{reply.code}: {reply.message}" if isinstance(reply, ErrorReply) else type(reply).__name__
        busy = isinstance(reply, ErrorReply) and reply.code == "busy"
        raise (AuditorBusy if busy else AuditUnavailable)(f"auditor {peer} answered {what}", peer)
    return reply
