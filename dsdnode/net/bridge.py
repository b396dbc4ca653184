"""Bridge from asyncio callers to the trio thread that runs the libp2p host.

py-libp2p 0.8 is trio-only; the daemon and client run on asyncio (uvloop). `Bridge.call`
runs one whole operation (a framed send, a framed receive, a stream open, a DHT query) as
a single trio task and hands the outcome back with `loop.call_soon_threadsafe`: one
crossing each way (a no-op round trip measures ~0.05 ms here). Cancelling the asyncio
caller cancels the trio task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..errors import PeerError


class StreamClosed(PeerError, ConnectionError):
    """The stream ended (EOF, reset, local close, or the peer/connection died)."""


class NodeStopped(StreamClosed):
    """The local node was stopped (or is not running) while the operation was pending."""


class Bridge:
    """Runs trio coroutines on the host thread on behalf of asyncio callers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run `await fn(*args)` as one trio task; asyncio cancellation cancels it there."""
        if self.token is None:
            raise NodeStopped("node is not running")
        fut = self.loop.create_future()
        scopes: list[trio.CancelScope] = []

        def spawn() -> None:
            if self.nursery is None:
                self.deliver(fut, None, NodeStopped("node stopped"))
                return
            scopes.append(trio.CancelScope())
            self.nursery.start_soon(self._run, fut, scopes[0], fn, args)

        self.notify(spawn, fut)
        try:
            return await fut
        except asyncio.CancelledError:
            # Runs after spawn() (run_sync_soon is FIFO); a scope cancelled before the
            # task enters it cancels the task as soon as it starts.
            self.notify(lambda: [s.cancel() for s in scopes])
            raise

    def notify(self, fn: Callable[[], Any], fut: asyncio.Future | None = None) -> None:
        """Schedule a plain callback on the trio thread (no-op once the thread ended)."""
        try:
            self.token.run_sync_soon(fn)  # type: ignore[union-attr]
        except trio.RunFinishedError:
            if fut is not None and not fut.done():
                fut.set_exception(NodeStopped("node stopped"))

    async def _run(self, fut: asyncio.Future, scope: trio.CancelScope, fn: Callable, args: tuple) -> None:
        result: Any = None
        error: BaseException | None = NodeStopped("node stopped")
        try:
            with scope:
                try:
                    result, error = await fn(*args), None
                except Exception as exc:
                    error = exc
        finally:
            try:
                self.loop.call_soon_threadsafe(self.deliver, fut, result, error)
            except RuntimeError:  # the asyncio loop is closed: nobody is waiting
                pass

    @staticmethod
    def deliver(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
