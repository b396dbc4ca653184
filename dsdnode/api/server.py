"""The HTTP side of `dsdnode api`: OpenAI's routes, errors and server-sent events over the engine.

Everything runs on one event loop (uvicorn on uvloop): requests, the libp2p bridge and every
request's generation loop; model compute happens in executor threads (see client/generate.py), so
one slow request never blocks another. A streamed answer is a series of `data: {chunk}` events in
OpenAI's chunk format ending with `data: [DONE]`. A stream answers 200 only once its generation
has produced its first tokens (so a route exists and a session is open): a swarm that cannot serve
the request gets a 503 in OpenAI's error format like a whole answer would; an error after that
(the swarm lost every route mid-answer) is sent as an `error` event, which OpenAI clients raise.

`/health` (liveness: the process serves HTTP) and `/ready` (a route exists now; see
Engine.readiness) are for load balancers and supervisors. Before any route runs, `guard.py` checks
the API key (with one, every path but /health needs `Authorization: Bearer KEY` and answers 401 in
OpenAI's format without it), the body size (413), and how many generations run and wait (429 with
Retry-After beyond the queue). Prompts are tokenized in a worker thread, never on the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BadValue, http_status
from ..ready import print_ready
from .engine import Completion, Engine
from .web import add_web_routes
from .guard import GuardSettings, RequestGuard, is_public_bind
from .schemas import ApiError, ChatCompletionRequest, CompletionRequest, ResponseShape, Usage, model_list

log = logging.getLogger(__name__)


API_DESCRIPTION = """OpenAI-compatible API over a dsdnode swarm.

Supported: /v1/completions, /v1/chat/completions (streamed or whole), /v1/models; temperature,
top_p, max_tokens / max_completion_tokens, stop, seed, stream, stream_options.include_usage; our
own knobs `dsd_k` ("auto" or a draft length, 0 = no drafting) and `adaptive` (lossy verification).

`seed` with temperature > 0 reproduces the answer: a seeded request drafts without overlap and with
a fixed draft length (dsd_k, or 4 for "auto"), because both the overlapped draft and the automatic
draft length depend on timing and would change which random numbers are drawn. Seeded requests are
therefore somewhat slower. Greedy requests (temperature 0) need no seed.

Rejected with 400 (`unsupported_value`) unless neutral: n > 1, logprobs, top_logprobs, echo,
best_of, suffix, non-zero frequency/presence penalties, logit_bias, response_format other than
text, tools/tool_choice, functions/function_call. `usage.completion_tokens` counts the tokens of
the returned text (a stop string's cut included, what came after it not).

/health: liveness. /ready: 200 when a route through the swarm exists (checked at most every 5 s),
else 503."""


def create_app(engine: Engine, guard: GuardSettings = GuardSettings()) -> FastAPI:
    """The routes over a started engine (serve() starts and stops its service), behind `guard`
    (API key, body size, generations at once: guard.py)."""
    app = FastAPI(title="dsdnode", description=API_DESCRIPTION)
    created = int(time.time())
    app.add_middleware(RequestGuard, settings=guard)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text: request latency, time to first token, tokens/s, k and accepted drafts per
        round, network time per round, failovers, process."""
        return Response(generate_latest(engine.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        state = await engine.readiness()
        if not state.ready:
            return _api_error_response(ApiError(503, f"no route through the swarm: {state.detail}",
                                                type="server_error", code="swarm_unavailable"))
        return JSONResponse({"status": "ready", "model": engine.name, "route": state.detail})

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return _api_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        return _api_error_response(_validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "unknown_url" if e.status_code == 404 else None
        return _api_error_response(ApiError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, e: Exception) -> JSONResponse:
        return _api_error_response(_server_error(e))

    @app.get("/v1/models")
    async def models() -> dict:
        return model_list(engine.name, created)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != engine.name:
            raise ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_list(engine.name, created)["data"][0]

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await _respond(engine, req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return await _respond(engine, req, chat=True)

    add_web_routes(app, engine)  # the page at / (no key: it holds no data), /v1/swarm and /v1/stats
    return app


def _api_error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _validation_error(e: RequestValidationError) -> ApiError:
    first = e.errors()[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc)
    return ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=param, code="invalid_value")


def _server_error(e: BaseException) -> ApiError:
    """What a failure during generation looks like to the client: whose error it is (`errors.kind`)
    picks the status -- 400 the request's, 503 the swarm's, 500 a bug."""
    if isinstance(e, ApiError):
        return e
    status = http_status(e)
    if status == 503:
        return ApiError(503, f"the swarm could not serve this request: {e}", type="server_error",
                        code="swarm_unavailable")
    if status == 400:
        return ApiError(400, str(e), code="invalid_value")
    log.error("generation failed", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error")


_TOKENIZER = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # off the loop, one prompt at a time


async def _respond(engine: Engine, req: CompletionRequest | ChatCompletionRequest, chat: bool):
    job = await asyncio.get_running_loop().run_in_executor(_TOKENIZER, engine.prepare, req)
    shape = ResponseShape(engine.name, chat)
    if req.stream:
        events = await _start_stream(job, shape, req.include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text = await job.run()
    except Exception as e:
        raise _server_error(e) from None
    body = shape.whole(text, job.finish_reason, Usage(job.prompt_tokens, job.completion_tokens))
    body["dsd_unaudited_layers"] = [list(span) for span in job.unaudited_layers]
    return JSONResponse(body, headers={UNAUDITED_HEADER: unaudited_header(job.unaudited_layers)})


UNAUDITED_HEADER = "X-Dsdnode-Unaudited-Layers"


def unaudited_header(layers: list[tuple[int, int]]) -> str:
    """START:END of each layer range no independent server audited, comma-separated ("none": all audited)."""
    return ",".join(f"{a}:{b}" for a, b in layers) or "none"


async def _start_stream(job: Completion, shape: ResponseShape, include_usage: bool) -> AsyncIterator[str]:
    """Start the generation and wait for its first tokens (or its end) before any byte is sent, so
    a failure to route or open a session is an HTTP error, not a 200 with an error event."""
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    task = asyncio.create_task(job.run(pieces.put_nowait))
    task.add_done_callback(lambda _: pieces.put_nowait(None))
    started = asyncio.create_task(job.started.wait())
    try:
        await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the client went away while we waited
        task.cancel()
        task.add_done_callback(_swallow)
        raise
    finally:
        started.cancel()
    if task.done() and not job.started.is_set() and task.exception() is not None:
        raise _server_error(task.exception())
    return _events(job, task, pieces, shape, include_usage)


async def _events(job: Completion, task: asyncio.Task, pieces: asyncio.Queue, shape: ResponseShape,
                  include_usage: bool) -> AsyncIterator[str]:
    """The generation as server-sent events; the generation is cancelled if the client goes away."""
    try:
        if shape.chat:
            yield _event(shape.chunk("", first=True))
        while (piece := await pieces.get()) is not None:
            yield _event(shape.chunk(piece))
        error = task.exception()
        if error is not None:
            yield "event: error\n" + _event(_server_error(error).body())
        else:
            closing = shape.chunk(None, job.finish_reason)
            if job.report_stats:  # our knob dsd_stats: how the generation went, for the web chat
                closing["dsd"] = job.stats()
            closing["dsd_unaudited_layers"] = [list(span) for span in job.unaudited_layers]  # known only now
            yield _event(closing)
            if include_usage:
                yield _event(shape.usage_chunk(Usage(job.prompt_tokens, job.completion_tokens)))
        yield "data: [DONE]\n\n"
    finally:
        if not task.done():  # the client disconnected: stop generating (the chain closes its session)
            log.info("%s: the client went away; generation cancelled after %d tokens", shape.id, job.completion_tokens)
            task.cancel()
            task.add_done_callback(_swallow)


def _swallow(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("generation of a disconnected stream ended with %r", task.exception())


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def serve(engine: Engine, host: str, port: int, log_level: str = "warning",
                guard: GuardSettings = GuardSettings()) -> None:
    """Listen on host:port (0: any free port), print a JSON ready line with the URL, serve until a signal."""
    import uvicorn

    if guard.api_key is None and is_public_bind(host):
        log.warning("=" * 78)
        log.warning("the API listens on %s WITHOUT an API key: anyone who can reach this port can use the "
                    "swarm through it. Set DSDNODE_API_KEY (or --api-key), or listen on 127.0.0.1.", host)
        log.warning("=" * 78)

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BadValue(f"cannot listen on {host}:{port}: {e.strerror}") from None
    bound = sock.getsockname()[1]
    try:
        await engine.service.start()  # before uvicorn: an unreachable swarm is one clear error, not a traceback
    except BaseException:
        sock.close()
        raise
    try:
        config = uvicorn.Config(create_app(engine, guard), loop="none", log_level=log_level,
                                timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{bound}/v1"
            print_ready(url=url, model=engine.name)
        await task
        if not server.started:
            raise RuntimeError("the API server failed to start (see the log above)")
    finally:
        await engine.service.stop()
