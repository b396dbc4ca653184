"""Benchmark modes: what each name means, and the generation settings it runs with.

Every swarm mode is greedy (temperature 0), so all but the `-av` modes (adaptive verification,
lossy by design) must reproduce the `ar-push` baseline token for token. `dsd-tree` lets the
controller choose token trees up to TREE_WIDTH wide (chains included) and adds prompt-lookup
branches. Swarm modes audit the servers' work at the default rate (client/audit.py) except
`dsd-auto-noaudit`, which measures what auditing costs. `dsd-tree-ssd` is `dsd-tree` drafting
ahead for up to its two likeliest rejections too, not only for full acceptance, in the rounds where
the measured odds say it pays (what speculative speculative decoding, speculative/predraft.py, gains
or costs); `dsd-tree-ssd-always` drafts ahead for both in every round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..client.service import GenerateOptions
from ..errors import BadValue
from ..speculative.predraft import PredraftSettings

BASELINE = "ar-push"
RELAY_BASELINE = "ar-relay"  # the client-relayed (Petals-style) loop: results.md also gives speedups over it
DEFAULT_MODES = ("ar-push", "ar-relay", "dsd-k2", "dsd-k4", "dsd-k8", "dsd-auto", "dsd-auto-av", "dsd-tree",
                 "dsd-tree-av", "hf-assisted")
TREE_WIDTH = 4  # widest tree of the dsd-tree modes (a block of 1 + 4 x 8 drafts + 8 lookups fits max_block 64)
_FIXED_K = re.compile(r"dsd-k(\d+)$")


@dataclass(frozen=True)
class Mode:
    """kind: "swarm" (the client here, servers in processes) or "hf" (one process, no network).
    relay: route the block through the client between hops (2N links a round, not N+1).
    k_fixed: the draft length of a dsd-kK mode (None otherwise).
    lossless: must produce the baseline's tokens (greedy, exact verification).
    width_max / lookup: token trees up to this wide / prompt-lookup branches."""

    name: str
    kind: str
    relay: bool = False
    speculative: bool = False
    k_fixed: int | None = None
    adaptive: bool = False
    lossless: bool = True
    width_max: int = 1
    lookup: bool = False
    audit: bool = True
    rejections_ahead: int = PredraftSettings().rejections
    rejections_gated: bool = PredraftSettings().gated

    def options(self, max_new_tokens: int, k_max: int = 8, tau: float = 0.3,
                prefill_pipeline: bool = True, wire: str = "exact") -> GenerateOptions:
        k = 0 if not self.speculative else self.k_fixed if self.k_fixed is not None else "auto"
        return GenerateOptions(max_new_tokens=max_new_tokens, k=k, k_max=k_max, adaptive=self.adaptive, tau=tau,
                               width_max=self.width_max, lookup=self.lookup, audit=self.audit,
                               prefill_pipeline=prefill_pipeline, rejections_ahead=self.rejections_ahead,
                               rejections_gated=self.rejections_gated, wire=wire)


def parse_mode(name: str) -> Mode:
    name = name.strip()
    if name == "ar-push":
        return Mode(name, "swarm")
    if name == "ar-relay":
        return Mode(name, "swarm", relay=True)
    if name == "dsd-auto":
        return Mode(name, "swarm", speculative=True)
    if name == "dsd-auto-noaudit":
        return Mode(name, "swarm", speculative=True, audit=False)
    if name == "dsd-auto-av":
        return Mode(name, "swarm", speculative=True, adaptive=True, lossless=False)
    if name in ("dsd-tree", "dsd-tree-av"):
        adaptive = name.endswith("-av")
        return Mode(name, "swarm", speculative=True, adaptive=adaptive, lossless=not adaptive, width_max=TREE_WIDTH,
                    lookup=True)
    if name in ("dsd-tree-ssd", "dsd-tree-ssd-always"):
        return Mode(name, "swarm", speculative=True, width_max=TREE_WIDTH, lookup=True, rejections_ahead=2,
                    rejections_gated=name == "dsd-tree-ssd")
    if name == "hf-assisted":
        return Mode(name, "hf", speculative=True)
    m = _FIXED_K.match(name)
    if m and 1 <= int(m.group(1)) <= 32:
        return Mode(name, "swarm", speculative=True, k_fixed=int(m.group(1)))
    raise BadValue(f"unknown mode {name!r}: use ar-push, ar-relay, dsd-k<1..32>, dsd-auto, dsd-auto-noaudit, "
                   "dsd-auto-av, dsd-tree, dsd-tree-ssd, dsd-tree-ssd-always, dsd-tree-av, hf-assisted")


def parse_modes(text: str) -> list[Mode]:
    """A comma list of mode names, deduplicated, in the order given."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise BadValue("--modes is empty")
    return [parse_mode(n) for n in dict.fromkeys(names)]
