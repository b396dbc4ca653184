"""The ready line: the one JSON line a long-running command (`dsdnode start`, `dsdnode api`) prints
on stdout once it serves. Launchers -- `local_swarm`, systemd units, tests -- wait for it, so it is
written and read here only."""

from __future__ import annotations

import json

EVENT = "ready"


def print_ready(**fields) -> None:
    """Say that this process serves now; `fields` (peer id, addresses, span, URL...) go with it."""
    print(json.dumps({"event": EVENT, **fields}), flush=True)


def parse_ready(line: str) -> dict | None:
    """The fields of a ready line, or None for any other line of output."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and event.get("event") == EVENT else None
