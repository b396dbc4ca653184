"""Framed, full-duplex streams over libp2p (used from asyncio through the bridge).

A frame is a 4-byte big-endian length, then the payload; framing stays on the trio side.
Each stream has one reader task that moves bytes from the muxer into a bounded buffer, so
`recv(timeout=...)` can give up at any point without losing bytes (yamux's own read is
not cancel-safe) and a dead peer surfaces as StreamClosed as soon as the connection drops.
Emulated links (latency.py): a frame waits in the sender's task for the node's uplink to carry its
bytes, then is delivered after the link's one-way delay by a task of its own, in send order, so the
sender is free meanwhile and other streams keep flowing.

A frame, once begun, must be finished: after its first byte arrives the rest must follow within
`body_timeout` (plus time for its size at MIN_BODY_RATE), or the stream is reset. An idle stream
between frames waits as long as its reader allows; a peer that starts a frame and stalls cannot
hold a server's buffer and handler forever.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamEOF

from dsdnode.net.bridge import Bridge, StreamClosed
from dsdnode.net.latency import LinkEmulator
from dsdnode.errors import PeerError

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
READ_AHEAD = 1 << 20  # bytes the reader may buffer beyond what the current recv needs
DEFAULT_SEND_TIMEOUT = 60.0  # a peer that reads nothing for this long gets its stream reset
FRAME_BODY_TIMEOUT_S = 30.0  # from a frame's first byte to its last, plus its size at MIN_BODY_RATE
MIN_BODY_RATE = 1 << 20  # bytes/s: a slower sender of a started frame gets its stream reset


def raw_remote_ip(raw: Any) -> str | None:
    """The IP address a raw libp2p stream's connection comes from, as the kernel saw it (a relayed
    one: the relay's); None if the transport does not say."""
    try:
        remote = raw.get_remote_address()
    except Exception:  # a transport without addresses: the caller treats None as unknown
        return None
    return str(remote[0]) if remote else None


class FrameTooLarge(PeerError, ValueError):
    """A frame longer than max_frame_bytes was sent or announced (the stream is reset)."""


class Stream:
    """A full-duplex framed stream; methods may be used concurrently from several tasks."""

    def __init__(self, raw: Any, bridge: Bridge, link: LinkEmulator | None, max_frame_bytes: int,
                 max_send_bytes: int | None = None) -> None:
        # Created on the trio thread (trio primitives below belong to that run).
        self._bridge = bridge
        self._link = link if link is not None and link.settings.emulates else None
        self._delivered: trio.Event | None = None  # set once the last frame in emulated flight is written
        self._deliver_at = 0.0  # trio time the last frame in flight is due (frames never overtake)
        self._max_frame_bytes = max_frame_bytes
        # what we send may be longer than what we read: a directory peer reads requests of a few KiB
        # and answers with a whole key's records
        self._max_send_bytes = max_send_bytes or max_frame_bytes
        self._raw = raw
        self.remote_peer_id: str = raw.muxed_conn.peer_id.to_base58()
        self.remote_ip: str | None = raw_remote_ip(raw)  # as the kernel saw it (a relayed one: the relay's)
        self._buf = bytearray()
        self._need = 0  # bytes the pending recv waits for
        self._error: str | None = None  # why no more bytes will arrive
        self._closed = False
        self._data_ev = trio.Event()
        self._space_ev = trio.Event()
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self._reader_scope = trio.CancelScope()
        bridge.nursery.start_soon(self._reader)  # type: ignore[union-attr]

    # ---- asyncio API -------------------------------------------------------------------
    async def send(self, frame: bytes, timeout: float | None = DEFAULT_SEND_TIMEOUT) -> None:
        """Write one frame (with emulated links: once the uplink carried it; it arrives after the
        link's delay, see the module doc); resets the stream on timeout."""
        await self._bridge.call(self.trio_send, frame, timeout)

    async def recv(self, timeout: float | None = None, body_timeout: float = FRAME_BODY_TIMEOUT_S) -> bytes:
        """Next frame. `timeout` bounds the wait for a frame to begin: TimeoutError leaves the stream
        usable. A frame begun but not finished within body_timeout (+ size / MIN_BODY_RATE) resets
        the stream (StreamClosed); StreamClosed/FrameTooLarge end it."""
        return await self._bridge.call(self.trio_recv, timeout, body_timeout)

    async def close(self) -> None:
        """Half-close our side (the peer's recv sees StreamClosed) and stop reading."""
        await self._bridge.call(self.trio_close)

    # ---- trio side (trio_* run on the host thread; other net modules call them there) ----
    async def trio_send(self, frame: bytes, timeout: float | None = DEFAULT_SEND_TIMEOUT) -> None:
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise TypeError(f"frame must be bytes, got {type(frame).__name__}")
        size = len(frame)
        if size > self._max_send_bytes:
            raise FrameTooLarge(f"frame of {size} bytes exceeds the send limit of {self._max_send_bytes} bytes")
        if self._closed:
            raise StreamClosed(f"stream to {self.remote_peer_id} is closed")
        link = self._link
        if link is not None:
            wait = link.uplink_wait_s(4 + size, trio.current_time())
            if wait > 0:
                await trio.sleep(wait)
            self._deliver_at = max(self._deliver_at, trio.current_time() + link.delay_s(self.remote_peer_id))
            previous, self._delivered = self._delivered, trio.Event()
            self._bridge.nursery.start_soon(self._t_deliver, frame, self._deliver_at, previous, self._delivered,
                                            timeout)  # type: ignore[union-attr]
            return
        await self._t_write(frame, timeout)

    async def _t_deliver(self, frame: bytes, at: float, previous: trio.Event | None, done: trio.Event,
                         timeout: float | None) -> None:
        """Write a frame in emulated flight when it is due, after the frames sent before it."""
        try:
            await trio.sleep_until(at)
            if previous is not None:
                await previous.wait()
            if not self._closed:
                await self._t_write(frame, timeout)
        except StreamClosed as e:
            log.debug("%s", e)
        finally:
            done.set()

    async def _t_write(self, frame: bytes, timeout: float | None) -> None:
        size = len(frame)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            async with self._send_lock:
                try:
                    await self._raw.write(size.to_bytes(4, "big") + frame)
                    return
                except Exception as exc:
                    error = exc
            await self._t_reset()
            raise StreamClosed(f"send to {self.remote_peer_id} failed: {error!r}") from None
        await self._t_reset()
        raise StreamClosed(f"send to {self.remote_peer_id} timed out after {timeout}s; stream reset")

    async def trio_recv(self, timeout: float | None = None, body_timeout: float = FRAME_BODY_TIMEOUT_S) -> bytes:
        async with self._recv_lock:
            with trio.move_on_after(math.inf if timeout is None else timeout) as idle:
                await self._fill(1)
            if idle.cancelled_caught:
                raise TimeoutError(f"no frame from {self.remote_peer_id} within {timeout}s")
            with trio.move_on_after(body_timeout) as body:
                await self._fill(4)
                size = int.from_bytes(self._buf[:4], "big")
                if size > self._max_frame_bytes:
                    await self._t_reset()
                    raise FrameTooLarge(f"peer {self.remote_peer_id} announced a frame of {size} bytes "
                                        f"> max_frame_bytes {self._max_frame_bytes}; stream reset")
                body.deadline += size / MIN_BODY_RATE
                await self._fill(4 + size)
                with memoryview(self._buf) as view:  # one copy of the frame, not two
                    frame = bytes(view[4 : 4 + size])
                del self._buf[: 4 + size]
                self._need = 0
                self._wake_reader()
                return frame
            got = len(self._buf)
            await self._t_reset()
            raise StreamClosed(f"peer {self.remote_peer_id} began a frame but sent only {got} bytes of it "
                               f"within {body_timeout:.0f}s (+ its size at {MIN_BODY_RATE >> 20} MiB/s); stream reset")

    async def _fill(self, n: int) -> None:
        """Wait until the buffer holds n bytes (cancel-safe: only waits on events)."""
        if n > self._need:
            self._need = n
            self._wake_reader()
        while len(self._buf) < n:
            if self._closed and self._error is None:
                raise StreamClosed(f"stream to {self.remote_peer_id} is closed")
            if self._error is not None:
                raise StreamClosed(f"stream from {self.remote_peer_id} ended: {self._error}")
            event = self._data_ev
            await event.wait()

    async def _reader(self) -> None:
        with self._reader_scope:
            try:
                while True:
                    while len(self._buf) >= self._need + READ_AHEAD:
                        event = self._space_ev
                        await event.wait()
                    chunk = await self._raw.read(READ_CHUNK)
                    if not chunk:
                        raise EOFError("end of stream")
                    self._buf += chunk
                    self._data_ev.set()
                    self._data_ev = trio.Event()
            except Exception as exc:
                self._error = "EOF" if isinstance(exc, (StreamEOF, EOFError)) else repr(exc)
        if self._error is None:
            self._error = "closed locally"
        self._data_ev.set()

    def _wake_reader(self) -> None:
        self._space_ev.set()
        self._space_ev = trio.Event()

    async def trio_close(self) -> None:
        if self._closed:
            return
        if self._delivered is not None:  # the frames in emulated flight go first (a goodbye among them)
            with trio.move_on_after(DEFAULT_SEND_TIMEOUT):
                await self._delivered.wait()
        self._closed = True
        self._reader_scope.cancel()
        try:
            await self._raw.close()
        except Exception as exc:  # already reset by the peer or the connection is gone
            log.debug("closing stream to %s: %r", self.remote_peer_id, exc)

    async def _t_reset(self) -> None:
        self._closed = True
        self._buf.clear()
        self._reader_scope.cancel()
        try:
            await self._raw.reset()
        except Exception as exc:
            log.debug("resetting stream to %s: %r", self.remote_peer_id, exc)
        drop_muxer_buffer(self._raw)


def drop_muxer_buffer(raw) -> None:
    """Forget a reset stream in py-libp2p's yamux at once, its unread bytes included.

    yamux 0.8.1 keeps a reset stream whose receive buffer is not empty for 60 s (its stale-stream
    grace) and keeps appending what the peer still sends to it; a stream reset at an oversized length
    prefix holds up to a window (256 KiB) of the refused body. A peer that sends one oversized frame
    per stream made a server hold about its own bandwidth x 60 s: +136 MB over a 100k-frame fuzz with
    5,009 such resets. Once the entry is gone, yamux drops data for the stream id (and answers nothing)."""
    muxed = getattr(raw, "muxed_stream", None)
    conn, sid = getattr(muxed, "conn", None), getattr(muxed, "stream_id", None)
    if conn is None or sid is None or getattr(conn, "streams", {}).get(sid) is not muxed:
        return
    conn.streams.pop(sid, None)
    conn.stream_buffers.pop(sid, None)
    event = conn.stream_events.pop(sid, None)
    if event is not None:
        event.set()  # a reader still waiting on it sees the stream closed


async def close_quietly(stream: Stream | None) -> None:
    """Close a stream whose peer may already be gone: cleanup, where a failure tells nothing new."""
    if stream is None:
        return
    try:
        await stream.close()
    except Exception as exc:
        log.debug("closing stream to %s: %r", stream.remote_peer_id, exc)
