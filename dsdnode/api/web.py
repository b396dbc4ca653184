"""The web UI of `dsdnode api`: a swarm dashboard and a chat page at `/`, and the JSON it reads.

The page is static (dsdnode/api/web/: HTML, plain JS, CSS; no CDN, no external fonts, so it works
on an offline machine) and needs no API key to load; everything it shows comes from API routes,
which need the key like every /v1 route when the server has one (the page asks for it on a 401 and
sends it as a Bearer token from then on):

- /v1/swarm: the served model's layer-coverage map, built by the same code as `dsdnode swarm`
  (client/routing.describe_model) through the API's own libp2p node, plus whether a route exists;
- /v1/stats: the client's recent generations (client/metrics.GenerationPoint) for the live charts;
- /v1/chat/completions with `stream: true, dsd_stats: true`: the chat's streamed answer, whose
  closing chunk carries the generation's DSD figures (see Completion.stats)."""

from __future__ import annotations

import asyncio
import time
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from .engine import Engine

PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # served at /ui/NAME
SWARM_STATUS_MAX_AGE_S = 2.0  # several open pages share one survey of the swarm per this interval


def _page_file(name: str) -> bytes:
    return files(__package__).joinpath("web", name).read_bytes()


class SwarmStatus:
    """The served model's coverage map, surveyed at most every SWARM_STATUS_MAX_AGE_S."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._last: tuple[float, dict] | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> dict:
        async with self._lock:
            if self._last is None or time.monotonic() - self._last[0] > SWARM_STATUS_MAX_AGE_S:
                self._last = (time.monotonic(), await self._survey())
            return self._last[1]

    async def _survey(self) -> dict:
        from ..client.routing import describe_model
        from ..client.service import SwarmChains

        engine, chains = self.engine, self.engine.service.chains
        num_layers = engine.client.head.config.num_hidden_layers
        if isinstance(chains, SwarmChains):
            report = await describe_model(chains.node, engine.name, num_layers)
        else:  # --local: the spans run in this process
            report = local_report(engine.name, num_layers, [(s.start, s.end) for s in chains.spans],
                                  engine.client.weights, engine.client.device.type)
        ready = await engine.readiness()
        return {**report, "route": {"ready": ready.ready, "detail": ready.detail}, "checked": time.time()}


def local_report(model: str, num_layers: int, spans: list[tuple[int, int]], weights: str, device: str) -> dict:
    """describe_model's shape for an in-process chain (`dsdnode api --local`): one block per span."""
    peers = [{"peer_id": "local", "start": a, "end": b, "addrs": [], "throughput": None, "free_cache_tokens": None,
              "version": None, "device": device, "weights": weights, "active_sessions": None,
              "queued_positions": None, "expires": None, "rtt_ms": 0.0, "reachability": "in process",
              "relayed": False, "banned": None} for a, b in spans]
    counts = [sum(a <= i < b for a, b in spans) for i in range(num_layers)]
    return {"model": model, "num_layers": num_layers, "served": True, "local_weights": weights, "incompatible": {},
            "uncovered_layers": [i for i, n in enumerate(counts) if n == 0], "coverage": counts, "peers": peers,
            "banned": []}


def add_web_routes(app: FastAPI, engine: Engine) -> None:
    swarm = SwarmStatus(engine)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page_file("index.html"), headers={"Cache-Control": "no-cache"})

    @app.get("/ui/{name}", include_in_schema=False)
    async def page_file(name: str) -> Response:
        if name not in PAGE_FILES:
            return Response(status_code=404)
        return Response(_page_file(name), media_type=PAGE_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/v1/swarm")
    async def swarm_status() -> dict:
        """The served model's servers (layers, measured RTT, throughput, load, device, reachability,
        weights, bans), its layer coverage and whether a route exists now: `dsdnode swarm --json`'s
        report of the model, refreshed at most every SWARM_STATUS_MAX_AGE_S."""
        return await swarm.get()

    @app.get("/v1/stats")
    async def client_stats() -> dict:
        """The client's recent generations, oldest first (tokens/s, accepted drafts and k per round,
        tree size, per-link time, failovers), for the page's live charts."""
        return {"model": engine.name, "generations": [p.body() for p in engine.service.metrics.recent]}
