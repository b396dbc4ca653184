"""A dsdnode server with an injected fault, for tests only (never a product flag).

Run as `python tests/helpers/faulty_server.py FAULT start ARGS...`: the same daemon as
`dsdnode start ARGS...`, with the span's forward wrapped so that its output is wrong:
  short  one position fewer than it was given (a reply the client cannot use)
  noise  Gaussian noise added to every output (a plausible but wrong answer)
"""

from __future__ import annotations

import os
import sys

import torch

FAULTS = {
    "short": lambda out: out[:, :-1],
    "noise": lambda out: out + torch.randn_like(out),
}
LAUNCHER = [sys.executable, os.path.abspath(__file__)]


def inject(fault: str) -> None:
    from dsdnode.models.span import Span

    honest, corrupt = Span.forward, FAULTS[fault]

    def forward(self, hidden, cache, commit_len, *args, **kwargs):
        return corrupt(honest(self, hidden, cache, commit_len, *args, **kwargs))

    Span.forward = forward


if __name__ == "__main__":
    inject(sys.argv[1])
    from dsdnode.cli import main

    sys.exit(main(sys.argv[2:], prog_name="dsdnode"))
