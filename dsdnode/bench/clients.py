"""`dsdnode bench --clients 1,2,4,8`: many clients at once on a local swarm, batching on and off.

Two LocalSwarms run side by side, one per server setting (batching on; off: `--no-batching` on every
server). For each client count N, N clients start generating at the same moment (a wave) on the
batching swarm, then N on the other, so both settings see about the same machine load; each
with its own libp2p node (its own peer id, as separate users would be) and its own ClientService,
all sharing this process's client models. Client i answers prompt i, so every wave repeats the same
prompts. A wave's aggregate tok/s is all its new tokens over its wall time (first start to last end,
prefill included); a client's own tok/s is its decode rate (as in the main bench). Tokens of each
prompt are compared with its first run in the bench (greedy: they match unless a bf16 near-tie
flips, see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from ..client.loading import load_client_models
from ..client.local import split_layers
from ..client.service import ClientService, SwarmChains
from ..devices import describe
from ..local_swarm import LocalSwarm
from ..net.latency import LinkLatency
from ..net.p2p import P2PNode
from ..dtypes import dtype_name
from .machine import machine_info
from .modes import parse_mode
from .report import fmt_cell, mean_or_none, write_json
from .datasets import DEFAULT_GSM8K_STYLE, GSM8K_STYLES
from .runner import ROUTE_WAIT_S, WARMUP_TOKENS, exit_on_signal, load_prompts
from ..errors import BadValue, PeerError


WARMUP_PROMPT_TOKENS = 16


@dataclass(frozen=True)
class ClientsConfig:
    out: Path
    clients: tuple[int, ...] = (1, 2, 4, 8)
    model: str = "qwen2.5-coder-1.5b"
    draft: str = "qwen2.5-coder-0.5b"
    servers: int = 4
    latency_ms: float = 50.0
    datasets: tuple[str, ...] = ("humaneval", "gsm8k")
    gsm8k_style: str = DEFAULT_GSM8K_STYLE  # how GSM8K answers are asked for (bench/datasets.py)
    max_new_tokens: int = 48
    mode: str = "dsd-auto"
    threads: int = 1  # torch threads of each server process
    client_threads: int = 1  # torch threads of this process (every client)
    dtype: str = "bfloat16"
    device: str = "auto"
    k_max: int = 8
    batching: tuple[bool, ...] = (True, False)
    draft_int8: bool | None = None  # None: the device's default (models/compression.py)
    draft_vocab: int | None = None

    def __post_init__(self) -> None:
        if not self.clients or min(self.clients) < 1:
            raise BadValue("--clients must list client counts >= 1, e.g. 1,2,4,8")
        if self.servers < 1 or self.max_new_tokens < 2 or self.latency_ms < 0:
            raise BadValue("--servers must be >= 1, --max-new-tokens >= 2 and the latency >= 0 ms")
        if parse_mode(self.mode).kind != "swarm":
            raise BadValue(f"mode {self.mode} does not run on the swarm")
        if self.gsm8k_style not in GSM8K_STYLES:
            raise BadValue(f"--gsm8k-style must be one of {', '.join(GSM8K_STYLES)}")


@dataclass
class ClientRecord:
    batching: bool
    clients: int
    client: int
    dataset: str
    problem_id: str
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    start_s: float = 0.0  # from the start of its wave
    end_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens_per_s: float = 0.0  # decode
    rounds: int = 0
    mean_accepted: float = 0.0
    mean_k: float = 0.0
    hops: int = 0
    failovers: int = 0
    same_tokens_as_first_run: bool | None = None
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks."""
    if not values:
        return None
    xs = sorted(values)
    at = (len(xs) - 1) * q / 100
    lo, hi = math.floor(at), math.ceil(at)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


@dataclass
class ClientsRun:
    config: ClientsConfig
    command: str
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    records: list[ClientRecord] = field(default_factory=list)
    waves: list[dict] = field(default_factory=list)  # wall time and machine load of each wave
    errors: list[str] = field(default_factory=list)

    def run(self) -> Path:
        c = self.config
        c.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(c.client_threads)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, exit_on_signal)  # a killed run still stops its swarm and saves
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.status = "running"
        self.machine = machine_info()
        self.first_tokens: dict[int, list[int]] = {}
        try:
            self.client = load_client_models(c.model, c.draft, c.dtype, c.device, c.draft_int8, c.draft_vocab)
            self.machine["device"] = describe(self.client.device)
            per_dataset = math.ceil(max(c.clients) / len(c.datasets))
            self.prompts = load_prompts(self.client.tokenizer, c.datasets, per_dataset, c.gsm8k_style)[:max(c.clients)]
            self._run_swarms()
            self.status = "done"
        except BaseException as e:
            self.status = f"failed: {type(e).__name__}: {e}"
            raise
        finally:
            self._save()
        return c.out

    def _run_swarms(self) -> None:
        """One swarm per batching setting, all up at once: waves alternate between them (N clients
        with batching on, then N with it off, ...), so both settings see the same machine load."""
        c = self.config
        n_layers = self.client.head.config.num_hidden_layers
        with contextlib.ExitStack() as stack:
            swarms = {}
            for batching in c.batching:
                workdir = c.out / "swarm" / ("batching" if batching else "no-batching")
                extra = ["--device", c.device, *([] if batching else ["--no-batching"])]
                self.log(f"[batching {'on' if batching else 'off'}] starting {c.servers} servers (logs: {workdir})")
                swarms[batching] = stack.enter_context(LocalSwarm(
                    c.model, split_layers(n_layers, c.servers), workdir, link_latency_ms=c.latency_ms,
                    threads=c.threads, dtype=dtype_name(self.client.dtype), extra_args=extra))
            asyncio.run(self._clients(swarms))

    async def _clients(self, swarms: dict[bool, LocalSwarm]) -> None:
        c = self.config
        nodes = {batching: await asyncio.gather(*(
            P2PNode.start(bootstrap=swarm.bootstrap_addrs, latency=LinkLatency(c.latency_ms), client=True)
            for _ in range(max(c.clients)))) for batching, swarm in swarms.items()}
        try:
            for mine in nodes.values():
                await self._warm_up(mine)
            for n in c.clients:
                for batching, mine in nodes.items():
                    await self._wave(mine[:n], batching)
                    self._save()
        finally:
            await asyncio.gather(*(node.stop() for mine in nodes.values() for node in mine), return_exceptions=True)

    def _service(self, node: P2PNode) -> ClientService:
        """A fresh client (its own draft-length controller) on its own node."""
        cl = self.client
        return ClientService(cl, SwarmChains(self.config.model, cl.head.config, [], cl.dtype, weights=cl.weights,
                                                 node=node))

    async def _warm_up(self, nodes: list[P2PNode]) -> None:
        """Until every client finds a full chain: a short untimed generation each, all at once, after
        a few prompt tokens (it only opens connections)."""
        deadline = time.monotonic() + ROUTE_WAIT_S
        options = parse_mode(self.config.mode).options(WARMUP_TOKENS, self.config.k_max)

        async def warm(node: P2PNode) -> None:
            while True:
                try:
                    await self._service(node).generate(self.prompts[0].ids[:WARMUP_PROMPT_TOKENS], options)
                    return
                except Exception as e:
                    if time.monotonic() > deadline:
                        raise PeerError(f"no working chain after {ROUTE_WAIT_S:.0f} s: {e}") from None
                    await asyncio.sleep(2)
        await asyncio.gather(*(warm(node) for node in nodes))

    async def _wave(self, nodes: list[P2PNode], batching: bool) -> None:
        n = len(nodes)
        load = os.getloadavg()[0]
        t0 = time.monotonic()
        recs = await asyncio.gather(*(self._one(self._service(node), i, n, batching, t0)
                                      for i, node in enumerate(nodes)))
        wall = time.monotonic() - t0
        self.records.extend(recs)
        self.waves.append({"clients": n, "batching": batching, "wall_s": wall, "loadavg_1m_before": load,
                           "loadavg_1m_after": os.getloadavg()[0]})
        row = self.rows()[-1]
        self.log(f"[batching {'on' if batching else 'off'}] {n} clients: {fmt_cell(row['aggregate_tokens_per_s'])} tok/s "
                 f"aggregate, per client p50 {fmt_cell(row['per_client_tokens_per_s_p50'])} "
                 f"p95 {fmt_cell(row['per_client_tokens_per_s_p95'])}, {wall:.1f} s, load {load:.2f}")

    async def _one(self, service: ClientService, i: int, n: int, batching: bool, t0: float) -> ClientRecord:
        c, p = self.config, self.prompts[i]
        rec = ClientRecord(batching, n, i, p.problem.dataset, p.problem.id, len(p.ids))
        try:
            rec.start_s = time.monotonic() - t0
            out = await service.generate(p.ids, parse_mode(c.mode).options(c.max_new_tokens, c.k_max))
            rec.end_s = time.monotonic() - t0
            r = out.result
            rec.tokens, rec.prefill_s, rec.decode_s, rec.tokens_per_s = r.tokens, r.prefill_s, r.decode_s, r.tokens_per_s
            rec.rounds, rec.mean_accepted, rec.mean_k = len(r.rounds), r.mean_accepted, r.mean_k
            rec.hops, rec.failovers = len(out.route), out.failovers
            first = self.first_tokens.setdefault(i, r.tokens)
            rec.same_tokens_as_first_run = first == r.tokens
        except Exception as e:
            rec.end_s = time.monotonic() - t0
            rec.error = f"{type(e).__name__}: {e}"
            self.log(f"client {i} of {n}: {rec.error}")
        return rec

    # ---- output -----------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """One aggregate row per wave (client count x batching)."""
        out = []
        for w in self.waves:
            mine = [r for r in self.records if r.clients == w["clients"] and r.batching == w["batching"]]
            ok = [r for r in mine if r.error is None]
            rates = [r.tokens_per_s for r in ok]
            compared = [r.same_tokens_as_first_run for r in ok if r.same_tokens_as_first_run is not None]
            tokens = sum(len(r.tokens) for r in ok)
            out.append({
                "clients": w["clients"], "batching": w["batching"], "errors": len(mine) - len(ok),
                "tokens": tokens, "wall_s": w["wall_s"],
                "aggregate_tokens_per_s": tokens / w["wall_s"] if w["wall_s"] > 0 else None,
                "per_client_tokens_per_s_p50": statistics.median(rates) if rates else None,
                "per_client_tokens_per_s_p95": percentile(rates, 95),
                "per_client_tokens_per_s_min": min(rates, default=None),
                "accepted_per_round": mean_or_none([r.mean_accepted for r in ok]),
                "mean_k": mean_or_none([r.mean_k for r in ok]),
                "failovers": sum(r.failovers for r in ok),
                "same_tokens": f"{sum(compared)}/{len(compared)}",
                "loadavg_1m_before": w["loadavg_1m_before"], "loadavg_1m_after": w["loadavg_1m_after"],
            })
        return out

    def targets(self, rows: list[dict]) -> list[dict]:
        """The issue's targets for each batching setting: aggregate at the most clients vs one client,
        and the median client at the most clients vs one client alone."""
        out = []
        for batching in self.config.batching:
            mine = {r["clients"]: r for r in rows if r["batching"] == batching}
            if 1 not in mine or len(mine) < 2:
                continue
            most = mine[max(mine)]
            one = mine[1]
            agg = _ratio(most["aggregate_tokens_per_s"], one["aggregate_tokens_per_s"])
            p50 = _ratio(most["per_client_tokens_per_s_p50"], one["per_client_tokens_per_s_p50"])
            out.append({"batching": batching, "clients": most["clients"], "aggregate_vs_one_client": agg,
                        "p50_client_vs_one_client": p50})
        return out

    def meta(self) -> dict:
        c = self.config
        return {"command": self.command, "date": getattr(self, "started", ""), "status": getattr(self, "status", ""),
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "settings": {**asdict(c), "out": str(c.out)}, "machine": getattr(self, "machine", {}),
                "errors": self.errors,
                "notes": ["every server process and every client shares this machine's cores (and other agents' "
                          "work: see loadavg per wave); all clients run in this one process (one asyncio task "
                          f"and one libp2p node each, {c.client_threads} torch thread per operation)",
                          "aggregate tok/s: new tokens of all clients of a wave / the wave's wall time (prefill "
                          "included); per-client tok/s: decode rate of each client"]}

    def _save(self) -> None:
        rows = self.rows()
        meta = self.meta()
        out = self.config.out
        write_json(out / "results.json", {**meta, "aggregates": rows, "targets": self.targets(rows),
                                          "waves": self.waves, "clients": [asdict(r) for r in self.records]})
        (out / "results.md").write_text(self.markdown(meta, rows))

    def markdown(self, meta: dict, rows: list[dict]) -> str:
        m, c = meta.get("machine", {}), self.config
        client = getattr(self, "client", None)
        compression = client.draft_compression.describe() if client is not None else "not loaded"
        lines = ["# dsdnode bench --clients results", "",
                 f"- command: `{meta['command']}`",
                 f"- date: {meta['date']} (status: {meta['status']})",
                 f"- machine: {m.get('cpu_model')}, {m.get('cpu_count')} cores, {m.get('mem_total_gib')} GiB, "
                 f"torch {m.get('torch')}, transformers {m.get('transformers')}",
                 f"- model {c.model} over {c.servers} server processes ({c.threads} torch thread each), draft "
                 f"{c.draft} ({compression}), {c.mode}, dtype {c.dtype}, greedy, {c.max_new_tokens} new tokens "
                 "per client, "
                 f"{c.latency_ms:g} ms links",
                 *[f"- {note}" for note in meta["notes"]], "", "## Waves", "",
                 "| batching | clients | aggregate tok/s | per-client tok/s p50 | p95 | min | accepted/round "
                 "| mean k | failovers | same tokens | wall s | load 1m before/after | errors |",
                 "|" + "---|" * 13]
        for r in rows:
            lines.append(f"| {'on' if r['batching'] else 'off'} | {r['clients']} | {fmt_cell(r['aggregate_tokens_per_s'])} "
                         f"| {fmt_cell(r['per_client_tokens_per_s_p50'])} | {fmt_cell(r['per_client_tokens_per_s_p95'])} "
                         f"| {fmt_cell(r['per_client_tokens_per_s_min'])} | {fmt_cell(r['accepted_per_round'])} "
                         f"| {fmt_cell(r['mean_k'])} | {r['failovers']} | {r['same_tokens']} | {r['wall_s']:.1f} "
                         f"| {r['loadavg_1m_before']:.2f}/{r['loadavg_1m_after']:.2f} | {r['errors']} |")
        targets = self.targets(rows)
        if targets:
            lines += ["", "## Targets", "", "| batching | clients | aggregate vs 1 client (target >= 4x) "
                          "| p50 client vs 1 client alone (target >= 0.5x) |", "|---|---|---|---|"]
            for t in targets:
                lines.append(f"| {'on' if t['batching'] else 'off'} | {t['clients']} "
                             f"| {fmt_cell(t['aggregate_vs_one_client'], '.2f', 'x')} "
                             f"| {fmt_cell(t['p50_client_vs_one_client'], '.2f', 'x')} |")
        return "\n".join(lines) + "\n"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None
