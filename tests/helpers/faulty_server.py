"""A dsdnode server with an injected fault, for tests only (never a product flag).

Run as `python tests/helpers/faulty_server.py FAULT start ARGS...`: the same daemon as
`dsdnode start ARGS...`, with the span's forward (or its weights) changed so that its output is wrong:
  short      one position fewer than it was given (a reply the client cannot use)
  noise      Gaussian noise (std 1) added to every output (a plausible but wrong answer)
  sometimes  noise on 1 block in 20 (every 20th block this process computes), right otherwise
  scaled     every output x 1.01 (a slight, systematic error)
  weights    every weight of the span multiplied by (1 + 0.01 N(0, 1)) at load (other weights than
             it announces, like a server of a fine-tuned or corrupted copy)
  slowwalk   right outputs, but from the 11th small block on each one waits twice as long as the last
             (100 ms, 200 ms, ...): a hop that slow-walks the client under a deadline that follows it
  badnext    refuses every session that names a next hop with bad_next_hop, blaming that (honest) hop
  claim      announces a throughput of 1e6 tokens/s, whatever it measured (a Sybil's claim)
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
FAULTS = (*OUTPUT_FAULTS, "weights", "slowwalk", "badnext", "claim")
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
                time.sleep(min(0.1 * 2 ** (n - 11), 60.0))
            return out

        Span.forward = slow_forward
        return
    if fault == "badnext":
        from dsdnode.server import daemon

        async def next_hop(self, msg):
            raise daemon.SessionError("bad_next_hop", f"cannot reach next hop {msg.next_peer}")

        daemon.Server._next_hop = next_hop
        return
    if fault == "claim":
        from dsdnode.server import daemon
        daemon.measure_throughput = lambda span, repeats=5: 1e6
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


if __name__ == "__main__":
    inject(sys.argv[1])
    from dsdnode.cli import main

    sys.exit(main(sys.argv[2:], prog_name="dsdnode"))
