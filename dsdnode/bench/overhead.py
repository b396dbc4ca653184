"""`dsdnode bench --overhead`: the software cost of one hop, apart from compute and link latency.

A block of `positions` hidden states of the model's width goes through chains of 1..N real
`dsdnode start` processes (one layer each, 0 ms emulated latency, loopback) again and again, rolled
back each time so the cache does not grow. What a pass costs beyond the servers' own compute
(each hop stamps its compute around the span's forward) is the software overhead: the client's
frame encode and decode, each hop's decode + encode, Noise and yamux on every link, the
asyncio<->trio bridge on both ends of every link, and scheduling. Its slope over the number of hops
is the cost per hop. The gaps between one hop's send stamp and the next hop's receive stamp are the
transport alone (same machine, same clock). Frame encode/decode and tensor conversion are timed in
this process as well, to split the per-hop cost.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..client.swarm_chain import RemoteChain
from ..local_swarm import LocalSwarm
from ..models.fetch import resolve_model_dir
from ..models.weights import load_config, weights_digest
from ..net.p2p import P2PNode
from ..dtypes import torch_dtype
from ..net.wire import Forward, TensorPayload, WireLimits, decode, encode

ROUTE_WAIT_S = 60.0


@dataclass(frozen=True)
class OverheadConfig:
    out: Path
    model: str = "qwen2.5-coder-1.5b"
    max_hops: int = 6
    positions: int = 8
    passes: int = 40  # timed passes per chain length (after WARMUP_PASSES)
    dtype: str = "bfloat16"


WARMUP_PASSES = 5


@dataclass
class HopsResult:
    hops: int
    pass_ms: float  # median wall time of a pass, client send to client receive
    compute_ms: float  # median of the servers' summed compute
    overhead_ms: float  # median of (pass - compute)
    link_ms: float | None  # median gap between consecutive hops (transport only), None for one hop


@dataclass
class OverheadResult:
    config: dict
    frame_bytes: int
    encode_ms: float  # Forward -> bytes, one frame of the block
    decode_ms: float  # bytes -> Forward, validated
    to_torch_ms: float  # payload -> tensor, and back
    from_torch_ms: float
    chains: list[HopsResult] = field(default_factory=list)
    per_hop_ms: float | None = None  # least-squares slope of overhead_ms over hops
    fixed_ms: float | None = None  # its intercept: the client's own share

    def markdown(self) -> str:
        c = self.config
        lines = ["# per-hop software overhead", "",
                 f"- {c['model']}, a block of {c['positions']} positions in {c['dtype']} (a Forward frame of "
                 f"{self.frame_bytes} bytes), 0 ms emulated latency, loopback, real `dsdnode start` processes, one layer each; "
                 f"{c['passes']} timed passes per chain",
                 f"- in-process, per frame: encode {self.encode_ms:.3f} ms, decode {self.decode_ms:.3f} ms; tensor "
                 f"from_torch {self.from_torch_ms:.3f} ms, to_torch {self.to_torch_ms:.3f} ms",
                 "", "| hops | pass ms | compute ms | pass - compute ms | hop-to-hop link ms |", "|---|---|---|---|---|"]
        for h in self.chains:
            link = "–" if h.link_ms is None else f"{h.link_ms:.2f}"
            lines.append(f"| {h.hops} | {h.pass_ms:.2f} | {h.compute_ms:.2f} | {h.overhead_ms:.2f} | {link} |")
        if self.per_hop_ms is not None:
            lines += ["", f"per hop (slope of pass - compute): {self.per_hop_ms:.2f} ms; "
                          f"fixed (intercept: client + its two links): {self.fixed_ms:.2f} ms"]
        return "\n".join(lines) + "\n"


def _median_ms(fn, repeats: int = 200) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _codec(hidden_size: int, positions: int, dtype: torch.dtype) -> tuple[int, float, float, float, float]:
    block = torch.randn(1, positions, hidden_size).to(dtype)
    payload = TensorPayload.from_torch(block)
    frame = encode(Forward("s" * 32, 1, 100, payload, None, []))
    limits = WireLimits(hidden_size=hidden_size)
    return (len(frame), _median_ms(lambda: encode(Forward("s" * 32, 1, 100, payload, None, []))),
            _median_ms(lambda: decode(frame, limits)), _median_ms(payload.to_torch),
            _median_ms(lambda: TensorPayload.from_torch(block)))


def _slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return b, my - b * mx


async def _measure(swarm: LocalSwarm, c: OverheadConfig, hidden_size: int, dtype: torch.dtype,
                   weights: str) -> list[HopsResult]:
    node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs, client=True)
    out = []
    try:
        for hops in range(1, c.max_hops + 1):
            # a "model" of the first `hops` layers
            chain = RemoteChain(node, c.model, hops, hidden_size, weights=weights, dtype=dtype)
            deadline = time.monotonic() + ROUTE_WAIT_S
            while True:
                try:
                    await chain.start_session(c.positions + 1)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(2)
            if chain.n_hops != hops:
                raise RuntimeError(f"expected a chain of {hops} hops, got {chain.route}")
            walls, computes, links = [], [], []
            try:
                for i in range(WARMUP_PASSES + c.passes):
                    block = torch.randn(1, c.positions, hidden_size).to(dtype)
                    t0 = time.perf_counter()
                    got = await chain.forward(block, 0)
                    wall = time.perf_counter() - t0
                    if i >= WARMUP_PASSES:
                        walls.append(wall)
                        computes.append(sum(got.hop_compute_s))
                        links += got.hop_link_s
            finally:
                await chain.close()
            out.append(HopsResult(hops, 1e3 * statistics.median(walls), 1e3 * statistics.median(computes),
                                  1e3 * statistics.median(w - x for w, x in zip(walls, computes)),
                                  1e3 * statistics.median(links) if links else None))
    finally:
        await node.stop()
    return out


def run_overhead(c: OverheadConfig) -> OverheadResult:
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(c.model)
    config = load_config(model_dir)
    dtype = torch_dtype(c.dtype)
    size, enc, dec, to_t, from_t = _codec(config.hidden_size, c.positions, dtype)
    result = OverheadResult({**asdict(c), "out": str(c.out)}, size, enc, dec, to_t, from_t)
    spans = [(i, i + 1) for i in range(c.max_hops)]
    with LocalSwarm(c.model, spans, c.out / "swarm", dtype=c.dtype) as swarm:
        result.chains = asyncio.run(_measure(swarm, c, config.hidden_size, dtype, weights_digest(model_dir)))
    if len(result.chains) > 1:
        result.per_hop_ms, result.fixed_ms = _slope([h.hops for h in result.chains],
                                                    [h.overhead_ms for h in result.chains])
    c.out.mkdir(parents=True, exist_ok=True)
    (c.out / "overhead.json").write_text(json.dumps(asdict(result), indent=1))
    (c.out / "overhead.md").write_text(result.markdown())
    return result
