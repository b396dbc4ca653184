"""Wire codec: round trips, every validation error code, and garbage that must not crash."""

import random

import msgpack
import pytest
import torch

from dsdnode.net.wire import (
    INT8_BLOCK,
    INT8_BLOCKS,
    CloseSession,
    ErrorReply,
    Forward,
    ForwardResult,
    HopTiming,
    OpenSession,
    SessionOpened,
    TensorPayload,
    WireError,
    WireLimits,
    decode,
    digest,
    encode,
    payload_bytes,
)

HIDDEN = 16
LIMITS = WireLimits(hidden_size=HIDDEN, max_block=8, max_length=1024, max_frame_bytes=1 << 20)


def hidden(t=4, dtype=torch.float32):
    return TensorPayload.from_torch(torch.randn(1, t, HIDDEN).to(dtype))


def mask(t=4):
    return TensorPayload.from_torch(torch.tril(torch.ones(t, t, dtype=torch.bool)))


def forward(**changes):
    fields = dict(session_id="s1", step_id=7, commit_len=3, hidden=hidden(), attention_mask=mask(),
                  timings=[HopTiming("peerA", 1.5, 0.25, 2.0, b"digest!!")])
    fields.update(changes)
    return Forward(**fields)


MESSAGES = [
    OpenSession("s1", "qwen-1.5b", 0, 14, 512, "peerB", None, "bfloat16", "0f" * 16),
    OpenSession("s1", "qwen-1.5b", 14, 28, 512, None, "peerA", "float32", ""),
    SessionOpened("s1", "peerA", "bfloat16"),
    forward(),
    forward(attention_mask=None, timings=[]),
    forward(positions=[3, 4, 4, 5], kept=[0, 2, 5]),
    ForwardResult("s1", 7, hidden(dtype=torch.float16), [HopTiming("a", 1.0, 0.1, 1.2, b"digest!!"),
                                                        HopTiming("b", 1.3, 0.1, 1.5, b"digest!!")]),
    CloseSession("s1"),
    ErrorReply("busy", "no free cache", "s1", 7, 2.5),
    ErrorReply("internal", "boom"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert decode(encode(msg), LIMITS) == msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_tensor_round_trip_is_exact(dtype):
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    out = TensorPayload.from_torch(t).to_torch()
    assert out.dtype == dtype and torch.equal(out, t)
    empty = TensorPayload.from_torch(torch.empty(1, 0, 4, dtype=dtype)).to_torch()
    assert empty.shape == (1, 0, 4)


def test_unsupported_torch_dtype():
    with pytest.raises(WireError) as err:
        TensorPayload.from_torch(torch.zeros(2, dtype=torch.int32))
    assert err.value.code == "bad_dtype"


def raw(msg, **overrides):
    """The msgpack map of a message with some keys replaced (or deleted when set to ...)."""
    body = msgpack.unpackb(encode(msg))
    for key, value in overrides.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    return msgpack.packb(body, use_bin_type=True)


def code_of(frame, limits=LIMITS):
    with pytest.raises(WireError) as err:
        decode(frame, limits)
    assert err.value.message  # human-readable
    return err.value.code


def tensor(dtype="float32", shape=(1, 4, HIDDEN), data=None, itemsize=4):
    n = 1
    for d in shape:
        n *= d
    return {"dtype": dtype, "shape": list(shape), "data": data if data is not None else b"\0" * (n * itemsize)}


def test_malformed():
    fwd = forward()
    assert code_of(b"\xc1") == "malformed"
    assert code_of(msgpack.packb([1, 2, 3])) == "malformed"
    assert code_of(raw(fwd, type="nope")) == "malformed"
    assert code_of(raw(fwd, type=...)) == "malformed"
    assert code_of(raw(fwd, step_id=...)) == "malformed"  # missing field
    assert code_of(raw(fwd, extra=1)) == "malformed"  # extra field
    assert code_of(raw(fwd, step_id="7")) == "malformed"  # mistyped
    assert code_of(raw(fwd, step_id=True)) == "malformed"  # bool is not an int
    assert code_of(raw(fwd, step_id=-1)) == "malformed"
    assert code_of(raw(fwd, commit_len=-1)) == "malformed"
    assert code_of(raw(fwd, timings=[{"peer_id": "a"}])) == "malformed"
    assert code_of(raw(fwd, hidden="tensor")) == "malformed"
    assert code_of(raw(MESSAGES[0], end=0)) == "malformed"  # empty span
    assert code_of(raw(MESSAGES[7], code="teapot")) == "malformed"
    assert code_of(encode(fwd) + b"\x00") == "malformed"  # trailing bytes


def test_too_large():
    fwd = forward()
    assert code_of(encode(fwd), WireLimits(hidden_size=HIDDEN, max_frame_bytes=100)) == "too_large"
    assert code_of(raw(fwd, hidden=tensor(shape=(1, 9, HIDDEN)), attention_mask=None)) == "too_large"
    assert code_of(raw(fwd, commit_len=1021, attention_mask=None)) == "too_large"  # 1021 + 4 > 1024
    assert code_of(raw(MESSAGES[0], max_length=1025)) == "too_large"


def test_bad_dtype():
    fwd = forward()
    assert code_of(raw(fwd, hidden=tensor(dtype="int64", itemsize=8))) == "bad_dtype"
    assert code_of(raw(fwd, hidden=tensor(dtype="float64", itemsize=8))) == "bad_dtype"
    assert code_of(raw(fwd, attention_mask=tensor(dtype="float32", shape=(4, 4)))) == "bad_dtype"
    assert code_of(raw(MESSAGES[0], dtype="int8")) == "bad_dtype"


def test_bad_shape():
    fwd = forward()
    assert code_of(raw(fwd, hidden=tensor(shape=(1, 4, HIDDEN + 1)))) == "bad_shape"
    assert code_of(raw(fwd, hidden=tensor(shape=(2, 4, HIDDEN)))) == "bad_shape"
    assert code_of(raw(fwd, hidden=tensor(shape=(4, HIDDEN)))) == "bad_shape"
    assert code_of(raw(fwd, hidden=tensor(shape=(1, 0, HIDDEN)), attention_mask=None)) == "bad_shape"
    assert code_of(raw(fwd, hidden=tensor(data=b"\0" * 10))) == "bad_shape"  # data length != shape
    assert code_of(raw(fwd, attention_mask=tensor(dtype="bool", shape=(4, 7), itemsize=1))) == "bad_shape"
    assert code_of(raw(fwd, attention_mask=tensor(dtype="bool", shape=(4, 4), data=b"\0" * 15))) == "bad_shape"
    # Without a configured hidden size any width is accepted.
    assert decode(raw(fwd, hidden=tensor(shape=(1, 4, 8))), WireLimits()).hidden.shape == (1, 4, 8)


def test_mask_values_must_be_boolean():
    assert code_of(raw(forward(), attention_mask=tensor(dtype="bool", shape=(4, 4), data=b"\x02" * 16))) == "malformed"


def test_tree_mask_must_be_causal_with_the_diagonal():
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    assert decode(encode(forward(attention_mask=TensorPayload.from_torch(tree))), LIMITS).attention_mask.shape == (4, 4)
    sees_later = tree.clone()
    sees_later[1, 3] = True
    blind = tree.clone()
    blind[2, 2] = False
    for bad in (sees_later, blind):
        assert code_of(encode(forward(attention_mask=TensorPayload.from_torch(bad)))) == "malformed"


def test_positions_and_kept_are_bounded():
    fwd = forward()  # commit_len 3, block of 4: positions in [3, 7)
    assert decode(encode(forward(positions=[3, 4, 5, 6], kept=[7])), LIMITS).positions == [3, 4, 5, 6]
    for bad in ([3, 4, 5], [3, 4, 5, 6, 6], [2, 4, 5, 6], [3, 4, 5, 7], [3, -1, 4, 5]):
        assert code_of(raw(fwd, positions=bad)) == "malformed", bad
    for bad in ([1, 1], [2, 1], [-1], [8], list(range(9)), ["0"]):  # max_block is 8
        assert code_of(raw(fwd, kept=bad)) == "malformed", bad
    assert code_of(raw(fwd, positions=...)) == "malformed"  # the fields are always there, maybe None


def test_lists_as_long_as_a_big_block_fit_the_bounds():
    limits = WireLimits(hidden_size=HIDDEN, max_block=300, max_length=1024, max_frame_bytes=1 << 20)
    t = 300
    big = forward(hidden=hidden(t=t), attention_mask=None, commit_len=0, positions=list(range(t)),
                  kept=list(range(t)))
    assert decode(encode(big), limits) == big


def test_encode_rejects_non_messages():
    with pytest.raises(TypeError):
        encode({"type": "forward"})


def random_obj(rng, depth=0):
    kinds = ["int", "str", "bytes", "float", "none", "bool"] + (["list", "map"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63 - 1, -(2**63), rng.randint(-1000, 1000)])
    if kind == "str":
        return rng.choice(["type", "forward", "hidden", "float32", "", "session_id", "x" * 300])
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 40))
    if kind == "float":
        return rng.choice([0.0, -1.5, float("inf"), float("nan"), 1e308])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "list":
        return [random_obj(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["type", "hidden", "dtype", "shape", "data", "k"]): random_obj(rng, depth + 1)
            for _ in range(rng.randint(0, 5))}


def test_garbage_only_raises_wire_error():
    rng = random.Random(1234)
    valid = [encode(m) for m in MESSAGES]
    frames = [rng.randbytes(rng.randint(0, 200)) for _ in range(1500)]
    frames += [v[: rng.randint(0, len(v))] for v in valid for _ in range(100)]  # truncated
    for v in valid:  # bit flips
        for _ in range(150):
            b = bytearray(v)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            frames.append(bytes(b))
    frames += [msgpack.packb(random_obj(rng), use_bin_type=True) for _ in range(1500)]
    for tag in ("forward", "open_session", "forward_result", "error"):  # right tag, random fields
        for _ in range(300):
            body = random_obj(rng) if rng.random() < 0.2 else {}
            body = body if isinstance(body, dict) else {}
            body["type"] = tag
            frames.append(msgpack.packb(body, use_bin_type=True))
    decoded = 0
    for frame in frames:
        try:
            decode(frame, LIMITS)
            decoded += 1
        except WireError as exc:
            assert exc.code in {"malformed", "too_large", "bad_dtype", "bad_shape"}
    assert decoded < len(frames)


# ---- hostile frames: bounded cost, only WireError, small messages ---------------------------------------------

BIG = WireLimits(hidden_size=HIDDEN, max_block=8, max_length=1024, max_frame_bytes=64 * 2**20)


def header_map(n):
    return bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def forward_with(field, value_bytes):
    """A forward frame whose `field` value is the raw msgpack bytes given (other fields valid)."""
    body = msgpack.unpackb(encode(forward()))
    del body[field]
    packed = msgpack.packb(body, use_bin_type=True)
    return header_map(len(body) + 1) + packed[1:] + msgpack.packb(field) + value_bytes


def bounded(frame, limits=BIG):
    """Decode a hostile frame: it must fail with WireError, fast, allocating < 2x its size, with a short message."""
    import time
    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(WireError) as err:
            decode(frame, limits)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(frame) + 64 * 1024, f"peak {peak} for a frame of {len(frame)} bytes"
    assert elapsed < 0.5, f"decode took {elapsed:.2f} s"
    assert len(str(err.value)) <= 600 and len(encode(ErrorReply(err.value.code, err.value.message))) < 1024
    return err.value.code


@pytest.mark.parametrize("depth", [4, 100, 1000, 100_000])
def test_deep_nesting_is_malformed(depth):
    for value in (b"\x91" * depth + b"\x90", b"\x81\xa1k" * depth + b"\xc0"):
        assert bounded(forward_with("timings", value)) == "malformed"
        assert bounded(b"\x91" * depth + b"\x90") == "malformed"  # not even a map at the top


def test_many_empty_lists_and_huge_declared_counts_are_cheap():
    size = 8 * 2**20
    cases = {
        "8 MiB of empty lists": forward_with("timings", b"\xdd" + (size).to_bytes(4, "big") + b"\x90" * size),
        "256 x 256 empty lists": forward_with("timings", b"\xdc\x01\x00" + (b"\xdc\x01\x00" + b"\x90" * 256) * 256),
        "array32 claims 4G": forward_with("timings", b"\xdd\xff\xff\xff\xff"),
        "map32 claims 4G": forward_with("hidden", b"\xdf\xff\xff\xff\xff"),
        "str32 claims 2G": forward_with("session_id", b"\xdb\x7f\xff\xff\xff"),
        "bin32 claims 4G": forward_with("attention_mask", b"\xc6\xff\xff\xff\xff"),
        "top-level array of 8M": b"\xdd" + size.to_bytes(4, "big") + b"\x90" * size,
        "ext type": forward_with("session_id", b"\xd6\xff" + b"\0" * 4),
        "trailing 8 MiB": encode(forward()) + b"\x90" * size,
    }
    codes = {name: bounded(frame) for name, frame in cases.items()}
    assert set(codes.values()) <= {"malformed", "too_large"}, codes
    assert codes["bin32 claims 4G"] == "too_large"


def test_an_8_mib_bad_field_gets_a_small_error():
    huge = "x" * (8 * 2**20)
    frames = [
        forward_with("session_id", msgpack.packb(huge)),  # over the string cap
        raw(forward(), **{huge[: 2**20]: 1}),  # an unexpected field with a 1 MiB name
        raw(forward(), step_id=[huge[:1000]] * 200),  # a list where an int belongs
        raw(ErrorReply("internal", "x"), message=huge[:4000]),
    ]
    for frame in frames:
        bounded(frame)
    assert len(ErrorReply("internal", huge).message) <= 512
    assert len(WireError("malformed", huge).message) <= 512


def test_the_bounds_still_admit_the_largest_valid_messages():
    full = forward(hidden=hidden(t=8), attention_mask=mask(t=8), commit_len=1016, positions=list(range(1016, 1024)),
                   kept=list(range(8)),
                   timings=[HopTiming("p" * 256, 1.0, 0.5, 2.0, b"digest!!")] * 256)
    assert decode(encode(full), LIMITS) == full
    error = ErrorReply("internal", "é" * 512, "s" * 256, 2**63 - 1)
    assert decode(encode(error), LIMITS) == error
    too_many = raw(full, timings=[vars(HopTiming("p", 1.0, 0.5, 2.0, b"digest!!"))] * 257)
    assert code_of(too_many) == "malformed"


def test_hop_timings_carry_an_input_digest_of_fixed_length():
    """A hop stamps the digest of the input it received; the client compares digests, so a digest of
    another length is malformed, and equal payloads have equal digests."""
    ok = forward(timings=[HopTiming("p", 1.0, 0.5, 2.0, digest(hidden()))])
    assert decode(encode(ok), LIMITS) == ok
    block = hidden()
    same = TensorPayload(block.dtype, block.shape, bytes(block.data))
    assert digest(block) == digest(same) and len(digest(block)) == 8
    assert code_of(raw(ok, timings=[vars(HopTiming("p", 1.0, 0.5, 2.0, b"short"))])) == "malformed"
    assert code_of(encode(SessionOpened("s", "p", "int64"))) == "bad_dtype"


@pytest.mark.parametrize("width", [64, 576, 100])
def test_int8_blocks_round_trip_within_half_a_step_of_each_block(width):
    """Every value comes back within half its block's step (absmax / 127, as the float16 scale sent),
    a block's largest value exactly to its rounding; the frame is the values plus 2 bytes a block."""
    x = torch.randn(1, 7, width) * torch.logspace(-3, 3, width)  # blocks of very different scales
    x[0, 3, 5] = 0.0
    x[0, 4] = 0.0  # an all-zero position
    payload = TensorPayload.int8_blocks(x)
    msg = decode(encode(Forward("s", 1, 0, payload, None, [])), WireLimits(hidden_size=width))
    back = msg.hidden.to_torch()
    assert back.dtype == torch.float32 and back.shape == x.shape
    blocks = -(-width // INT8_BLOCK)
    assert len(payload.data) == payload_bytes(INT8_BLOCKS, x.shape) == 7 * width + 7 * blocks * 2
    pad = blocks * INT8_BLOCK - width
    step = (torch.nn.functional.pad(x, (0, pad)).reshape(1, 7, blocks, INT8_BLOCK).abs().amax(-1, keepdim=True) / 127)
    step = step.half().float().expand(1, 7, blocks, INT8_BLOCK).reshape(1, 7, -1)[..., :width]
    assert bool(((back - x).abs() <= step / 2 * 1.001 + 1e-30).all())
    assert bool((back[0, 4] == 0).all())
    rel = ((back - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12))[0]
    assert float(rel[[0, 1, 2, 3, 5, 6]].max()) < 0.02


def test_int8_blocks_are_checked_like_any_hidden_payload():
    good = TensorPayload.int8_blocks(torch.randn(1, 2, 64))
    short_data = TensorPayload(INT8_BLOCKS, (1, 2, 64), good.data[:-1])
    with pytest.raises(WireError) as e:
        decode(encode(Forward("s", 1, 0, short_data, None, [])), WireLimits(hidden_size=64))
    assert e.value.code == "bad_shape"
    mask = TensorPayload(INT8_BLOCKS, (2, 2), b"\x01" * 8)  # only hidden states may travel as int8 blocks
    with pytest.raises(WireError) as e:
        decode(encode(Forward("s", 1, 0, good, mask, [])), WireLimits(hidden_size=64))
    assert e.value.code == "bad_dtype"
    with pytest.raises(WireError) as e:
        decode(encode(OpenSession("s", "m", 0, 1, 8, None, None, "float32", "w", None, "int4")), WireLimits())
    assert e.value.code == "malformed"
    assert OpenSession("s", "m", 0, 1, 8, None, None, "float32", "w").wire == "exact"  # lossless unless asked
