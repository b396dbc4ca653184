"""`dsdnode start`: serve a span of a model's layers to the swarm.

Life cycle: join the DHT -> (with --layers auto, look at who serves what) -> load the span ->
measure its speed -> announce a signed record every announce interval -> serve sessions ->
on SIGTERM withdraw, fail open sessions with "shutting_down", stop.

A session's client opens one stream to every hop of its chain. Blocks enter at the first hop on
that stream; each hop pushes its output straight to the next hop over a stream of its own, and the
last hop answers on its client stream. Errors at any hop go back on that hop's client stream, so
the client always hears about a failure from the hop where it happened."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import __version__
from ..models.span import Span
from ..net.dht import SpanRecord
from ..net.p2p import P2PNode, PeerInfo, Stream, StreamClosed
from ..net.stream import close_quietly
from ..net.wire import (CloseSession, ErrorReply, Forward, ForwardResult, HopTiming, OpenSession, SessionOpened,
                        TensorPayload, WireError, WireLimits, decode, encode)
from .metrics import server_metrics
from .sessions import Session, SessionError, SessionTable

log = logging.getLogger(__name__)

PROTOCOL = "/dsdnode/session/1.0.0"
FIRST_FRAME_TIMEOUT_S = 30.0
WITHDRAW_TIMEOUT_S = 5.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Server:
    def __init__(self, node: P2PNode, model: str, span: Span, *, cache_budget_bytes: int, max_length: int,
                 max_block: int, idle_s: float, announce_interval_s: float, record_ttl_s: float):
        self.node, self.model, self.span = node, model, span
        self.table = SessionTable(span, cache_budget_bytes, max_length, idle_s)
        self.limits = WireLimits(hidden_size=span.config.hidden_size, max_block=max_block, max_length=max_length,
                                 max_frame_bytes=node.max_frame_bytes)
        self.announce_interval_s, self.record_ttl_s = announce_interval_s, record_ttl_s
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="span")  # one block at a time per machine
        self.throughput = 0.0
        self.stopping = False
        self.errors: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self.metrics = server_metrics(self)  # exposed by `dsdnode start --metrics-port`

    # ---- life cycle ---------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event) -> None:
        self.throughput = await asyncio.get_running_loop().run_in_executor(self.compute, measure_throughput, self.span)
        self.node.set_stream_handler(PROTOCOL, self.handle_stream)
        announcer = asyncio.create_task(self._announce_loop())
        reaper = asyncio.create_task(self._expire_loop())
        print(json.dumps({"event": "ready", "peer_id": self.node.peer_id, "addrs": self.node.addrs, "model": self.model,
                          "start": self.span.start, "end": self.span.end, "device": self.span.device.type,
                          "throughput": round(self.throughput, 2)}), flush=True)
        try:
            await stop.wait()
        finally:
            announcer.cancel()
            reaper.cancel()
            await self.shutdown()

    async def shutdown(self) -> None:
        """Tell every open session's client (so it fails over at once), withdraw from the DHT, stop.

        Withdrawing is best effort and bounded: storing the record may dial peers that already left,
        and a record we fail to overwrite still expires on its own."""
        self.stopping = True
        try:
            for sid in list(self.table.sessions):
                session = self.table.close(sid)
                await self._send(session.client, ErrorReply("shutting_down", "server is shutting down", sid))
                await close_quietly(session.next_stream)
            try:
                await asyncio.wait_for(self.node.dht.withdraw(self.model), WITHDRAW_TIMEOUT_S)
            except Exception as e:  # asyncio.TimeoutError included
                log.warning("could not withdraw the span record (it expires by itself): %r", e)
        finally:
            self.compute.shutdown(wait=True)
            await self.node.stop()

    def record(self) -> SpanRecord:
        return SpanRecord(self.model, self.span.start, self.span.end, self.node.peer_id, list(self.node.addrs),
                          self.throughput, self.table.free_tokens(), __version__, time.time() + self.record_ttl_s)

    async def _announce_loop(self) -> None:
        while True:
            try:
                await self.node.dht.announce(self.record())
            except Exception as e:  # the DHT may be empty right now; try again next interval
                log.warning("announce failed: %r", e)
            await asyncio.sleep(self.announce_interval_s)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.table.idle_s / 2))
            for sid in self.table.expired():
                session = self.table.close(sid)
                log.info("session %s idle for %.0f s: closed", sid, self.table.idle_s)
                await self._send(session.client, ErrorReply("unknown_session", "session expired (idle)", sid))
                await close_quietly(session.next_stream)

    # ---- streams ------------------------------------------------------------------------
    async def handle_stream(self, stream: Stream) -> None:
        """A client stream starts with OpenSession; an upstream hop's push stream with Forward."""
        session: Session | None = None
        try:
            while True:
                try:
                    frame = await stream.recv(timeout=None if session else FIRST_FRAME_TIMEOUT_S)
                except (StreamClosed, TimeoutError):
                    return
                self.metrics.bytes_in.inc(len(frame))
                msg = None
                try:
                    msg = decode(frame, self.limits)
                    if isinstance(msg, OpenSession) and session is None:
                        session = await self._open(msg, stream)
                    elif isinstance(msg, Forward):
                        await self._forward(msg, stream)
                    elif isinstance(msg, CloseSession):
                        await self._close(msg.session_id)
                        return
                    else:
                        raise SessionError("malformed", f"unexpected {type(msg).__name__} on this stream")
                except (WireError, SessionError) as e:
                    self.errors[e.code] = self.errors.get(e.code, 0) + 1
                    log.info("rejected a frame from %s: %s: %s", stream.remote_peer_id, e.code, e.message)
                    await self._send(stream, ErrorReply(e.code, e.message, getattr(msg, "session_id", None)))
        finally:
            if session is not None and self.table.sessions.get(session.session_id) is session:
                await self._close(session.session_id)  # the client went away: free its cache

    async def _open(self, msg: OpenSession, stream: Stream) -> Session:
        if self.stopping:
            raise SessionError("shutting_down", "server is shutting down")
        if msg.model != self.model:
            raise SessionError("wrong_span", f"this server serves {self.model!r}, not {msg.model!r}")
        if msg.dtype not in DTYPES:
            raise SessionError("bad_dtype", f"dtype {msg.dtype!r} is not one of {sorted(DTYPES)}")
        session = self.table.open(msg.session_id, msg.start, msg.end, msg.max_length, stream, msg.next_hop)
        self.metrics.sessions_opened.inc()
        if msg.next_hop is not None:
            try:
                peer = PeerInfo(msg.next_hop.peer_id, tuple(msg.next_hop.addrs))
                session.next_stream = await self.node.open_stream(peer, PROTOCOL)
            except Exception as e:
                self.table.close(msg.session_id)
                raise SessionError("internal", f"cannot reach next hop {msg.next_hop.peer_id}: {e}") from None
            self._spawn(self._relay_errors(session))
        await self._send(stream, SessionOpened(msg.session_id, self.node.peer_id))
        return session

    async def _close(self, session_id: str) -> None:
        session = self.table.close(session_id)
        if session is not None:
            await close_quietly(session.next_stream)

    async def _forward(self, msg: Forward, came_on: Stream) -> None:
        session = self.table.get(msg.session_id)
        recv_time = time.time()
        async with session.lock:
            incoming = msg.hidden.to_torch()
            hidden = incoming.to(session.span.dtype)
            tree = None
            if msg.attention_mask is not None:
                mask = msg.attention_mask.to_torch()
                if not bool(mask[:, :msg.commit_len].all()):
                    raise SessionError("bad_shape", "attention_mask must let every position see the committed prefix")
                tree = mask[:, msg.commit_len:]
            if msg.commit_len > session.cache.length:
                raise SessionError("bad_shape", f"commit_len {msg.commit_len} > {session.cache.length} cached positions")
            t0 = time.perf_counter()
            try:
                out = await asyncio.get_running_loop().run_in_executor(
                    self.compute, session.span.forward, hidden, session.cache, msg.commit_len, tree)
            except ValueError as e:
                raise SessionError("bad_shape", str(e)) from None
            compute_s = time.perf_counter() - t0
            session.tokens_served += hidden.shape[1]
            self.metrics.observe_block(hidden.shape[1], compute_s)
            timings = msg.timings + [HopTiming(self.node.peer_id, recv_time, compute_s, time.time())]
            payload = TensorPayload.from_torch(out.to(incoming.dtype))  # the next hop gets what we got
            if session.next_stream is not None:
                frame = encode(Forward(msg.session_id, msg.step_id, msg.commit_len, payload, msg.attention_mask, timings))
                try:
                    await session.next_stream.send(frame)
                    self.metrics.bytes_out.inc(len(frame))
                except (StreamClosed, ConnectionError) as e:
                    raise SessionError("internal", f"next hop {session.next_hop.peer_id} unreachable: {e}") from None
            else:
                await self._send(session.client, ForwardResult(msg.session_id, msg.step_id, payload, timings))

    async def _relay_errors(self, session: Session) -> None:
        """Errors the next hop sends back on our push stream go to our client (it may not hear otherwise)."""
        while True:
            try:
                msg = decode(await session.next_stream.recv(), self.limits)
            except (StreamClosed, WireError, TimeoutError):
                return
            if isinstance(msg, ErrorReply):
                await self._send(session.client, msg)

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


def measure_throughput(span: Span, repeats: int = 5) -> float:
    """Tokens per second of a one-token step through the span (what decoding costs), for routing."""
    cache = span.new_cache(64)
    hidden = torch.zeros(1, 1, span.config.hidden_size, dtype=span.dtype, device=span.device)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        span.forward(hidden, cache, i)
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times[1:])


PARENT_POLL_S = 1.0
_WATCHES: set[asyncio.Task] = set()


def install_stop_triggers(stop: asyncio.Event, parent_pid: int = 0) -> None:
    """Set `stop` on SIGTERM/SIGINT and, if parent_pid is set, once that process is gone.

    The parent watch is for launchers (tests, `dsdnode bench`, the demo) that start nodes in
    their own sessions: if the launcher is SIGKILLed it cannot signal them, and without the
    watch they would serve forever."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if parent_pid:
        task = loop.create_task(_stop_when_gone(parent_pid, stop))
        _WATCHES.add(task)  # the loop holds tasks only weakly
        task.add_done_callback(_WATCHES.discard)


async def _stop_when_gone(pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.warning("parent process %d is gone: shutting down", pid)
            stop.set()
            return
        except PermissionError:
            pass  # it exists, owned by someone else
        await asyncio.sleep(PARENT_POLL_S)
