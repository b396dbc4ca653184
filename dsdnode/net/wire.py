"""Wire messages: typed dataclasses encoded as msgpack maps, with strict validation.

Every frame on a dsdnode stream is one message: a msgpack map holding the dataclass fields
plus a "type" tag. Tensors travel as dtype/shape/raw little-endian bytes (no pickle, no
torch serialization), so a frame from an untrusted peer can only ever become one of the
dataclasses below or a WireError; `decode` never raises anything else.

Decoding cost is bounded before anything is allocated: `_scan` walks the msgpack headers (no
objects built) and rejects a frame whose nesting, container lengths, string/bin lengths or total
item count exceed what the schema below can produce (all derived from the dataclasses and the
receiver's WireLimits), so a hostile frame costs at most about twice its size and a few
milliseconds, never a pile of tiny Python objects or a deep recursion. Error messages are capped
at MAX_MESSAGE_CHARS and quote offending values only through `short`.

Error codes raised by `decode` (and sent back in ErrorReply):
  malformed  not msgpack, unknown type tag, missing/extra/mistyped field, negative counts, nesting,
             lists, maps, strings or object counts beyond what any message holds
  too_large  frame > max_frame_bytes, block T > max_block, commit_len+T or max_length > max_length,
             bytes longer than the largest tensor the limits allow
  bad_dtype  tensor dtype not allowed where it appears
  bad_shape  shape not [1, T, hidden_size] / mask not [T, T] / data length != shape
  bad_dtype  (also) int8 blocks in a lossless session or exact hidden states in an int8 one (servers)
  malformed  (also) a tree mask that lets a position see a later one or not itself, positions outside
             the block's own range [commit_len, commit_len+T) or not T of them, kept indices not
             strictly increasing inside [0, max_block)
The other codes (unknown_session, busy, wrong_span, wrong_weights, internal, shutting_down,
bad_next_hop) are for servers; wrong_weights: OpenSession asked for other weights (another digest)
than the server holds; bad_next_hop: OpenSession named a next_peer without a valid span record that continues
the session's span, or the next hop cannot be reached or refused a pushed block (the fault is
probably the next hop's).
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass, fields, is_dataclass
from types import NoneType, UnionType
from typing import TYPE_CHECKING, Any, Union

import msgpack

from ..dtypes import HIDDEN_DTYPES, WIRE_DTYPES, dtype_name, torch_dtype
from ..errors import PeerError

if TYPE_CHECKING:
    import torch

# Hidden states of a session cross the wire exactly in the session's dtype ("exact", the default:
# lossless), or, where the client opened the session with wire="int8" (opt-in, lossy), as INT8_BLOCKS:
# int8 values with a float16 absmax scale per INT8_BLOCK values of each position, a quarter of float32's
# bytes plus 1/32 for the scales (BENCHMARKS.md has what it saves and what it costs in agreement).
WIRE_MODES = ("exact", "int8")
INT8_BLOCKS = "int8_blocks"  # a TensorPayload dtype: data = int8 values, then float16 scales
INT8_BLOCK = 64

ERROR_CODES = frozenset(
    {"malformed", "too_large", "bad_dtype", "bad_shape", "unknown_session", "busy",
     "wrong_span", "wrong_weights", "internal", "shutting_down", "bad_next_hop"}
)
MAX_DIMS = 8
MAX_ID_CHARS = 256  # session ids, model names, peer ids, error codes
MAX_TIMINGS = 256  # one HopTiming per hop; a longer list is an attack, not a chain
MAX_MESSAGE_CHARS = 512  # error messages: enough to explain, too short to echo an attack back
MAX_UTF8_BYTES_PER_CHAR = 4


def short(value: Any, n: int = 40) -> str:
    """A repr of at most ~n characters that never walks a big or deep value (repr of a 1000-deep
    list raises RecursionError; repr of an 8 MiB string is 8 MiB)."""
    if isinstance(value, (str, bytes, bytearray)):
        text = repr(value[:n])
        return text if len(value) <= n else f"{text}... ({len(value)} long)"
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, (int, float, bool)) or value is None:
        text = repr(value)
        return text if len(text) <= n else text[:n] + "..."
    return f"<{type(value).__name__}>"


def cap(message: str) -> str:
    """Error text cut to MAX_MESSAGE_CHARS."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


class WireError(PeerError, ValueError):
    """A frame that is not a valid message. `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        message = cap(message)
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

        try:
            name = dtype_name(t.dtype)
        except ValueError:
            raise WireError("bad_dtype", f"cannot send a tensor of dtype {t.dtype}") from None
        t = t.detach().to("cpu").contiguous()
        # numpy has no bfloat16: reinterpret the same 2-byte words as int16.
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return cls(name, tuple(t.shape), raw.numpy().tobytes())

    @classmethod
    def int8_blocks(cls, t: torch.Tensor) -> TensorPayload:
        """t [..., H] rounded to int8 with one absmax scale per INT8_BLOCK values along H (the last
        block of a row zero-padded), scales as float16; values are quantized against the float16
        scale they travel with, so the receiver's dequantization is what the sender meant."""
        import torch

        x = t.detach().to("cpu", torch.float32)
        blocks = -(-x.shape[-1] // INT8_BLOCK)
        padded = torch.nn.functional.pad(x, (0, blocks * INT8_BLOCK - x.shape[-1])).reshape(*x.shape[:-1], blocks, INT8_BLOCK)
        scale = (padded.abs().amax(dim=-1, keepdim=True) / 127).to(torch.float16)
        q = (padded / scale.float().clamp_min(1e-30)).round().clamp(-127, 127).to(torch.int8)
        values = q.reshape(*x.shape[:-1], blocks * INT8_BLOCK)[..., :x.shape[-1]].contiguous()
        return cls(INT8_BLOCKS, tuple(x.shape), values.numpy().tobytes() + scale.view(torch.int16).numpy().tobytes())

    def to_torch(self) -> torch.Tensor:
        """The tensor (int8 blocks: dequantized, as float32)."""
        import torch

        if self.dtype == INT8_BLOCKS:
            *lead, width = self.shape
            n, blocks = math.prod(self.shape), -(-width // INT8_BLOCK)
            values = torch.frombuffer(bytearray(self.data[:n]), dtype=torch.int8).float().reshape(*lead, width)
            scale = torch.frombuffer(bytearray(self.data[n:]), dtype=torch.float16).float().reshape(*lead, blocks, 1)
            padded = torch.nn.functional.pad(values, (0, blocks * INT8_BLOCK - width))
            return (padded.reshape(*lead, blocks, INT8_BLOCK) * scale).reshape(*lead, blocks * INT8_BLOCK)[..., :width]
        dtype = torch_dtype(self.dtype)
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=dtype).reshape(self.shape)


def payload_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """The data bytes of a tensor of `shape` sent as `dtype` (one of WIRE_DTYPES, or INT8_BLOCKS)."""
    if dtype == INT8_BLOCKS:
        width = shape[-1] if shape else 1
        return math.prod(shape) + 2 * (math.prod(shape) // width if width else 0) * -(-width // INT8_BLOCK)
    return math.prod(shape) * WIRE_DTYPES[dtype]


def hidden_payload(t: torch.Tensor, wire: str) -> TensorPayload:
    """Hidden states as a session of this wire mode sends them."""
    return TensorPayload.int8_blocks(t) if wire == "int8" else TensorPayload.from_torch(t)


@dataclass
class HopTiming:
    """One hop's stamp on a block. input_digest: `digest` of the hidden states the hop received, so the
    client can tell whether what a hop pushed on is what it sent the client as its copy."""

    peer_id: str
    recv_time: float
    compute_s: float
    send_time: float
    input_digest: bytes


DIGEST_BYTES = 8


def digest(payload: TensorPayload) -> bytes:
    """A short hash of a tensor's bytes (not a secret: it only has to tell two blocks apart)."""
    import hashlib

    return hashlib.blake2b(payload.data, digest_size=DIGEST_BYTES).digest()


# msgpack bytes of one HopTiming at its largest: a peer id of MAX_ID_CHARS 4-byte characters, the
# digest, three float64s, and the map's keys and headers
_TIMING_BYTES = MAX_UTF8_BYTES_PER_CHAR * MAX_ID_CHARS + DIGEST_BYTES + 3 * 9 + 96
_FRAME_SLACK = 64 * 1024  # ids, counters, positions and kept lists, keys and headers of the rest


def frame_ceiling(hidden_size: int, max_block: int) -> int:
    """The largest frame a valid message can be for a receiver that takes blocks of up to max_block
    positions of hidden_size: a float32 block, its [T, T] tree mask, MAX_TIMINGS hop stamps and
    slack. A server reads no longer frame (its stream is reset at the length prefix), so a peer
    cannot make it buffer more than this per stream (0.8 MiB for Qwen2.5-1.5B's 1536 x 64, where a
    fixed ceiling was 64 MiB)."""
    return (max_block * hidden_size * WIRE_DTYPES["float32"] + max_block * max_block * WIRE_DTYPES["bool"]
            + MAX_TIMINGS * _TIMING_BYTES + 8 * max_block * 9 + _FRAME_SLACK)


@dataclass
class OpenSession:
    """Open a session for layers [start, end) on the receiving server.

    next_peer: peer id of the hop this one pushes its output to (None: answer the opener). The
    server dials it at the addresses of that peer's signed span record, never at addresses a
    client names. prev_peer: peer id of the hop that pushes blocks into this session (None: the
    opener sends them itself, on this stream); blocks from anyone else are refused. weights: the
    digest of the weights the client's head was loaded from (models.weights.weights_digest); a
    server holding other weights refuses with wrong_weights, so a chain never mixes checkpoints.
    session_id: this hop's id of the session, and next_session_id the next hop's (what this hop's
    pushes carry; None: the same). A client gives every hop an id of its own, so no hop learns the
    id of a session at a hop it does not push to, and a server keys sessions by (opener, id) and
    pushed blocks by (prev_peer, id): nobody can take an id before its client opens it.
    """

    session_id: str
    model: str
    start: int
    end: int
    max_length: int
    next_peer: str | None
    prev_peer: str | None
    dtype: str
    weights: str
    next_session_id: str | None = None
    wire: str = "exact"  # how hidden states cross the wire: one of WIRE_MODES (all hops of a session alike)


@dataclass
class SessionOpened:
    """compute_dtype: the dtype the server's layers compute in (hidden states cross the wire in the
    session's dtype); an audit compares only servers that compute alike."""

    session_id: str
    peer_id: str
    compute_dtype: str


@dataclass
class Forward:
    """One block through the chain.

    attention_mask: optional [T, T] bool mask within the block (a token tree), True where block
    position i may attend to block position j (j <= i); every position always sees the committed
    prefix. None means the ordinary causal mask.
    positions: the block's position ids (a tree node's is commit_len + its depth); None means
    commit_len, commit_len+1, ... (a chain). Without them a tree block would get wrong rotary
    positions.
    kept: which positions of the previous block to keep, as indices into that block (the accepted
    path of a tree); each hop first gathers them to where that block began, then keeps commit_len
    cached positions, so only the accepted path is moved and nothing is recomputed. None keeps the
    previous block as it is (a chain's rollback is commit_len alone).
    """

    session_id: str
    step_id: int
    commit_len: int
    hidden: TensorPayload
    attention_mask: TensorPayload | None
    timings: list[HopTiming]
    positions: list[int] | None = None
    kept: list[int] | None = None


@dataclass
class ForwardResult:
    """A hop's output for a block: the chain's result from the last hop, and from every other hop a
    copy of what it pushed on (timings up to and including that hop), which the client may audit."""

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

    def __post_init__(self) -> None:
        self.message = cap(self.message)  # whatever went into it, the reply stays small


Message = Union[OpenSession, SessionOpened, Forward, ForwardResult, CloseSession, ErrorReply]
_TAGS: dict[str, type] = {
    "open_session": OpenSession, "session_opened": SessionOpened, "forward": Forward,
    "forward_result": ForwardResult, "close_session": CloseSession, "error": ErrorReply,
}
_TAG_OF = {cls: tag for tag, cls in _TAGS.items()}
_HINTS = {cls: typing.get_type_hints(cls) for cls in (*_TAGS.values(), TensorPayload, HopTiming)}


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
    try:
        return _decode(frame, limits)
    except WireError:
        raise
    except Exception as exc:  # last resort (RecursionError, MemoryError...): hostile input is malformed
        raise WireError("malformed", f"undecodable frame: {type(exc).__name__}") from None


def _decode(frame: bytes, limits: WireLimits) -> Message:
    if len(frame) > limits.max_frame_bytes:
        raise WireError("too_large", f"frame of {len(frame)} bytes exceeds {limits.max_frame_bytes}")
    bounds = _bounds(limits)
    _scan(frame, bounds)
    try:
        obj = msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=True,
                              max_str_len=bounds.str_bytes, max_bin_len=bounds.bin_bytes,
                              max_array_len=bounds.array_len, max_map_len=bounds.map_len, max_ext_len=0)
    except Exception as exc:  # msgpack raises a zoo of types on garbage; all mean malformed
        raise WireError("malformed", f"not a msgpack message: {type(exc).__name__}: {short(str(exc), 80)}") from None
    if not isinstance(obj, dict):
        raise WireError("malformed", f"message must be a map, got {type(obj).__name__}")
    tag = obj.pop("type", None)
    cls = _TAGS.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise WireError("malformed", f"unknown message type {short(tag)}")
    msg = _build(cls, obj, tag)
    _check(msg, limits)
    return msg


@dataclass(frozen=True)
class _Bounds:
    """The most any valid message can hold, for a receiver's limits (see _bounds)."""

    depth: int  # containers nested in each other, the message map included
    items: int  # msgpack objects in one frame (map keys included)
    map_len: int
    array_len: int
    str_bytes: int
    bin_bytes: int


def _nesting(tp: Any) -> int:
    """How many containers deep a value of annotation `tp` is encoded."""
    origin = typing.get_origin(tp)
    if origin in (Union, UnionType):
        return max(_nesting(o) for o in typing.get_args(tp) if o is not NoneType)
    if origin in (list, tuple):
        return 1 + _nesting(typing.get_args(tp)[0])
    if is_dataclass(tp):
        return 1 + max(_nesting(t) for t in _HINTS[tp].values())
    return 0


def _count(tp: Any) -> int:
    """The most msgpack objects a value of annotation `tp` encodes to (lists at their caps)."""
    origin = typing.get_origin(tp)
    if origin in (Union, UnionType):
        return max(_count(o) for o in typing.get_args(tp) if o is not NoneType)
    if origin in (list, tuple):
        return 1 + _ARRAY_CAP * _count(typing.get_args(tp)[0])
    if is_dataclass(tp):
        return 1 + sum(1 + _count(t) for t in _HINTS[tp].values())
    return 1


_ARRAY_CAP = max(MAX_TIMINGS, MAX_DIMS)  # the longest list in any message
_DEPTH_CAP = max(_nesting(cls) for cls in _TAGS.values())
_ITEMS_CAP = max(_count(cls) for cls in _TAGS.values()) + 2  # + the "type" tag's key and value
_MAP_CAP = max(len(_HINTS[cls]) for cls in _HINTS) + 1


@functools.lru_cache(maxsize=16)
def _bounds(limits: WireLimits) -> _Bounds:
    if limits.hidden_size is None:
        bin_bytes = limits.max_frame_bytes
    else:  # the largest tensor a message may carry: a hidden block or its attention mask
        hidden = limits.max_block * limits.hidden_size * max(WIRE_DTYPES[d] for d in HIDDEN_DTYPES)
        bin_bytes = max(hidden, limits.max_block * limits.max_length * WIRE_DTYPES["bool"])
    # positions and kept are lists of up to max_block ints each; _ITEMS_CAP counts them at _ARRAY_CAP
    longer = max(0, limits.max_block - _ARRAY_CAP)
    return _Bounds(depth=_DEPTH_CAP, items=_ITEMS_CAP + 2 * longer, map_len=_MAP_CAP,
                   array_len=max(_ARRAY_CAP, limits.max_block),
                   str_bytes=MAX_UTF8_BYTES_PER_CHAR * max(MAX_ID_CHARS, MAX_MESSAGE_CHARS), bin_bytes=bin_bytes)


# msgpack first bytes with a fixed-size payload: byte -> payload bytes (nil, bools, numbers)
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
# first bytes whose next 1/2/4 bytes give a length: byte -> (kind, size of the length field)
_SIZED = {0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4), 0xD9: ("str", 1), 0xDA: ("str", 2),
          0xDB: ("str", 4), 0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4)}


def _scan(frame: bytes, b: _Bounds) -> None:
    """Walk the msgpack headers of `frame` without building anything; raise WireError where the
    frame holds more than a valid message can (so unpacking it afterwards is cheap).

    At most b.items iterations whatever the frame size: the cost is bounded before allocation."""
    n = len(frame)
    if n == 0 or not (0x80 <= frame[0] <= 0x8F or frame[0] in (0xDE, 0xDF)):
        raise WireError("malformed", "a message must be a msgpack map")
    pos, items = 0, 0
    left = [1]  # objects still to read at each open container level
    while left:
        if left[-1] == 0:
            left.pop()
            continue
        left[-1] -= 1
        items += 1
        if items > b.items:
            raise WireError("malformed", f"more than {b.items} objects in one frame")
        if pos >= n:
            raise WireError("malformed", "frame ends inside a message")
        first = frame[pos]
        pos += 1
        if first <= 0x7F or first >= 0xE0:  # fixint
            continue
        if first in _FIXED:
            pos += _FIXED[first]
            continue
        if 0xA0 <= first <= 0xBF:
            kind, length = "str", first & 0x1F
        elif 0x90 <= first <= 0x9F:
            kind, length = "array", first & 0x0F
        elif 0x80 <= first <= 0x8F:
            kind, length = "map", first & 0x0F
        elif first in _SIZED:
            kind, width = _SIZED[first]
            length = int.from_bytes(frame[pos:pos + width], "big")
            pos += width
        else:  # 0xC1 (never used) and ext types (dsdnode sends none)
            raise WireError("malformed", f"msgpack type byte 0x{first:02x} is not allowed")
        if kind in ("str", "bin"):
            most = b.str_bytes if kind == "str" else b.bin_bytes
            if length > most:
                raise WireError("too_large" if kind == "bin" else "malformed",
                                f"{kind} of {length} bytes exceeds {most}")
            pos += length
            continue
        most = b.map_len if kind == "map" else b.array_len
        if length > most:
            raise WireError("malformed", f"{kind} of {length} entries exceeds {most}")
        if len(left) > b.depth:  # left holds one level per enclosing container, plus the frame
            raise WireError("malformed", f"containers nested deeper than {b.depth}")
        left.append(2 * length if kind == "map" else length)
    if pos != n:
        raise WireError("malformed", "frame ends inside a message" if pos > n else "trailing bytes after the message")


def _build(cls: type, obj: Any, path: str) -> Any:
    if not isinstance(obj, dict):
        raise WireError("malformed", f"{path} must be a map, got {type(obj).__name__}")
    hints = _HINTS[cls]
    missing = [n for n in hints if n not in obj]
    extra = [short(k) for k in obj if k not in hints]
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
        raise WireError("malformed", f"{path} must be a finite number, got {short(value)}")
    if type(value) is not tp:  # exact: bool is not an int here, str is not bytes
        raise WireError("malformed", f"{path} must be {tp.__name__}, got {type(value).__name__}")
    most = MAX_MESSAGE_CHARS if path.endswith(".message") else MAX_ID_CHARS
    if tp is str and len(value) > most:
        raise WireError("malformed", f"{path} is longer than {most} characters")
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
            raise WireError("bad_dtype", f"session dtype {short(msg.dtype)} not in {sorted(HIDDEN_DTYPES)}")
        if msg.wire not in WIRE_MODES:
            raise WireError("malformed", f"wire mode {short(msg.wire)} not in {list(WIRE_MODES)}")
    elif isinstance(msg, Forward):
        _check_step(msg.step_id, msg.timings)
        if msg.commit_len < 0:
            raise WireError("malformed", f"commit_len must be >= 0, got {msg.commit_len}")
        t = _check_hidden(msg.hidden, limits)
        if msg.commit_len + t > limits.max_length:
            raise WireError("too_large", f"commit_len {msg.commit_len} + block {t} exceeds max_length {limits.max_length}")
        if msg.attention_mask is not None:
            _check_mask(msg.attention_mask, t)
        if msg.positions is not None:
            _check_positions(msg.positions, t, msg.commit_len)
        if msg.kept is not None:
            _check_kept(msg.kept, limits.max_block)
    elif isinstance(msg, ForwardResult):
        _check_step(msg.step_id, msg.timings)
        _check_hidden(msg.hidden, limits)
    elif isinstance(msg, SessionOpened):
        if msg.compute_dtype not in HIDDEN_DTYPES:
            raise WireError("bad_dtype", f"compute dtype {short(msg.compute_dtype)} not in {sorted(HIDDEN_DTYPES)}")
    elif isinstance(msg, ErrorReply):
        if msg.code not in ERROR_CODES:
            raise WireError("malformed", f"unknown error code {short(msg.code)}")
        if msg.step_id is not None and msg.step_id < 0:
            raise WireError("malformed", f"step_id must be >= 0, got {msg.step_id}")
        if msg.retry_after_s is not None and msg.retry_after_s < 0:
            raise WireError("malformed", f"retry_after_s must be >= 0, got {msg.retry_after_s}")


def _check_step(step_id: int, timings: list[HopTiming]) -> None:
    if step_id < 0:
        raise WireError("malformed", f"step_id must be >= 0, got {step_id}")
    if len(timings) > MAX_TIMINGS:
        raise WireError("malformed", f"{len(timings)} hop timings exceed {MAX_TIMINGS}")
    if any(len(t.input_digest) != DIGEST_BYTES for t in timings):
        raise WireError("malformed", f"an input_digest is not {DIGEST_BYTES} bytes")


def _check_tensor(t: TensorPayload, name: str) -> None:
    if t.dtype not in WIRE_DTYPES and not (name == "hidden" and t.dtype == INT8_BLOCKS):
        raise WireError("bad_dtype", f"{name} dtype {short(t.dtype)} not in {sorted(WIRE_DTYPES)}")
    if len(t.shape) > MAX_DIMS or any(d < 0 for d in t.shape):
        raise WireError("bad_shape", f"{name} shape {short(list(t.shape))} has negative or too many dims")
    expected = payload_bytes(t.dtype, t.shape)
    if len(t.data) != expected:
        raise WireError("bad_shape", f"{name} has {len(t.data)} data bytes, shape {list(t.shape)} "
                                     f"of {t.dtype} needs {expected}")


def _check_hidden(h: TensorPayload, limits: WireLimits) -> int:
    """Validate hidden states [1, T, hidden_size]; returns T."""
    if h.dtype not in HIDDEN_DTYPES and h.dtype != INT8_BLOCKS:
        raise WireError("bad_dtype", f"hidden dtype {short(h.dtype)} not in {sorted(HIDDEN_DTYPES + (INT8_BLOCKS,))}")
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


def _check_mask(m: TensorPayload, t: int) -> None:
    if m.dtype != "bool":
        raise WireError("bad_dtype", f"attention_mask dtype must be bool, got {short(m.dtype)}")
    if tuple(m.shape) != (t, t):
        raise WireError("bad_shape", f"attention_mask shape {list(m.shape)} is not [{t}, {t}]")
    _check_tensor(m, "attention_mask")
    if m.data.translate(None, b"\x00\x01"):
        raise WireError("malformed", "attention_mask holds bytes other than 0/1")
    # row-major [T, T]: row i's diagonal byte is at i*(T+1); nothing after it in the row may be set
    for i in range(t):
        row = m.data[i * t:(i + 1) * t]
        if row[i] != 1 or row[i + 1:].count(1):
            raise WireError("malformed", f"attention_mask row {i} must see itself and no later position")


def _check_positions(positions: list[int], t: int, commit_len: int) -> None:
    if len(positions) != t:
        raise WireError("malformed", f"{len(positions)} positions for a block of {t}")
    if any(not commit_len <= p < commit_len + t for p in positions):
        raise WireError("malformed", f"positions must lie in [{commit_len}, {commit_len + t})")


def _check_kept(kept: list[int], max_block: int) -> None:
    if len(kept) > max_block or any(not 0 <= i < max_block for i in kept):
        raise WireError("malformed", f"kept indices must be fewer than and inside [0, {max_block})")
    if any(a >= b for a, b in zip(kept, kept[1:])):
        raise WireError("malformed", "kept indices must be strictly increasing")
