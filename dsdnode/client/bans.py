"""The client's local ban list: servers an audit caught computing wrong results, until an expiry.

One JSON file (`DSDNODE_BANS`, default `<cache>/bans.json` beside the model cache) that every client
process of this user reads when it routes and writes when an audit convicts a server, so a server
caught once is avoided by the next generation too, and `dsdnode swarm` can say who is banned and why.
A ban expires (a fixed machine may come back; a liar that comes back is caught again). The file is
rewritten atomically; a missing or unreadable file is an empty list (it only ever narrows routing).

A ban is keyed by peer id and by the network group the client observed the peer in
(client/standing.py): a banned operator's fresh peer id from the same network is not banned, but it
starts with a lowered standing and cannot audit (router.py), so a new id does not buy full trust.
The file holds at most MAX_BANS bans (the soonest to expire go first)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import write_atomic

log = logging.getLogger(__name__)

BAN_S = 24 * 3600.0
MAX_BANS = 1024


@dataclass(frozen=True)
class Ban:
    peer_id: str
    model: str
    layers: tuple[int, int]
    reason: str  # what the audit saw, in words
    until: float  # unix time
    group: str = ""  # the network group the peer was observed in ("": unknown)


def bans_path() -> Path:
    from ..models.fetch import cache_root
    return Path(os.environ.get("DSDNODE_BANS") or cache_root() / "bans.json").expanduser()


class BanList:
    def __init__(self, path: Path | None = None):
        self.path = path or bans_path()

    def active(self, now: float | None = None) -> dict[str, Ban]:
        """Unexpired bans by peer id."""
        now = time.time() if now is None else now
        try:
            raw = json.loads(self.path.read_text())
            bans = [Ban(b["peer_id"], b["model"], tuple(b["layers"]), b["reason"], float(b["until"]), str(b.get("group", "")))
                    for b in raw]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable ban list %s: %r", self.path, e)
            return {}
        return {b.peer_id: b for b in bans if b.until > now}

    def groups(self, bans: dict[str, Ban] | None = None) -> set[str]:
        """The network groups of unexpired bans."""
        return {b.group for b in (self.active() if bans is None else bans).values() if b.group}

    def add(self, peer_id: str, model: str, layers: tuple[int, int], reason: str, ban_s: float = BAN_S,
            group: str = "") -> Ban:
        ban = Ban(peer_id, model, layers, reason, time.time() + ban_s, group)
        bans = self.active()
        bans[peer_id] = ban
        self.path.parent.mkdir(parents=True, exist_ok=True)
        latest = sorted(bans.values(), key=lambda b: b.until)[-MAX_BANS:]  # expired bans leave the file
        keep = [asdict(b) for b in latest if b.until > time.time()]
        write_atomic(self.path, json.dumps(keep, indent=1).encode())
        log.warning("banned %s until %s: %s", peer_id, time.strftime("%Y-%m-%d %H:%M", time.localtime(ban.until)), reason)
        return ban
