"""`dsdnode start`: serve a span of a model's layers to the swarm.

Life cycle: join the DHT -> (with --layers auto, look at who serves what) -> load the span ->
measure its speed -> announce a signed record every announce interval -> serve sessions ->
on SIGTERM withdraw, fail open sessions with "shutting_down", stop.

A session's client opens one stream to every hop of its chain. Blocks enter at the first hop on
that stream; each hop pushes its output straight to the next hop over a stream of its own, and the
last hop answers on its client stream. Errors at any hop go back on that hop's client stream, so
the client always hears about a failure from the hop where it happened.

Nothing a peer sends can stop or bloat the daemon: frames are decoded within fixed bounds (wire.py),
a frame begun must finish in time (stream.py), a session takes blocks only from its opener or the
upstream peer the opener named (sessions.py), the next hop is dialled at the addresses of its own
signed span record (never at addresses a client names), and a closed or expired session's cache is
freed at once even while its client's stream stays open."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import __version__
from ..models.span import Block, Span
from ..dtypes import HIDDEN_DTYPES, dtype_name
from ..net.groups import network_group
from ..net.records import SpanRecord
from ..net.protocol import SESSION_PROTOCOL
from ..net.p2p import P2PNode, PeerInfo, Stream, StreamClosed
from ..net.stream import FRAME_BODY_TIMEOUT_S, close_quietly
from ..ready import print_ready
from ..net.wire import (INT8_BLOCKS, CloseSession, ErrorReply, Forward, ForwardResult, HopTiming, OpenSession,
                        SessionOpened, WireError, WireLimits, decode, digest, encode, frame_ceiling,
                        hidden_payload, short)
from .batching import BatchSettings, Batcher
from .load import Admission, PassClock
from .metrics import server_metrics
from .next_hops import DialRate, allowed_hop, open_next_hop
from .sessions import OPEN_LEASE_S, ClientLimits, Session, SessionError, SessionKey, SessionTable, keep_big_allocations_mapped

log = logging.getLogger(__name__)

FIRST_FRAME_TIMEOUT_S = 30.0  # a stream with no live session on it waits this long for a frame
NEXT_HOP_LOOKUP_TIMEOUT_S = 10.0
WITHDRAW_TIMEOUT_S = 5.0
FIRST_ANNOUNCE_WAIT_S = 30.0  # "ready" waits this long at most for the first record to be stored
LOAD_CHECK_S = 1.0  # how often the announcer looks whether our session count changed (then re-announces)


class Server:
    def __init__(self, node: P2PNode, model: str, span: Span, *, weights: str, cache_budget_bytes: int,
                 max_length: int, max_block: int, idle_s: float, announce_interval_s: float, record_ttl_s: float,
                 frame_body_timeout_s: float = FRAME_BODY_TIMEOUT_S, batching: BatchSettings = BatchSettings(),
                 client_limits: ClientLimits = ClientLimits(), local_swarm: bool = False):
        self.node, self.model, self.span, self.weights = node, model, span, weights
        self.frame_body_timeout_s = frame_body_timeout_s
        self.local_swarm = local_swarm  # loopback peers are groups of their own, any next-hop address goes
        self.dial_rate = DialRate()
        # in a local swarm every hop computes on this machine's cores: a downstream hop's first block
        # waits for all the upstream compute of a big model there (minutes on a busy CPU), not a lease
        self.table = SessionTable(span, cache_budget_bytes, max_length, idle_s, client_limits, self._reclaimed,
                                  open_lease_s=idle_s if local_swarm else OPEN_LEASE_S)
        keep_big_allocations_mapped()  # a closed session's cache leaves the process, not just the table
        # no stream of this node reads a frame longer than the largest valid block message
        node.max_frame_bytes = min(node.max_frame_bytes, frame_ceiling(span.config.hidden_size, max_block))
        self.limits = WireLimits(hidden_size=span.config.hidden_size, max_block=max_block, max_length=max_length,
                                 max_frame_bytes=node.max_frame_bytes)
        self.announce_interval_s, self.record_ttl_s = announce_interval_s, record_ttl_s
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="span")  # one forward at a time per machine
        self.clock = PassClock(0.0)  # measured at start (serve), then from the passes served (load.py)
        self.admission = Admission(node, model, weights, lambda: len(self.table.sessions))
        self.stopping = False
        self.errors: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self.metrics = server_metrics(self)  # exposed by `dsdnode start --metrics-port`
        # blocks of many sessions per forward
        self.batcher = Batcher(self.compute, batching, self.table.active, self.metrics.batch_size.observe)

    # ---- life cycle ---------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event) -> None:
        self.clock.remeasured(await asyncio.get_running_loop().run_in_executor(self.compute, measure_pass_s, self.span))
        self.node.load_status = self.load_status
        self.node.set_stream_handler(SESSION_PROTOCOL, self.handle_stream)
        announced = asyncio.Event()
        announcer = asyncio.create_task(self._announce_loop(announced))
        reaper = asyncio.create_task(self._expire_loop())
        replicas = asyncio.create_task(self.admission.keep_current())
        # "ready" means clients can find us: our first record is stored (bounded: a DHT that is slow
        # to take it should not keep a working server from starting)
        try:
            await asyncio.wait_for(announced.wait(), FIRST_ANNOUNCE_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("the first announce took over %.0f s: clients may not find this server for a while",
                        FIRST_ANNOUNCE_WAIT_S)
        print_ready(peer_id=self.node.peer_id, addrs=self.node.addrs, model=self.model, start=self.span.start,
                    end=self.span.end, device=self.span.device.type, weights=self.weights,
                    throughput=round(self.clock.throughput, 2), **self.node.reach_fields())
        try:
            await stop.wait()
        finally:
            announcer.cancel()
            reaper.cancel()
            replicas.cancel()
            await self.shutdown()

    async def shutdown(self) -> None:
        """Tell every open session's client (so it fails over at once), withdraw from the DHT, stop.

        Withdrawing is best effort and bounded: storing the record may dial peers that already left,
        and a record we fail to overwrite still expires on its own."""
        self.stopping = True
        try:
            for key in list(self.table.sessions):
                session = self.table.close(key)
                await self._send(session.client, ErrorReply("shutting_down", "server is shutting down",
                                                            session.session_id))
                await close_quietly(session.next_stream)
            try:
                await asyncio.wait_for(self.node.dht.withdraw(self.model), WITHDRAW_TIMEOUT_S)
            except Exception as e:  # asyncio.TimeoutError included
                log.warning("could not withdraw the span record (it expires by itself): %r", e)
        finally:
            self.admission.stop()
            self.batcher.stop()
            self.compute.shutdown(wait=True)
            await self.node.stop()

    def record(self) -> SpanRecord:
        return SpanRecord(self.model, self.span.start, self.span.end, self.node.peer_id, list(self.node.addrs),
                          self.clock.throughput, self.table.free_tokens(), __version__, time.time() + self.record_ttl_s,
                          device=self.span.device.type, weights=self.weights, active_sessions=self.table.active(),
                          queued_positions=self.batcher.queued_positions)

    def load_status(self) -> dict[str, tuple[int, float]]:
        """The load answer (net/peer_info.py): open sessions and the pass time as served lately."""
        return {self.model: (len(self.table.sessions) + self.admission.pending, self.clock.s)}

    async def _announce_loop(self, announced: asyncio.Event) -> None:
        """Announce every announce interval, at once when our addresses change (a relay reserved or
        lost), and within LOAD_CHECK_S when our session count changes (clients spread by it). An
        idle server measures its pass afresh first: the last one served may date from a busy time."""
        while True:
            load = len(self.table.sessions)
            if self.clock.idle() and not self.table.sessions:
                self.clock.remeasured(await asyncio.get_running_loop().run_in_executor(
                    self.compute, measure_pass_s, self.span))
            try:
                await self.node.dht.announce(self.record())
            except Exception as e:  # the DHT may be empty right now; try again next interval
                log.warning("announce failed: %r", e)
            announced.set()
            due = time.monotonic() + self.announce_interval_s
            while time.monotonic() < due and len(self.table.sessions) == load:
                if await self.node.wait_addrs_changed(min(LOAD_CHECK_S, max(0.0, due - time.monotonic()))):
                    break

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.table.idle_s / 2))
            for key in self.table.expired():
                session = self.table.close(key)  # frees the cache now, even if its client's stream stays open
                log.info("session %s idle: closed", short(session.session_id))
                self._tell_closed(session, "session expired (idle)")

    def _reclaimed(self, session: Session) -> None:
        log.info("session %s idle while its memory was needed: closed", session.session_id)
        self._tell_closed(session, "session closed (idle while the server needed its memory)")

    def _tell_closed(self, session: Session, why: str) -> None:
        # in a task: a client that reads nothing must not hold up anyone else
        self._spawn(self._send(session.client, ErrorReply("unknown_session", why, session.session_id)))
        self._spawn(close_quietly(session.next_stream))

    # ---- streams ------------------------------------------------------------------------
    async def handle_stream(self, stream: Stream) -> None:
        """A client stream starts with OpenSession; an upstream hop's push stream with Forward.

        Only session ids are kept here, never a Session: when a session closes or expires its cache
        is freed while this stream may stay open (later frames for it get unknown_session). A stream
        that serves a live session waits for frames as long as the session lives; one that serves
        none (any more) is closed after FIRST_FRAME_TIMEOUT_S without a frame."""
        opened: SessionKey | None = None  # the session this stream opened (its client's stream)
        serving: SessionKey | None = None  # the session this stream last opened or pushed a block into
        try:
            while True:
                live = serving is not None and serving in self.table.sessions
                try:
                    frame = await stream.recv(timeout=self.table.idle_s if live else FIRST_FRAME_TIMEOUT_S,
                                              body_timeout=self.frame_body_timeout_s)
                except TimeoutError:
                    if live:  # blocks may come on another stream, or it just expired: wait on as the state says
                        continue
                    return
                except StreamClosed:
                    return
                self.metrics.bytes_in.inc(len(frame))
                msg = None
                try:
                    try:
                        msg = decode(frame, self.limits)
                    finally:
                        frame = b""  # drop the bytes now: an idle stream must not hold a big bad frame
                    if isinstance(msg, OpenSession) and (opened is None or opened not in self.table.sessions):
                        opened = serving = (await self._open(msg, stream)).key
                    elif isinstance(msg, Forward):
                        serving = await self._forward(msg, stream)
                    elif isinstance(msg, CloseSession):
                        await self._close(self.table.get(msg.session_id, stream).key)  # only its opener may close it
                        return
                    else:
                        raise SessionError("malformed", f"unexpected {type(msg).__name__} on this stream")
                except (WireError, SessionError) as e:
                    self.errors[e.code] = self.errors.get(e.code, 0) + 1
                    # debug, not info: a hostile peer must not be able to fill the operator's disk
                    log.debug("rejected a frame from %s: %s: %s", stream.remote_peer_id, e.code, e.message)
                    await self._send(stream, ErrorReply(e.code, e.message, getattr(msg, "session_id", None),
                                                        retry_after_s=getattr(e, "retry_after_s", None)))
        finally:
            session = self.table.sessions.get(opened) if opened is not None else None
            if session is not None and session.client is stream:
                await self._close(opened)  # the client went away: free its cache

    async def _open(self, msg: OpenSession, stream: Stream) -> Session:
        if self.stopping:
            raise SessionError("shutting_down", "server is shutting down")
        if msg.model != self.model:
            raise SessionError("wrong_span", f"this server serves {self.model!r}, not {short(msg.model)}")
        if msg.weights != self.weights:
            raise SessionError("wrong_weights", f"this server holds weights {self.weights} of {self.model!r}, "
                                                f"the session asks for {short(msg.weights)}")
        if msg.dtype not in HIDDEN_DTYPES:
            raise SessionError("bad_dtype", f"dtype {short(msg.dtype)} is not one of {sorted(HIDDEN_DTYPES)}")
        async with self.admission.admit(msg.start, msg.end):
            group = network_group(stream.remote_ip, stream.remote_peer_id, self.local_swarm)
            next_hop = await self._next_hop(msg, stream.remote_peer_id, group) if msg.next_peer is not None else None
            session = self.table.open(msg.session_id, msg.start, msg.end, msg.max_length, stream, msg.next_peer,
                                      msg.prev_peer, group, msg.next_session_id)
            session.wire = msg.wire
        self.metrics.sessions_opened.inc()
        if next_hop is not None:
            try:
                session.next_stream = await open_next_hop(self.node, next_hop)
            except SessionError:
                self.table.close(session.key)
                raise
            self._spawn(self._relay_errors(session))
        await self._send(stream, SessionOpened(msg.session_id, self.node.peer_id, dtype_name(self.span.dtype)))
        return session

    async def _next_hop(self, msg: OpenSession, opener: str, group: str) -> PeerInfo:
        """Where this hop pushes its output: the addresses of next_peer's own signed, live span record
        of this model, which must continue the session at layer msg.end, and of those only the ones
        this node may dial (next_hops.py: the record's signer chose them), at a rate per opener."""
        self.dial_rate.take(opener, group)
        try:
            rec = await asyncio.wait_for(self.node.dht.lookup(self.model, msg.next_peer), NEXT_HOP_LOOKUP_TIMEOUT_S)
        except Exception as e:  # asyncio.TimeoutError included: no record we can trust
            log.info("looking up next hop %s failed: %r", short(msg.next_peer), e)
            rec = None
        if rec is None:
            raise SessionError("bad_next_hop", f"next peer {short(msg.next_peer)} has no valid, live span record "
                                               f"of {self.model!r} in the DHT")
        if not rec.start <= msg.end < rec.end:
            raise SessionError("bad_next_hop", f"next peer {rec.peer_id} serves layers {rec.start}:{rec.end}, "
                                               f"which do not continue this session at layer {msg.end}")
        if rec.weights != self.weights:
            raise SessionError("bad_next_hop", f"next peer {rec.peer_id} serves other weights of {self.model!r} "
                                               f"({short(rec.weights)}, not {self.weights})")
        return allowed_hop(PeerInfo(rec.peer_id, tuple(rec.addrs)), self.local_swarm)

    async def _close(self, key: SessionKey) -> None:
        session = self.table.close(key)
        if session is not None:
            await close_quietly(session.next_stream)

    async def _forward(self, msg: Forward, came_on: Stream) -> SessionKey:
        """Run a block of a session and push it on (or answer the client). Once the block is known to
        come from where the session's opener said, a failure is told to that client directly, from
        this hop: told to the upstream hop, the client would hear it from the wrong one."""
        session = self.table.get(msg.session_id, came_on, forward=True)
        try:
            await self._run_block(session, msg)
        except SessionError as e:
            self.errors[e.code] = self.errors.get(e.code, 0) + 1
            log.debug("session %s failed a block: %s: %s", short(msg.session_id), e.code, e.message)
            await self._send(session.client, ErrorReply(e.code, e.message, msg.session_id, msg.step_id))
        return session.key

    async def _run_block(self, session: Session, msg: Forward) -> None:
        recv_time = time.time()
        async with session.lock:
            cache = session.cache
            if cache is None:  # closed (expired, shut down) while this block waited for the lock
                raise SessionError("unknown_session", f"no open session {msg.session_id!r} on this server")
            if (msg.hidden.dtype == INT8_BLOCKS) != (session.wire == "int8"):  # no hop turns a lossless
                # session lossy (nor the reverse): every hop of it sends what its client opened it with
                raise SessionError("bad_dtype", f"hidden states as {short(msg.hidden.dtype)} in a session whose "
                                                f"wire is {session.wire!r}")
            incoming = msg.hidden.to_torch()
            hidden = incoming.to(session.span.dtype)
            tree = None if msg.attention_mask is None else msg.attention_mask.to_torch()
            positions = None if msg.positions is None else torch.tensor([msg.positions])
            self.table.admit_block(session, msg.commit_len, hidden.shape[1], self.batcher.queued_by(session.owner))
            block = Block(hidden, cache, msg.commit_len, tree, positions, msg.kept)
            try:  # with the blocks of other sessions queued meanwhile (batching.py); the cache checks
                # commit_len and kept against what it holds (ValueError)
                done = await self.batcher.run(session.span, block, session.owner)
            except ValueError as e:
                raise SessionError("bad_shape", str(e)) from None
            except RuntimeError as e:  # the forward it shared failed (e.g. out of memory): each session hears it
                log.warning("a forward failed: %r", e)
                raise SessionError("internal", f"the forward failed: {short(str(e), 200)}") from None
            del cache  # the session owns its cache: once it closes, the memory must go
            out, compute_s = done.hidden, done.compute_s
            self.metrics.observe_block(hidden.shape[1], compute_s)
            self.clock.served(compute_s, hidden.shape[1], session.span.end - session.span.start,
                              self.span.end - self.span.start)
            timings = msg.timings + [HopTiming(self.node.peer_id, recv_time, compute_s, time.time(), digest(msg.hidden))]
            payload = hidden_payload(out.to(incoming.dtype), session.wire)  # the next hop gets what we got
            result = ForwardResult(msg.session_id, msg.step_id, payload, timings)
            if session.next_stream is not None:
                frame = encode(Forward(session.next_session_id, msg.step_id, msg.commit_len, payload,
                                       msg.attention_mask, timings, msg.positions, msg.kept))
                try:
                    await session.next_stream.send(frame)
                    self.metrics.bytes_out.inc(len(frame))
                except (StreamClosed, ConnectionError) as e:
                    raise SessionError("bad_next_hop",
                                       f"next hop {session.next_peer} unreachable: {short(str(e), 200)}") from None
                # every hop sends its client a copy of its output (the client may have another server
                # recompute it: an audit the hop cannot tell from any other block); off the push path
                self._spawn(self._send(session.client, result))
            else:
                await self._send(session.client, result)

    async def _relay_errors(self, session: Session) -> None:
        """What the next hop answers on our push stream (it could not match a block to a session of
        its client) goes to our client as a fault of that next hop."""
        while True:
            try:
                msg = decode(await session.next_stream.recv(), self.limits)
            except (StreamClosed, WireError, TimeoutError):
                return
            if isinstance(msg, ErrorReply):
                await self._send(session.client, ErrorReply(
                    "bad_next_hop", short(f"next hop {session.next_peer} answered {msg.code}: {msg.message}", 400),
                    session.session_id, msg.step_id))

    # ---- helpers ------------------------------------------------------------------------
    async def _send(self, stream: Stream, msg) -> None:
        try:
            frame = encode(msg)
            await stream.send(frame)
            self.metrics.bytes_out.inc(len(frame))
        except Exception as e:  # the peer is gone; nothing else to tell it
            log.debug("could not send %s to %s: %r", type(msg).__name__, stream.remote_peer_id, e)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def measure_pass_s(span: Span, repeats: int = 5) -> float:
    """Seconds of a one-token step through the span (what decoding costs), for routing."""
    cache = span.new_cache(64)
    hidden = torch.zeros(1, 1, span.config.hidden_size, dtype=span.dtype, device=span.device)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        span.forward(hidden, cache, i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])
