"""Wire messages: typed dataclasses encoded as msgpack maps, with strict validation.

Every frame on a dsdnode stream is one message: a msgpack map holding the dataclass fields
plus a "type" tag. Tensors travel as dtype/shape/raw little-endian bytes (no pickle, no
torch serialization), so a frame from an untrusted peer can only ever become one of the
dataclasses below or a WireError; `decode` never raises anything else.

Error codes raised by `decode` (and sent back in ErrorReply):
  malformed  not msgpack, unknown type tag, missing/extra/mistyped field, negative counts
  too_large  frame > max_frame_bytes, block T > max_block, commit_len+T or max_length > max_length
  bad_dtype  tensor dtype not allowed where it appears
  bad_shape  shape not [1, T, hidden_size] / mask not [T, commit_len+T] / data length != shape
The other codes (unknown_session, busy, wrong_span, internal, shutting_down) are for servers.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields, is_dataclass
from types import NoneType, UnionType
from typing import TYPE_CHECKING, Any, Union

import msgpack

if TYPE_CHECKING:
    import torch

ERROR_CODES = frozenset(
    {"malformed", "too_large", "bad_dtype", "bad_shape", "unknown_session", "busy",
     "wrong_span", "internal", "shutting_down"}
)
HIDDEN_DTYPES = frozenset({"float32", "bfloat16", "float16"})
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "bool": 1}
MAX_DIMS = 8
MAX_ID_CHARS = 256  # session ids, model names, peer ids, error codes
MAX_TIMINGS = 256  # one HopTiming per hop; a longer list is an attack, not a chain


class WireError(ValueError):
    """A frame that is not a valid message. `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class WireLimits:
    """Bounds a receiver enforces; hidden_size None skips the hidden-width check."""

    hidden_size: int | None = None
    max_block: int = 64
    max_length: int = 8192
    max_frame_bytes: int = 64 * 2**20


@dataclass
class TensorPayload:
    """A dense tensor as raw little-endian bytes in row-major order."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def from_torch(cls, t: torch.Tensor) -> TensorPayload:
        import torch

        names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                 torch.int64: "int64", torch.bool: "bool"}
        if t.dtype not in names:
            raise WireError("bad_dtype", f"cannot send a tensor of dtype {t.dtype}")
        t = t.detach().to("cpu").contiguous()
        # numpy has no bfloat16: reinterpret the same 2-byte words as int16.
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return cls(names[t.dtype], tuple(t.shape), raw.numpy().tobytes())

    def to_torch(self) -> torch.Tensor:
        import torch

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "int64": torch.int64, "bool": torch.bool}
        dtype = dtypes[self.dtype]
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=dtype).reshape(self.shape)


@dataclass
class HopTiming:
    peer_id: str
    recv_time: float
    compute_s: float
    send_time: float


@dataclass
class PeerRef:
    peer_id: str
    addrs: list[str]


@dataclass
class OpenSession:
    session_id: str
    model: str
    start: int
    end: int
    max_length: int
    next_hop: PeerRef | None
    dtype: str


@dataclass
class SessionOpened:
    session_id: str
    peer_id: str


@dataclass
class Forward:
    """One block through the chain.

    attention_mask: optional [T, commit_len+T] bool mask for tree verification, True where
    query position i may attend to key position j; None means the ordinary causal mask.
    """

    session_id: str
    step_id: int
    commit_len: int
    hidden: TensorPayload
    attention_mask: TensorPayload | None
    timings: list[HopTiming]


@dataclass
class ForwardResult:
    session_id: str
    step_id: int
    hidden: TensorPayload
    timings: list[HopTiming]


@dataclass
class CloseSession:
    session_id: str


@dataclass
class ErrorReply:
    code: str
    message: str
    session_id: str | None = None
    step_id: int | None = None
    retry_after_s: float | None = None  # with "busy": when trying this server again may succeed


Message = Union[OpenSession, SessionOpened, Forward, ForwardResult, CloseSession, ErrorReply]
_TAGS: dict[str, type] = {
    "open_session": OpenSession, "session_opened": SessionOpened, "forward": Forward,
    "forward_result": ForwardResult, "close_session": CloseSession, "error": ErrorReply,
}
_TAG_OF = {cls: tag for tag, cls in _TAGS.items()}
_HINTS = {cls: typing.get_type_hints(cls) for cls in (*_TAGS.values(), TensorPayload, HopTiming, PeerRef)}


def encode(msg: Message) -> bytes:
    """Serialize a message; raises TypeError for anything that is not a message dataclass."""
    tag = _TAG_OF.get(type(msg))
    if tag is None:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    body = _to_plain(msg)
    body["type"] = tag
    return msgpack.packb(body, use_bin_type=True)


def _to_plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def decode(frame: bytes, limits: WireLimits) -> Message:
    """Parse and validate one frame. Raises only WireError."""
    if len(frame) > limits.max_frame_bytes:
        raise WireError("too_large", f"frame of {len(frame)} bytes exceeds {limits.max_frame_bytes}")
    try:
        obj = msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types on garbage; all mean malformed
        raise WireError("malformed", f"not a msgpack message: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("malformed", f"message must be a map, got {type(obj).__name__}")
    tag = obj.pop("type", None)
    cls = _TAGS.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise WireError("malformed", f"unknown message type {tag!r}")
    msg = _build(cls, obj, tag)
    _check(msg, limits)
    return msg


def _build(cls: type, obj: Any, path: str) -> Any:
    if not isinstance(obj, dict):
        raise WireError("malformed", f"{path} must be a map, got {type(obj).__name__}")
    hints = _HINTS[cls]
    missing = [n for n in hints if n not in obj]
    extra = [repr(k) for k in obj if k not in hints]
    if missing or extra:
        raise WireError("malformed", f"{path}: missing fields {missing}, unexpected fields {extra}")
    return cls(**{name: _convert(obj[name], tp, f"{path}.{name}") for name, tp in hints.items()})


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples where declared."""
    origin = typing.get_origin(tp)
    if origin in (Union, UnionType):
        options = typing.get_args(tp)
        if value is None and NoneType in options:
            return None
        (inner,) = [o for o in options if o is not NoneType]
        return _convert(value, inner, path)
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise WireError("malformed", f"{path} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)[:1]
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if is_dataclass(tp):
        return _build(tp, value, path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise WireError("malformed", f"{path} must be a finite number, got {value!r:.40}")
    if type(value) is not tp:  # exact: bool is not an int here, str is not bytes
        raise WireError("malformed", f"{path} must be {tp.__name__}, got {type(value).__name__}")
    if tp is str and len(value) > MAX_ID_CHARS and not path.endswith("message"):
        raise WireError("malformed", f"{path} is longer than {MAX_ID_CHARS} characters")
    return value


def _check(msg: Message, limits: WireLimits) -> None:
    """Semantic checks that types alone cannot express."""
    if isinstance(msg, OpenSession):
        if msg.start < 0 or msg.end <= msg.start:
            raise WireError("malformed", f"span [{msg.start}, {msg.end}) is empty or negative")
        if msg.max_length < 1:
            raise WireError("malformed", f"max_length must be >= 1, got {msg.max_length}")
        if msg.max_length > limits.max_length:
            raise WireError("too_large", f"max_length {msg.max_length} exceeds {limits.max_length}")
        if msg.dtype not in HIDDEN_DTYPES:
            raise WireError("bad_dtype", f"session dtype {msg.dtype!r} not in {sorted(HIDDEN_DTYPES)}")
    elif isinstance(msg, Forward):
        _check_step(msg.step_id, msg.timings)
        if msg.commit_len < 0:
            raise WireError("malformed", f"commit_len must be >= 0, got {msg.commit_len}")
        t = _check_hidden(msg.hidden, limits)
        if msg.commit_len + t > limits.max_length:
            raise WireError("too_large", f"commit_len {msg.commit_len} + block {t} exceeds max_length {limits.max_length}")
        if msg.attention_mask is not None:
            _check_mask(msg.attention_mask, t, msg.commit_len)
    elif isinstance(msg, ForwardResult):
        _check_step(msg.step_id, msg.timings)
        _check_hidden(msg.hidden, limits)
    elif isinstance(msg, ErrorReply):
        if msg.code not in ERROR_CODES:
            raise WireError("malformed", f"unknown error code {msg.code!r}")
        if msg.step_id is not None and msg.step_id < 0:
            raise WireError("malformed", f"step_id must be >= 0, got {msg.step_id}")
        if msg.retry_after_s is not None and msg.retry_after_s < 0:
            raise WireError("malformed", f"retry_after_s must be >= 0, got {msg.retry_after_s}")


def _check_step(step_id: int, timings: list[HopTiming]) -> None:
    if step_id < 0:
        raise WireError("malformed", f"step_id must be >= 0, got {step_id}")
    if len(timings) > MAX_TIMINGS:
        raise WireError("malformed", f"{len(timings)} hop timings exceed {MAX_TIMINGS}")


def _check_tensor(t: TensorPayload, name: str) -> None:
    if t.dtype not in ITEMSIZE:
        raise WireError("bad_dtype", f"{name} dtype {t.dtype!r} not in {sorted(ITEMSIZE)}")
    if len(t.shape) > MAX_DIMS or any(d < 0 for d in t.shape):
        raise WireError("bad_shape", f"{name} shape {list(t.shape)} has negative or too many dims")
    expected = math.prod(t.shape) * ITEMSIZE[t.dtype]
    if len(t.data) != expected:
        raise WireError("bad_shape", f"{name} has {len(t.data)} data bytes, shape {list(t.shape)} "
                                     f"of {t.dtype} needs {expected}")


def _check_hidden(h: TensorPayload, limits: WireLimits) -> int:
    """Validate hidden states [1, T, hidden_size]; returns T."""
    if h.dtype not in HIDDEN_DTYPES:
        raise WireError("bad_dtype", f"hidden dtype {h.dtype!r} not in {sorted(HIDDEN_DTYPES)}")
    width_ok = len(h.shape) == 3 and (
        h.shape[2] == limits.hidden_size if limits.hidden_size is not None else h.shape[2] >= 1
    )
    if not width_ok or h.shape[0] != 1 or h.shape[1] < 1:
        want = limits.hidden_size if limits.hidden_size is not None else "hidden_size"
        raise WireError("bad_shape", f"hidden shape {list(h.shape)} is not [1, T>=1, {want}]")
    if h.shape[1] > limits.max_block:
        raise WireError("too_large", f"block of {h.shape[1]} tokens exceeds max_block {limits.max_block}")
    _check_tensor(h, "hidden")
    return h.shape[1]


def _check_mask(m: TensorPayload, t: int, commit_len: int) -> None:
    if m.dtype != "bool":
        raise WireError("bad_dtype", f"attention_mask dtype must be bool, got {m.dtype!r}")
    if tuple(m.shape) != (t, commit_len + t):
        raise WireError("bad_shape", f"attention_mask shape {list(m.shape)} is not [{t}, {commit_len + t}]")
    _check_tensor(m, "attention_mask")
    if m.data.translate(None, b"\x00\x01"):
        raise WireError("malformed", "attention_mask holds bytes other than 0/1")
