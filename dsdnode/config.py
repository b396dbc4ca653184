"""Settings of a node: a typed dataclass, read from a TOML file and overridden by flags.

A bad config file is a clear error naming the file and the key, never a traceback: operators edit
these by hand on machines they do not watch."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .dtypes import HIDDEN_DTYPES
from .errors import BadValue


class ConfigError(BadValue):
    pass


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?|mps"  # checked here without importing torch; devices.py resolves
DEVICE_SYNTAX = "auto, cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting may take: a closed range, or open at the low end (`> low`).

    Kept in the field's metadata so a config file and the command line (cli_common.setting_type)
    check the same range."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"<= {self.high:g}" if self.high is not None else "finite"


def bounded(default, low=None, high=None, *, low_open: bool = False):
    """A dataclass field whose value must lie within Bounds(low, high, low_open)."""
    return field(default=default, metadata={"bounds": Bounds(low, high, low_open)})


def one_of(default: str | None, choices: tuple[str, ...]):
    """A dataclass field whose value must be one of `choices` (the default may be None: unset)."""
    return field(default=default, metadata={"choices": choices})


def matching(default: str, pattern: str, spelled: str):
    """A dataclass field whose value must match the regular expression `pattern` (`spelled` says how)."""
    return field(default=default, metadata={"pattern": (pattern, spelled)})


PORT = (0, 65535)


@dataclass
class NodeSettings:
    model: str = "qwen2.5-coder-1.5b"
    layers: str = "auto"  # "A:B" or "auto" (the least-covered span)
    num_layers: int = bounded(0, 0)  # with layers=auto: how many layers to serve (0: as many as fit memory)
    host: str = "127.0.0.1"
    port: int = bounded(0, *PORT)  # 0: any free port
    announce_addrs: list[str] = field(default_factory=list)  # public multiaddrs to advertise (behind NAT, 0.0.0.0)
    bootstrap: list[str] = field(default_factory=list)  # multiaddrs
    peers_file: str | None = None  # one multiaddr a line, '#' comments
    identity: str | None = None  # Ed25519 key file, created 0600 if missing
    device: str = matching("auto", DEVICE_PATTERN, DEVICE_SYNTAX)  # auto: CUDA, then MPS, then CPU
    dtype: str | None = one_of(None, HIDDEN_DTYPES)  # None: the device's default (devices.default_dtype)
    threads: int = bounded(0, 0)  # torch threads (0: all cores)
    link_latency_ms: float = bounded(0.0, 0)  # emulated delay before every outbound frame
    link_config: str | None = None  # TOML [links] table: per-peer delays, jitter, uplink cap (replaces the above)
    cache_budget_mb: int = bounded(2048, 1)  # KV cache memory for all sessions together
    quant: str = one_of("none", ("none", "int8", "int4"))  # weight-only quantization of the span's layers
    max_memory_mb: int = bounded(0, 0)  # layers=auto: most memory for weights + KV cache (0: what the device has)
    max_session_length: int = bounded(4096, 1)
    max_block: int = bounded(64, 1)
    session_idle_s: float = bounded(300.0, 0, low_open=True)  # drop a session nobody used for this long
    # a frame begun must end this soon (+ 1 s per MiB) or the stream resets
    frame_body_timeout_s: float = bounded(30.0, 0, low_open=True)
    announce_interval_s: float = bounded(30.0, 0, low_open=True)
    record_ttl_s: float = bounded(120.0, 0, low_open=True)
    metrics_port: int = bounded(0, *PORT)  # 0: off
    batching: bool = True  # run the blocks of sessions waiting together in one forward (server/batching.py)
    batch_window_ms: float = bounded(2.0, 0, 1000)  # most a block waits for others' while other sessions are active
    max_batch: int = bounded(16, 1)  # blocks per forward
    max_sessions_per_client: int = bounded(16, 1)  # open sessions one client (peer id) may hold here
    max_queued_per_client: int = bounded(512, 1)  # positions one client may have waiting for compute here
    max_sessions_per_network: int = bounded(32, 1)  # open sessions the peers of one /24 (/48) may hold here
    max_cache_share: float = bounded(0.5, 0, 1, low_open=True)  # of cache_budget_mb, per client and per network
    # a swarm on one machine or a private network (tests, bench, demo): next hops may be dialled at
    # loopback and private addresses, and each loopback peer is a network group of its own
    local_swarm: bool = False
    parent_pid: int = bounded(0, 0)  # stop once this process is gone (0: off); set by local-swarm launchers
    relay_service: bool = True  # offer a circuit relay to unreachable peers while this node is not known private
    # the relay's limits (net/relay.py, RelayLimits; unset: its defaults): reservations and circuits in
    # all and per /24 (/48) of the peers that reserve or dial; per circuit MiB, seconds, MiB/s, idle seconds
    relay_max_reservations: int | None = bounded(None, 1)
    relay_max_reservations_per_network: int | None = bounded(None, 1)
    relay_max_circuits: int | None = bounded(None, 1)
    relay_max_circuits_per_peer: int | None = bounded(None, 1)
    relay_max_circuits_per_network: int | None = bounded(None, 1)
    relay_circuit_mb: int | None = bounded(None, 1)
    relay_circuit_duration_s: float | None = bounded(None, 0, low_open=True)
    relay_circuit_idle_s: float | None = bounded(None, 0, low_open=True)
    relay_circuit_mb_per_s: float | None = bounded(None, 0, low_open=True)
    assume_private: bool = False  # skip the dial-back check and behave as a node nobody can dial (bench, tests)


T = typing.TypeVar("T")


def load_settings(cls: type[T], path: str | Path | None = None, **overrides) -> T:
    """Defaults, then the [node] table of a TOML file, then non-None overrides."""
    values: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        values.update(raw.get("node", {}))
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{path or 'settings'}: unknown key {key!r} (known: {', '.join(sorted(fields))})")
        values[key] = _check(key, _coerce(key, value, hints[key], path), fields[key], path)
    return cls(**values)


def _check(key: str, value, f: dataclasses.Field, path):
    """The value if it is within the field's bounds or choices, else a ConfigError naming the key."""
    where = f"{path or 'settings'}: {key}"
    bounds = f.metadata.get("bounds")
    if bounds is not None and value is not None and not bounds.admits(value):
        raise ConfigError(f"{where} must be {bounds}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    pattern = f.metadata.get("pattern")
    if pattern is not None and not re.fullmatch(pattern[0], value):
        raise ConfigError(f"{where} must be {pattern[1]}, got {value!r}")
    return value


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


def bootstrap_list(bootstrap, peers_file) -> list[str]:
    """The bootstrap multiaddrs given one by one (--bootstrap) followed by those of a peers file."""
    addrs = list(bootstrap)
    if peers_file:
        addrs += read_peers_file(peers_file)
    return addrs


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
