"""Settings of a node and of a client: typed dataclasses, read from a TOML file and overridden by flags.

A bad config file is a clear error naming the file and the key, never a traceback: operators edit
these by hand on machines they do not watch."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    pass


@dataclass
class NodeSettings:
    model: str = "qwen2.5-coder-1.5b"
    layers: str = "auto"  # "A:B" or "auto" (the least-covered span)
    num_layers: int = 0  # with layers=auto: how many layers to serve (0: a quarter of the model)
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    announce_addrs: list[str] = field(default_factory=list)  # public multiaddrs to advertise (behind NAT, 0.0.0.0)
    bootstrap: list[str] = field(default_factory=list)  # multiaddrs
    peers_file: str | None = None  # one multiaddr a line, '#' comments
    identity: str | None = None  # Ed25519 key file, created 0600 if missing
    dtype: str = "bfloat16"
    threads: int = 0  # torch threads (0: all cores)
    link_latency_ms: float = 0.0  # emulated delay before every outbound frame
    cache_budget_mb: int = 2048  # KV cache memory for all sessions together
    max_session_length: int = 4096
    max_block: int = 64
    session_idle_s: float = 300.0  # drop a session nobody used for this long
    frame_body_timeout_s: float = 30.0  # a frame begun must end this soon (+ 1 s per MiB) or the stream resets
    announce_interval_s: float = 30.0
    record_ttl_s: float = 120.0
    metrics_port: int = 0  # 0: off
    parent_pid: int = 0  # stop once this process is gone (0: off); set by local-swarm launchers


@dataclass
class ClientSettings:
    model: str = "qwen2.5-coder-1.5b"
    draft: str | None = None  # None: the registry's pairing
    bootstrap: list[str] = field(default_factory=list)
    peers_file: str | None = None
    dtype: str = "bfloat16"
    link_latency_ms: float = 0.0


T = typing.TypeVar("T")


def load_settings(cls: type[T], path: str | Path | None = None, **overrides) -> T:
    """Defaults, then the [node]/[client] table of a TOML file, then non-None overrides."""
    values: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        section = "node" if cls is NodeSettings else "client"
        values.update(raw.get(section, {}))
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{path or 'settings'}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        values[key] = _coerce(key, value, hints[key], path)
    return cls(**values)


def _coerce(key: str, value, hint, path):
    where = f"{path or 'settings'}: {key}"
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return list(value)
    allowed = typing.get_args(hint) or (hint,)
    for t in allowed:
        if t is type(None) and value is None:
            return None
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t in (int, str, bool) and type(value) is t:
            return value
    names = " or ".join(getattr(a, "__name__", str(a)) for a in allowed)
    raise ConfigError(f"{where} must be {names}, got {value!r}")


def read_peers_file(path: str | Path) -> list[str]:
    """Bootstrap multiaddrs: one a line; blank lines and '#' comments ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"peers file {path}: {e.strerror}") from None
    addrs = [line.split("#", 1)[0].strip() for line in lines]
    addrs = [a for a in addrs if a]
    for a in addrs:
        if not a.startswith("/") or "/p2p/" not in a:
            raise ConfigError(f"peers file {path}: {a!r} is not a multiaddr with a /p2p/<peer id> part")
    return addrs
