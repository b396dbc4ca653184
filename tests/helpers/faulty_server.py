"""A dsdnode server with an injected fault, for tests only (never a product flag).

Run as `python tests/helpers/faulty_server.py FAULT start ARGS...`: the same daemon as
`dsdnode start ARGS...`, with the span's forward (or its weights) changed so that its output is wrong:
  short      one position fewer than it was given (a reply the client cannot use)
  noise      Gaussian noise (std 1) added to every output (a plausible but wrong answer)
  sometimes  noise on 1 block in 20 (every 20th block this process computes), right otherwise
  scaled     every output x 1.01 (a slight, systematic error)
  weights    every weight of the span multiplied by (1 + 0.01 N(0, 1)) at load (other weights than
             it announces, like a server of a fine-tuned or corrupted copy)
  slowwalk   right outputs, but from the 11th small block on (the 5th of its first session) each one
             waits twice as long as the last (400 ms, 800 ms, ...): a hop that slow-walks the client
             under a deadline that follows it
  badnext    refuses every session that names a next hop with bad_next_hop, blaming that (honest) hop
  stall      right outputs and a copy to the client, but from its 5th push of a small block on it
             pushes nothing to its next hop (answering pings all along): the pass stalls at the
             (honest) next hop, which looks hung
  latepush   right outputs and a prompt copy to the client, but from its 5th push of a small block on
             each push to its next hop is held back twice as long as the last (400 ms, 800 ms, ...):
             the (honest) next hop looks slow
  claim      announces a throughput of 1e6 tokens/s, whatever it measured (a Sybil's claim)
  observe    honest, but writes what it sees of every session to its log, one `OBSERVED {json}` line
             per OpenSession and per block: the opener's peer id, the OpenSession's fields, each
             block's step, commit_len, size, tree, kept path, upstream timings and which peer sent it,
             and when it was done with each block (what an auditor could use to tell a shadow session
             from a real one)
Flavours combine with "+" (e.g. noise+claim).
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import torch

_blocks = itertools.count(1)
OUTPUT_FAULTS = {
    "short": lambda out: out[:, :-1],
    "noise": lambda out: out + torch.randn_like(out),
    "sometimes": lambda out: out + torch.randn_like(out) if next(_blocks) % 20 == 0 else out,
    "scaled": lambda out: out * 1.01,
}
FAULTS = (*OUTPUT_FAULTS, "weights", "slowwalk", "badnext", "stall", "latepush", "claim", "observe")
LAUNCHER = [sys.executable, os.path.abspath(__file__)]


def inject(faults: str) -> None:
    for fault in faults.split("+"):
        _inject(fault)


def _inject(fault: str) -> None:
    from dsdnode.models.span import Span

    if fault == "slowwalk":
        honest_forward, decode_blocks = Span.forward, itertools.count(1)

        def slow_forward(self, hidden, *args, **kwargs):
            out = honest_forward(self, hidden, *args, **kwargs)
            if hidden.shape[1] <= 16 and (n := next(decode_blocks)) > 10:  # 6 blocks measure its throughput
                time.sleep(min(0.4 * 2 ** (n - 11), 60.0))
            return out

        Span.forward = slow_forward
        return
    if fault == "badnext":
        from dsdnode.server import daemon

        async def next_hop(self, msg, *args):
            raise daemon.SessionError("bad_next_hop", f"cannot reach next hop {msg.next_peer}")

        daemon.Server._next_hop = next_hop
        return
    if fault in ("stall", "latepush"):
        _hold_pushes(fault)
        return
    if fault == "observe":
        _observe()
        return
    if fault == "claim":
        from dsdnode.server import daemon, load
        load.PassClock.throughput = property(lambda self: 1e6)  # in its record, whatever its passes take
        daemon.Server.load_status = lambda self: {self.model: (0, 1e-6)}  # and in its load answer
        return
    if fault == "weights":
        honest_load = Span.load.__func__

        def load(cls, *args, **kwargs):
            span = honest_load(cls, *args, **kwargs)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in span.parameters():
                    p.mul_(1 + 0.01 * torch.randn(p.shape, generator=gen).to(p.dtype))
            return span

        Span.load = classmethod(load)
        return
    honest, corrupt = Span.forward, OUTPUT_FAULTS[fault]

    def forward(self, hidden, cache, commit_len, *args, **kwargs):
        return corrupt(honest(self, hidden, cache, commit_len, *args, **kwargs))

    Span.forward = forward


def _hold_pushes(fault: str) -> None:
    """Wrap every stream this server pushes on: from the 5th small block on, withhold each push
    (stall) or send it later and later (latepush), while the daemon goes on as if it had been sent
    (so its copy to the client goes at once)."""
    import asyncio

    from dsdnode.net.wire import Forward, WireLimits, decode
    from dsdnode.server import daemon

    pushes = itertools.count(1)

    class Held:
        def __init__(self, stream):
            self._stream, self._last = stream, None

        def __getattr__(self, name):
            return getattr(self._stream, name)

        async def send(self, frame: bytes) -> None:
            msg = decode(frame, WireLimits())
            if not isinstance(msg, Forward) or msg.hidden.shape[1] > 16 or (n := next(pushes)) < 5:
                return await self._stream.send(frame)
            if fault == "stall":
                return
            delay, before = min(0.4 * 2 ** (n - 5), 60.0), self._last

            async def late() -> None:
                if before is not None:
                    await before  # pushes stay in order
                await asyncio.sleep(delay)
                await self._stream.send(frame)
            self._last = asyncio.ensure_future(late())

    honest_open = daemon.open_next_hop

    async def open_next_hop(*args, **kwargs):
        return Held(await honest_open(*args, **kwargs))

    daemon.open_next_hop = open_next_hop


def _observe() -> None:
    import dataclasses
    import json

    from dsdnode.server import daemon

    def note(**fields) -> None:
        print("OBSERVED " + json.dumps({"t": time.time(), **fields}), file=sys.stderr, flush=True)

    honest_open, honest_forward = daemon.Server._open, daemon.Server._forward

    async def open_(self, msg, stream):
        note(kind="open", opener=stream.remote_peer_id, **dataclasses.asdict(msg))
        return await honest_open(self, msg, stream)

    async def forward(self, msg, came_on):
        note(kind="block", sender=came_on.remote_peer_id, session_id=msg.session_id, step=msg.step_id,
             commit_len=msg.commit_len, size=list(msg.hidden.shape), tree=msg.attention_mask is not None,
             positions=msg.positions, kept=msg.kept, upstream=[t.peer_id for t in msg.timings])
        try:
            return await honest_forward(self, msg, came_on)
        finally:  # computed and pushed on (or answered): when a client may send its next block
            note(kind="done", session_id=msg.session_id, step=msg.step_id)

    daemon.Server._open, daemon.Server._forward = open_, forward


if __name__ == "__main__":
    inject(sys.argv[1])
    from dsdnode.cli import main

    sys.exit(main(sys.argv[2:], prog_name="dsdnode"))
