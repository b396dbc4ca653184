"""`dsdnode bench`: a real local swarm per link latency, every mode on every prompt, scored.

For each latency: start a LocalSwarm (bootstrap peer + server processes, each with the emulated
latency on its outbound links), join it from this process with one P2PNode (same latency), then
for each prompt run every mode in turn -- baseline first, so each later mode is checked against
its tokens at once -- and score each completion. Results are saved after every prompt, and a
failing prompt (or a swarm that will not start) is recorded with its error while the run goes on.

A run cut short (killed, out of time) is continued with `resume`: the prompts it finished in every
mode are kept, the rest run again, so each prompt's ratios still come from one session. Resuming
needs the same settings and the same dsdnode source (`source_digest`); each session's machine and
start are recorded.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from ..client.generate import GenerationResult
from ..client.loading import load_client_models
from ..client.local import split_layers
from ..client.service import ClientService, SwarmChains
from ..client.standing import TrustSettings
from ..devices import describe
from ..models.fetch import resolve_model_dir
from ..net.latency import LinkLatency
from ..net.p2p import P2PNode
from ..dtypes import dtype_name
from ..net.wan import load_profile
from .accuracy import evaluate
from .datasets import DEFAULT_GSM8K_STYLE, GSM8K_STYLES, Problem, format_prompt, load_dataset
from .machine import machine_info, source_digest
from .modes import BASELINE, DEFAULT_MODES, Mode, parse_modes
from .plots import write_plots
from .report import Divergence, PromptResult, TimeSplit, aggregate, markdown, results_payload, write_json
from ..local_swarm import LocalSwarm
from ..errors import BadValue, PeerError

WARMUP_TOKENS = 4
DIVERGENCE_BLOCK = 64  # positions per pass when re-running the target at a divergence (a server's default max_block)
ROUTE_WAIT_S = 60.0  # servers announce every 2 s; give the DHT time to show every span


class BenchResumeError(BadValue):
    """A run cannot be resumed: nothing saved there, or other settings or code."""


@dataclass(frozen=True)
class BenchConfig:
    out: Path
    model: str = "qwen2.5-coder-1.5b"
    draft: str = "qwen2.5-coder-0.5b"
    servers: int = 4
    replicas: int = 1  # servers per span (auditing needs a second server for a span)
    latencies_ms: tuple[float, ...] = (50.0,)
    datasets: tuple[str, ...] = ("humaneval", "gsm8k")
    gsm8k_style: str = DEFAULT_GSM8K_STYLE  # how GSM8K answers are asked for (bench/datasets.py)
    prompts: int = 20
    max_new_tokens: int = 96
    modes: tuple[str, ...] = DEFAULT_MODES
    threads: int = 1  # torch threads of each server process
    client_threads: int = 1  # torch threads of this (client) process
    dtype: str = "bfloat16"
    device: str = "auto"  # of the client and of every server process
    relayed: int = 0  # the last N servers are reached only through a relay (LocalSwarm `relayed`)
    k_max: int = 8
    tau: float = 0.3
    draft_int8: bool | None = None  # None: the device's default (models/compression.py)
    draft_vocab: int | None = None
    wan: str | None = None  # a WAN profile (net/wan.py) or its TOML file; replaces latencies_ms
    prefill_pipeline: bool = True  # False: each prompt chunk waits for the one before (to compare TTFT)
    wire: str = "exact"  # hidden states between hops in every mode: exact, or int8 (lossy; net/wire.py)

    def __post_init__(self) -> None:
        if self.wan is not None:
            load_profile(self.wan)  # a bad profile: one error before any work
        if self.servers < 1 or self.replicas < 1 or self.prompts < 1 or self.max_new_tokens < 2:
            raise BadValue("--servers, --replicas and --prompts must be >= 1 and --max-new-tokens >= 2")
        if not self.latencies_ms or any(lat < 0 for lat in self.latencies_ms):
            raise BadValue("link latencies must be >= 0 ms")
        if not set(self.datasets) <= {"humaneval", "gsm8k"} or not self.datasets:
            raise BadValue(f"unknown dataset in {self.datasets}")
        if self.gsm8k_style not in GSM8K_STYLES:
            raise BadValue(f"--gsm8k-style must be one of {', '.join(GSM8K_STYLES)}")
        if self.threads < 1 or self.client_threads < 1:
            raise BadValue("thread counts must be >= 1")
        if not 0 <= self.relayed <= self.servers:
            raise BadValue(f"--relayed must be in 0..{self.servers} (the number of servers)")
        parse_modes(",".join(self.modes))


@dataclass
class _Prompt:
    problem: Problem
    index: int
    ids: list[int]


@dataclass
class BenchRun:
    config: BenchConfig
    command: str
    resume: bool = False  # continue the run saved in config.out (see the module docstring)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    records: list[PromptResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # one per block path (push, relay), like a client serving many requests: each carries its trained
    # draft-length controllers from prompt to prompt; a new swarm (latency) starts them afresh
    services: dict[bool, ClientService] = field(default_factory=dict)

    def __post_init__(self) -> None:
        modes = parse_modes(",".join(self.config.modes))
        self.modes = sorted(modes, key=lambda m: m.name != BASELINE)  # baseline first: checked against at once
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.status = "running"
        self.code = source_digest()
        self.sessions: list[dict] = []  # every session of this run: its start and machine
        self.done: set[tuple[float, str, int]] = set()  # (latency, dataset, index) finished in every mode

    # ---- driver -------------------------------------------------------------------------
    def run(self) -> Path:
        c = self.config
        c.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(c.client_threads)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, exit_on_signal)  # a killed run still stops its swarm and saves
        self.machine = machine_info()
        command_line = self.command
        if self.resume:
            self._restore()
        self.sessions.append({"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "command": command_line, "machine": self.machine})
        self.t0 = time.monotonic()
        try:
            self.client = load_client_models(c.model, c.draft, c.dtype, c.device, c.draft_int8, c.draft_vocab)
            self.machine["device"] = describe(self.client.device)
            self.prompts = self._load_prompts()
            self.hf = self._load_hf() if any(m.kind == "hf" for m in self.modes) else None
            self.total = len(self.modes) * sum(1 for lat in c.latencies_ms for p in self.prompts
                                               if (lat, p.problem.dataset, p.index) not in self.done)
            self._save()
            for lat in c.latencies_ms:
                self._run_latency(lat)
            self.status = "done"
        except (SystemExit, KeyboardInterrupt) as e:  # stopped on purpose: the saved prompts stand
            self.status = f"stopped ({type(e).__name__}: {e}); continue it with --resume"
            raise
        except BaseException as e:
            self.status = f"failed: {type(e).__name__}: {e}"
            raise
        finally:
            self._save(plots=True)
        return c.out

    def _restore(self) -> None:
        """Take over the prompts a saved run finished in every mode (see the module docstring)."""
        path = self.config.out / "results.json"
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            raise BenchResumeError(f"nothing to resume: {path} does not exist") from None
        except (OSError, ValueError) as e:
            raise BenchResumeError(f"cannot resume from {path}: {e}") from None
        mine = json.loads(json.dumps(self._settings()))
        theirs = {k: v for k, v in saved.get("settings", {}).items() if k != "draft_compression"}
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise BenchResumeError(f"cannot resume {path}: it ran with other settings ({', '.join(diff)})")
        if saved.get("code") != self.code:
            raise BenchResumeError(f"cannot resume {path}: it ran other dsdnode code ({saved.get('code')}, "
                                   f"this is {self.code})")
        records = [PromptResult.from_dict(r) for r in saved.get("prompts", [])]
        names = {m.name for m in self.modes}
        by_prompt: dict[tuple[float, str, int], list[PromptResult]] = {}
        for r in records:
            by_prompt.setdefault((r.latency_ms, r.dataset, r.index), []).append(r)
        self.done = {key for key, recs in by_prompt.items() if {r.mode for r in recs if r.ok} >= names}
        self.records = [r for r in records if (r.latency_ms, r.dataset, r.index) in self.done]
        self.errors = list(saved.get("errors", []))
        self.started, self.sessions = saved.get("date", self.started), list(saved.get("sessions", []))
        self.command = saved.get("command", self.command)  # the run's; each session's is in `sessions`
        self.log(f"resuming {path}: {len(self.done)} prompt(s) done in every mode are kept, "
                 f"{len(by_prompt) - len(self.done)} unfinished one(s) run again")

    def _load_prompts(self) -> list[_Prompt]:
        return load_prompts(self.client.tokenizer, self.config.datasets, self.config.prompts, self.config.gsm8k_style)

    def _load_hf(self):
        from .hf import HFAssisted
        c = self.config
        # transformers' own loop, on the CPU as before, in the client's dtype
        return HFAssisted(resolve_model_dir(c.model), resolve_model_dir(c.draft), self.client.dtype)

    def _run_latency(self, lat: float) -> None:
        c = self.config
        if all((lat, p.problem.dataset, p.index) in self.done for p in self.prompts):
            return  # finished in an earlier session
        n_layers = self.client.head.config.num_hidden_layers
        wan = load_profile(c.wan) if c.wan is not None else None
        workdir = c.out / "swarm" / (f"{lat:g}ms" if wan is None else wan.name)
        self.log(f"[{lat:g} ms] starting {c.servers} x {c.replicas} servers over {n_layers} layers of {c.model} "
                 f"{'' if wan is None else 'with WAN profile ' + wan.describe() + ' '}(logs: {workdir})")
        try:
            with LocalSwarm(c.model, split_layers(n_layers, c.servers) * c.replicas, workdir, link_latency_ms=lat,
                            threads=c.threads, dtype=dtype_name(self.client.dtype),
                            extra_args=["--device", c.device], relayed=c.relayed, own_networks=True,
                            wan=wan, wan_seed=0) as swarm:
                asyncio.run(self._client(swarm, lat))
        except Exception as e:
            self.errors.append(f"latency {lat:g} ms: {type(e).__name__}: {e}")
            self.log(f"[{lat:g} ms] FAILED: {e}")

    async def _client(self, swarm: LocalSwarm, lat: float) -> None:
        node = await P2PNode.start(bootstrap=swarm.bootstrap_addrs, client=True, identity=swarm.client_identity,
                                   latency=swarm.client_links or LinkLatency(lat))
        self.services.clear()
        try:
            await self._warm_up(node)
            for p in self.prompts:
                if (lat, p.problem.dataset, p.index) in self.done:
                    continue
                for mode in self.modes:
                    rec = await self._one(node, mode, p, lat)
                    self.records.append(rec)
                    self._progress(rec)
                    self._save()
            self._save(plots=True)
        finally:
            await node.stop()

    async def _warm_up(self, node: P2PNode) -> None:
        """Wait until the DHT shows a full chain, and open the connections once (not timed)."""
        deadline = time.monotonic() + ROUTE_WAIT_S
        kinds = {m.relay for m in self.modes if m.kind == "swarm"}
        for relay in sorted(kinds):
            while True:
                try:
                    await self._generate(node, Mode("warmup", "swarm", relay=relay), self.prompts[0].ids, WARMUP_TOKENS)
                    break
                except Exception as e:
                    if time.monotonic() > deadline:
                        raise PeerError(f"no working chain after {ROUTE_WAIT_S:.0f} s: {e}") from None
                    await asyncio.sleep(2)

    # ---- one prompt in one mode -----------------------------------------------------------
    async def _generate(self, node: P2PNode, mode: Mode, ids: list[int], max_new: int) -> tuple[GenerationResult, int]:
        c, cl = self.config, self.client
        if mode.relay not in self.services:
            # each replica of a span is on a loopback network of its own (own_networks), so replicas
            # audit each other; consider every record (a span's replicas come in several groups)
            chains = SwarmChains(c.model, cl.head.config, [], cl.dtype, weights=cl.weights,
                                 relay=mode.relay, node=node,
                                 trust=TrustSettings(max_records_per_group=c.servers * c.replicas))
            self.services[mode.relay] = ClientService(cl, chains)
        out = await self.services[mode.relay].generate(ids, mode.options(max_new, c.k_max, c.tau, c.prefill_pipeline,
                                                                           c.wire))
        return out.result, len(out.route)

    async def _one(self, node: P2PNode, mode: Mode, p: _Prompt, lat: float) -> PromptResult:
        rec = PromptResult(lat, p.problem.dataset, p.problem.id, p.index, mode.name, prompt_tokens=len(p.ids))
        try:
            if mode.kind == "hf":
                self._fill_hf(rec, p)
            else:
                result, hops = await self._generate(node, mode, p.ids, self.config.max_new_tokens)
                _fill_swarm(rec, result, hops, 2 * hops if mode.relay else hops + 1, lat)
            rec.text = self.client.tokenizer.decode(rec.tokens, skip_special_tokens=True)
            base = next((r for r in self.records if r.mode == BASELINE and r.ok and r.latency_ms == lat
                         and r.dataset == rec.dataset and r.index == rec.index), None)
            if mode.name == BASELINE:
                rec.identical_to_baseline = True
            elif base is not None:
                rec.identical_to_baseline = rec.tokens == base.tokens
                if not rec.identical_to_baseline and mode.lossless and mode.kind == "swarm":
                    rec.divergence = await self._divergence(p.ids, base.tokens, rec.tokens)
            verdict = await asyncio.get_running_loop().run_in_executor(None, evaluate, p.problem, rec.text)
            rec.passed, rec.verdict = verdict.passed, f"{verdict.reason}: {verdict.detail}"[:300]
        except Exception as e:
            rec.error = f"{type(e).__name__}: {e}"
            self.log("".join(traceback.format_exception(e)[-3:]).rstrip())
        return rec

    async def _divergence(self, ids: list[int], base: list[int], mine: list[int]) -> Divergence | None:
        """Re-run the target (through the swarm, one session) on the prompt and the baseline's tokens
        before the first position where `mine` differs; report how close the two tokens were there.
        None when one output is a prefix of the other (they differ only in where an end token fell)."""
        at = next((i for i, (a, b) in enumerate(zip(base, mine)) if a != b), None)
        if at is None:
            return None
        prefix = ids + base[:at]
        head, chain = self.client.head, self.services[False].chains.new_chain()
        await chain.start_session(len(prefix) + 1)
        try:
            for start in range(0, len(prefix), DIVERGENCE_BLOCK):
                out = await chain.forward(head.embed_tokens(prefix[start:start + DIVERGENCE_BLOCK]), start)
        finally:
            await chain.close()
        logits = head.logits(out.hidden[:, -1:])[0]
        top = logits.topk(2).values
        return Divergence(at, base[at], mine[at], float(top[0] - top[1]), float(logits[base[at]] - logits[mine[at]]))

    def _fill_hf(self, rec: PromptResult, p: _Prompt) -> None:
        out = self.hf.generate(p.ids, self.config.max_new_tokens, self.client.eos_ids)
        rec.tokens, rec.prefill_s, rec.decode_s, rec.stopped = out.tokens, out.prefill_s, out.decode_s, out.stopped
        rec.tokens_per_s = len(out.tokens) / out.decode_s

    # ---- output -----------------------------------------------------------------------------
    def _progress(self, rec: PromptResult) -> None:
        done = len(self.records) - len(self.done) * len(self.modes)  # in this session
        elapsed = time.monotonic() - self.t0
        eta = elapsed / done * (self.total - done)
        n = sum(1 for p in self.prompts if p.problem.dataset == rec.dataset)
        what = (f"ERROR {rec.error}" if not rec.ok else
                f"{rec.tokens_per_s:6.2f} tok/s, {len(rec.tokens)} tokens, {rec.rounds} rounds, "
                f"acc/round {rec.mean_accepted:.2f}, same={rec.identical_to_baseline}, passed={rec.passed}")
        self.log(f"[{rec.latency_ms:g} ms] {rec.dataset} {rec.index + 1}/{n} {rec.mode:12} {what} "
                 f"({done}/{self.total}, {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)")

    def _settings(self) -> dict:
        c = self.config
        return {**asdict(c), "out": str(c.out), "modes": [m.name for m in self.modes]}

    def meta(self) -> dict:
        c = self.config
        settings = self._settings()
        if getattr(self, "client", None) is not None:
            settings["draft_compression"] = self.client.draft_compression.describe()
        return {"command": self.command, "date": self.started, "status": self.status,
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "settings": settings, "machine": getattr(self, "machine", {}), "code": self.code,
                "sessions": self.sessions, "errors": self.errors,
                "notes": [f"the client runs in the bench process with {c.client_threads} torch thread(s); each server "
                          f"process uses {c.threads}; all share this machine's cores, so drafting overlaps only "
                          "emulated latency, never server compute",
                          "hf-assisted: transformers assisted generation in this process, decode time = generate() "
                          "minus a separately timed prefill of target and draft"]}

    def _save(self, plots: bool = False) -> None:
        out, names = self.config.out, [m.name for m in self.modes]
        meta = self.meta()
        write_json(out / "results.json", results_payload(meta, self.records, names))
        rows = aggregate(self.records, names)
        (out / "results.md").write_text(markdown(meta, rows))
        if plots:
            write_plots(rows, out)


def load_prompts(tok, datasets: tuple[str, ...], n: int, gsm8k_style: str = DEFAULT_GSM8K_STYLE) -> list[_Prompt]:
    """The first n problems of each dataset, tokenized in the model's chat format, datasets
    interleaved (a cut-short run stays balanced)."""
    template = (lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)) \
        if tok.chat_template else None
    out = []
    for ds in datasets:
        for i, problem in enumerate(load_dataset(ds, n)):
            text = format_prompt(problem, template, gsm8k_style)
            out.append(_Prompt(problem, i, tok(text, add_special_tokens=False)["input_ids"]))
    return sorted(out, key=lambda p: p.index)


def exit_on_signal(signum, frame) -> None:
    """A SIGTERM handler that unwinds (so the swarm's processes are stopped on the way out)."""
    raise SystemExit(f"terminated by signal {signum}")


def _fill_swarm(rec: PromptResult, result: GenerationResult, hops: int, links: int, lat: float) -> None:
    rounds = result.rounds
    rec.tokens, rec.stopped, rec.warm_start = result.tokens, result.stopped, result.warm_start
    rec.prefill_s, rec.decode_s = result.prefill_s, result.decode_s
    rec.tokens_per_s, rec.rounds = result.tokens_per_s, len(rounds)
    rec.mean_accepted, rec.mean_k = result.mean_accepted, result.mean_k
    rec.tokens_per_round = len(result.tokens) / len(rounds) if rounds else 0.0
    rec.ks, rec.accepted = [r.k for r in rounds], [r.accepted for r in rounds]
    rec.widths, rec.nodes = [r.width for r in rounds], [r.nodes for r in rounds]
    rec.draft_ms = [round(1e3 * r.draft_s, 2) for r in rounds]
    rec.predrafted, rec.round_ms = [r.predrafted for r in rounds], [round(1e3 * r.round_s, 2) for r in rounds]
    rec.ahead, rec.rejections = [r.ahead for r in rounds], [r.rejections for r in rounds]
    rec.rejection_hits = [r.rejection_hit for r in rounds]
    rec.n_hops, rec.n_links = hops, links
    rec.ttft_s, rec.prefill_chunk, rec.prefill_bytes = result.first_token_s, result.prefill_chunk, result.prefill_bytes
    rec.block_bytes, rec.reply_bytes = [r.block_bytes for r in rounds], [r.reply_bytes for r in rounds]
    link = len(rounds) * links * lat / 1000
    compute = sum(sum(r.hop_compute_s) for r in rounds)
    draft = sum(r.draft_s for r in rounds)
    rec.split = TimeSplit(link, compute, draft, result.decode_s - link - compute - draft)
