"""Benchmark records, their aggregates, and the two files a run leaves: results.json and results.md.

One PromptResult per (link latency, problem, mode). Aggregates are recomputed from the records
every time they are written, so a run that dies half way still leaves consistent files.
Speedup is given two ways, both against the baseline mode of the same run and latency:
the ratio of median tokens/s, and the median over prompts of each prompt's own ratio.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .modes import BASELINE, RELAY_BASELINE


@dataclass
class TimeSplit:
    """Where a generation's decode time went (seconds). link: rounds x links a round x latency;
    compute: the servers' reported compute; draft: drafting on the critical path; overhead: the rest
    (client head and verification, serialization, the transport's own cost, scheduling)."""

    link_s: float = 0.0
    compute_s: float = 0.0
    draft_s: float = 0.0
    overhead_s: float = 0.0


@dataclass
class Divergence:
    """Where a lossless mode first left the baseline's tokens, and how close the target was there:
    the target re-run on the prompt + the baseline's tokens before that position (one block through
    the swarm). A top-2 gap of about one bf16 step is a near-tie (block and single-token matmuls
    round differently); anything larger is a bug."""

    position: int
    baseline_token: int
    mode_token: int
    top2_gap: float  # largest minus second-largest target logit there
    baseline_minus_mode: float  # target logit of the baseline's token minus that of the mode's


@dataclass
class PromptResult:
    latency_ms: float
    dataset: str
    problem_id: str
    index: int
    mode: str
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens_per_s: float = 0.0
    rounds: int = 0
    mean_accepted: float = 0.0  # accepted drafts per round
    mean_k: float = 0.0
    tokens_per_round: float = 0.0  # accepted drafts + the bonus token
    ks: list[int] = field(default_factory=list)  # k of every round, in order
    accepted: list[int] = field(default_factory=list)  # accepted drafts of every round
    widths: list[int] = field(default_factory=list)  # tree width of every round (1: a chain; depth is k)
    nodes: list[int] = field(default_factory=list)  # tree nodes sent every round (drafts and lookups)
    draft_ms: list[float] = field(default_factory=list)  # drafting on the critical path, every round
    predrafted: list[int] = field(default_factory=list)  # drafts of every round drafted in the last one's wait
    ahead: list[str] = field(default_factory=list)  # where every round's tree came from (RoundStats.ahead)
    rejections: list[int] = field(default_factory=list)  # rejection outcomes drafted ahead in every round's wait
    rejection_hits: list[bool] = field(default_factory=list)  # every round: it ended in one of them
    round_ms: list[float] = field(default_factory=list)  # wall time of every round
    warm_start: bool = False  # the draft-length controller began with a round cost learned on earlier prompts
    n_hops: int = 0
    n_links: int = 0  # links crossed per round
    ttft_s: float = 0.0  # time to first token: prefill and the first round
    prefill_chunk: int = 0  # positions per prefill block
    prefill_bytes: int = 0  # the prompt's blocks on each link
    block_bytes: list[int] = field(default_factory=list)  # every round's block on each link
    reply_bytes: list[int] = field(default_factory=list)  # every round: bytes back to the client (all hops' copies)
    split: TimeSplit = field(default_factory=TimeSplit)
    stopped: str = ""
    identical_to_baseline: bool | None = None
    divergence: Divergence | None = None
    passed: bool | None = None
    verdict: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptResult:
        """A record as results.json holds it (what `asdict` wrote)."""
        rec = cls(**{k: v for k, v in data.items() if k not in ("split", "divergence")})
        rec.split = TimeSplit(**data["split"])
        rec.divergence = Divergence(**data["divergence"]) if data.get("divergence") else None
        return rec


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def mean_or_none(values: list[float]) -> float | None:
    """The mean, or None for no values (a table shows it as a dash)."""
    return sum(values) / len(values) if values else None


def aggregate(records: list[PromptResult], modes: list[str]) -> list[dict[str, Any]]:
    """One row per (latency, dataset or "all", mode) that has records."""
    rows = []
    latencies = sorted({r.latency_ms for r in records})
    datasets = list(dict.fromkeys(r.dataset for r in records))
    for lat in latencies:
        for ds in [*datasets, "all"] if len(datasets) > 1 else datasets:
            sel = [r for r in records if r.latency_ms == lat and (ds == "all" or r.dataset == ds)]
            base, relay = ({(r.dataset, r.index): r for r in sel if r.mode == m and r.ok}
                           for m in (BASELINE, RELAY_BASELINE))
            for mode in modes:
                mine = [r for r in sel if r.mode == mode]
                if mine:
                    rows.append(_row(lat, ds, mode, mine, base, relay))
    return rows


def _median_ratio(ok: list[PromptResult], base: dict) -> float | None:
    """The median over prompts of tok/s / the same prompt's tok/s in `base` (prompts it has)."""
    return _median([r.tokens_per_s / base[(r.dataset, r.index)].tokens_per_s for r in ok
                    if (r.dataset, r.index) in base and base[(r.dataset, r.index)].tokens_per_s > 0])


def _row(lat: float, ds: str, mode: str, mine: list[PromptResult], base: dict, relay: dict) -> dict[str, Any]:
    ok = [r for r in mine if r.ok]
    tps = _median([r.tokens_per_s for r in ok])
    base_tps = _median([b.tokens_per_s for b in base.values()])
    rounds = sum(r.rounds for r in ok)
    decode = sum(r.decode_s for r in ok)
    split = {name: sum(getattr(r.split, name) for r in ok) for name in asdict(TimeSplit())}
    compared = [r.identical_to_baseline for r in ok if r.identical_to_baseline is not None]
    scored = [r.passed for r in ok if r.passed is not None]
    return {
        "latency_ms": lat, "dataset": ds, "mode": mode, "n": len(mine), "errors": len(mine) - len(ok),
        "tokens_per_s_median": tps,
        "speedup_ratio_of_medians": tps / base_tps if tps and base_tps else None,
        "speedup_median_of_ratios": _median_ratio(ok, base),
        "vs_relay_median_of_ratios": _median_ratio(ok, relay),
        "tokens_per_round": sum(len(r.tokens) for r in ok) / rounds if rounds else None,
        "accepted_per_round": sum(r.mean_accepted * r.rounds for r in ok) / rounds if rounds else None,
        "mean_k": sum(r.mean_k * r.rounds for r in ok) / rounds if rounds else None,
        "mean_width": sum(sum(r.widths) for r in ok) / rounds if rounds else None,
        "nodes_per_round": sum(sum(r.nodes) for r in ok) / rounds if rounds else None,
        "draft_ms_per_round": sum(sum(r.draft_ms) for r in ok) / rounds if rounds else None,
        "rounds_mean": mean_or_none([r.rounds for r in ok]),
        "round_ms_mean": 1e3 * decode / rounds if rounds else None,
        "split_fraction": {k: v / decode for k, v in split.items()} if decode > 0 and rounds else None,
        "floor_fraction": (split["link_s"] + split["compute_s"]) / decode if decode > 0 and rounds else None,
        "accuracy": sum(scored) / len(scored) if scored else None,
        "finished": sum(r.stopped == "eos" for r in ok),  # answers that ended before max new tokens
        "identical_to_baseline": all(compared) if compared else None,
        "identical_count": f"{sum(compared)}/{len(compared)}" if compared else None,
        "max_divergence_gap": max((r.divergence.top2_gap for r in ok if r.divergence), default=None),
        "ttft_s_median": _median([r.ttft_s for r in ok if r.ttft_s]),
        "prefill_chunk_median": _median([r.prefill_chunk for r in ok if r.prefill_chunk]),
        "prefill_kb_per_link": mean_or_none([r.prefill_bytes / 1e3 for r in ok if r.prefill_bytes]),
        "round_kb_per_link": sum(sum(r.block_bytes) for r in ok) / 1e3 / rounds if rounds else None,
        "round_kb_to_client": sum(sum(r.reply_bytes) for r in ok) / 1e3 / rounds if rounds else None,
        **_drafted_ahead(ok, rounds),
    }


def _drafted_ahead(ok: list[PromptResult], rounds: int) -> dict[str, Any]:
    """What drafting ahead for rejections (SSD, speculative/predraft.py) did: the share of rounds
    that ended in a rejection with branches drafted ahead whose outcome was one of them, and the
    draft time on the critical path of rounds drafted after the reply ("none") and of rounds that
    took a branch ("rejection"); saved per round: that difference times the share of such rounds."""
    tried = [hit for r in ok for k, a, n, hit in zip(r.ks, r.accepted, r.rejections, r.rejection_hits)
             if n and a < k]
    draft = {src: [ms for r in ok for ms, a in zip(r.draft_ms, r.ahead) if a == src] for src in ("none", "rejection")}
    fresh, hit = mean_or_none(draft["none"]), mean_or_none(draft["rejection"])
    return {
        "branch_rounds": sum(n > 0 for r in ok for n in r.rejections),  # rounds that drafted ahead for rejections
        "ahead_rounds": {src: sum(a == src for r in ok for a in r.ahead) for src in ("prefill", "accept", "rejection", "none")},
        "rejection_hit_rate": sum(tried) / len(tried) if tried else None,
        "draft_ms_fresh": fresh,
        "draft_ms_after_hit": hit,
        "draft_ms_saved_per_round": (fresh - hit) * len(draft["rejection"]) / rounds
        if fresh is not None and hit is not None and rounds else None,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def results_payload(meta: dict[str, Any], records: list[PromptResult], modes: list[str]) -> dict[str, Any]:
    return {**meta, "aggregates": aggregate(records, modes), "prompts": [asdict(r) for r in records]}


def fmt_cell(value, spec: str = ".2f", suffix: str = "") -> str:
    """A table cell: the value formatted, or a dash for None."""
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    m = meta.get("machine", {})
    s = meta.get("settings", {})
    lines = [
        "# dsdnode bench results", "",
        f"- command: `{meta.get('command', '')}`",
        f"- date: {meta.get('date', '')} (status: {meta.get('status', '')})",
        f"- machine: {m.get('cpu_model')}, {m.get('cpu_count')} cores, {m.get('mem_total_gib')} GiB, "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}",
        f"- model {s.get('model')} over {s.get('servers')} spans x {s.get('replicas', 1)} server processes "
        f"({s.get('threads')} torch thread each), "
        f"draft {s.get('draft')} ({s.get('draft_compression', 'uncompressed')}) on the client "
        f"({s.get('client_threads')} torch thread), dtype {s.get('dtype')}, "
        f"greedy, max {s.get('max_new_tokens')} new tokens"
        + (f", GSM8K asked for {s.get('gsm8k_style', 'unrecorded')} answers" if "gsm8k" in s.get("datasets", ()) else ""),
        *([f"- the last {s['relayed']} server(s) reached only through a relay (`--relayed`): each relayed link "
           "costs two emulated latencies; the split below counts it as one (the rest lands in overhead)"]
          if s.get("relayed") else []),
        *([f"- resumed: {len(meta['sessions'])} sessions ("
           + "; ".join(f"{x['started']} on {x['machine'].get('hostname')}" for x in meta["sessions"])
           + "); each prompt's modes ran in one session"] if len(meta.get("sessions", [])) > 1 else []),
        "- every process shares the same cores: drafting overlaps only the emulated latency, not server compute",
        "- accuracy: of every answer, also those cut at max new tokens; (n/m ended): answers that ended by themselves",
        "- tok/s: decode only (prefill excluded; hf-assisted: generate() minus a separately timed prefill)",
        "- speedup: vs ar-push, as ratio of median tok/s / median of per-prompt ratios; "
        "vs ar-relay: median of per-prompt ratios (where ar-relay ran)",
        *([f"- WAN profile `{s['wan']}` (`--wan`): per-pair delays from a city RTT matrix, jitter, uplink caps "
           "(dsdnode/net/wan.py); the latency in headings is its mean one-way delay, and the split's link share "
           "counts it"] if s.get("wan") else []),
        f"- prefill: {'pipelined (chunks back to back)' if s.get('prefill_pipeline', True) else 'chunk by chunk'}; "
        "TTFT: prefill and the first round; bytes: frames on the wire (each link carries a round's block once, "
        "and every hop also sends the client a copy of its output)",
        "- split: link (rounds x links x latency) / server compute / draft / client overhead, % of decode time; "
        "floor: link + compute",
        "",
    ]
    for lat in sorted({r["latency_ms"] for r in rows}):
        for ds in dict.fromkeys(r["dataset"] for r in rows if r["latency_ms"] == lat):
            lines += [f"## link latency {lat:g} ms, {ds}", "",
                      "| mode | n (err) | tok/s | speedup (medians) | speedup (median ratio) | vs ar-relay "
                      "| tokens/round | accepted/round | mean k | width | nodes/round | draft ms/round | rounds "
                      "| round ms | link/compute/draft/overhead % | floor % | accuracy | identical "
                      "| max top-2 gap at a divergence |",
                      "|" + "---|" * 19]
            for r in rows:
                if r["latency_ms"] != lat or r["dataset"] != ds:
                    continue
                sp = r["split_fraction"]
                split = "/".join(f"{100 * sp[k]:.0f}" for k in ("link_s", "compute_s", "draft_s", "overhead_s")) \
                    if sp else "–"
                lines.append(
                    f"| {r['mode']} | {r['n']} ({r['errors']}) | {fmt_cell(r['tokens_per_s_median'])} "
                    f"| {fmt_cell(r['speedup_ratio_of_medians'], '.2f', 'x')} "
                    f"| {fmt_cell(r['speedup_median_of_ratios'], '.2f', 'x')} "
                    f"| {fmt_cell(r['vs_relay_median_of_ratios'], '.2f', 'x')} | {fmt_cell(r['tokens_per_round'])} "
                    f"| {fmt_cell(r['accepted_per_round'])} | {fmt_cell(r['mean_k'])} | {fmt_cell(r['mean_width'])} "
                    f"| {fmt_cell(r['nodes_per_round'], '.1f')} | {fmt_cell(r['draft_ms_per_round'], '.0f')} "
                    f"| {fmt_cell(r['rounds_mean'], '.1f')} "
                    f"| {fmt_cell(r['round_ms_mean'], '.0f')} | {split} "
                    f"| {fmt_cell(None if r['floor_fraction'] is None else 100 * r['floor_fraction'], '.0f')} "
                    f"| {fmt_cell(None if r['accuracy'] is None else 100 * r['accuracy'], '.0f', '%')} "
                    f"({r['finished']}/{r['n'] - r['errors']} ended) "
                    f"| {r['identical_count'] or '–'} | {fmt_cell(r['max_divergence_gap'], '.3f')} |")
            lines += ["", "| mode | TTFT s (median) | prefill chunk | prefill kB per link | kB per round per link "
                          "| kB per round back to the client |", "|" + "---|" * 6]
            lines += [f"| {r['mode']} | {fmt_cell(r['ttft_s_median'])} | {fmt_cell(r['prefill_chunk_median'], '.0f')} "
                      f"| {fmt_cell(r['prefill_kb_per_link'], '.1f')} | {fmt_cell(r['round_kb_per_link'], '.1f')} "
                      f"| {fmt_cell(r['round_kb_to_client'], '.1f')} |"
                      for r in rows if r["latency_ms"] == lat and r["dataset"] == ds and r.get("ttft_s_median")]
            ahead = [r for r in rows if r["latency_ms"] == lat and r["dataset"] == ds and r.get("rejection_hit_rate") is not None]
            if ahead:
                lines += ["", "| mode | rounds whose tree was drafted ahead: prefill / accept / rejection / after the reply "
                              "| rounds drafting ahead for rejections | rejection hit rate | draft ms after the reply "
                              "| draft ms after a hit | draft ms saved per round |",
                          "|" + "---|" * 7]
                lines += [f"| {r['mode']} | {' / '.join(str(r['ahead_rounds'][k]) for k in ('prefill', 'accept', 'rejection', 'none'))} "
                          f"| {r.get('branch_rounds', '–')} "
                          f"| {fmt_cell(100 * r['rejection_hit_rate'], '.0f', '%')} | {fmt_cell(r['draft_ms_fresh'], '.0f')} "
                          f"| {fmt_cell(r['draft_ms_after_hit'], '.0f')} | {fmt_cell(r['draft_ms_saved_per_round'], '.0f')} |"
                          for r in ahead]
            lines.append("")
    return "\n".join(lines)
