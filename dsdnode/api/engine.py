"""One API request's generation over a chain session of its own, through the client service.

Every request opens its own session (its own RemoteChain, or LocalChain with --local) and gets its
own Drafter with its own KV cache; the client's head and draft weights are shared read-only, so
concurrent requests decode side by side without seeing each other's state. Text is decoded
incrementally and cut at the first stop string; text that might be the start of a stop string is
held back until the next tokens show it is not, so a stream never shows a stop string."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from ..client.loading import encode_chat
from ..client.service import ClientService, Generation, GenerateOptions
from ..client.streaming import StopText, TextStream
from .schemas import ApiError, ChatCompletionRequest, CompletionRequest

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class EngineSettings:
    k_max: int = 8
    tau: float = 0.3  # adaptive verification threshold
    overlap: bool = True
    max_tokens_limit: int = 1024
    max_prompt_tokens: int = 4096


READY_CACHE_S = 5.0  # how long /ready answers from its last routing check


@dataclass(frozen=True)
class Readiness:
    ready: bool
    detail: str  # the route found, or why there is none
    checked: float  # time.monotonic() of the check


class Engine:
    """What every request shares: the served model's name and the client service (models, chains,
    draft-length controllers trained by every request)."""

    def __init__(self, name: str, service: ClientService, settings: EngineSettings):
        self.name, self.service, self.settings = name, service, settings
        self.client = service.models
        self._readiness: Readiness | None = None
        self._readiness_lock = asyncio.Lock()

    async def readiness(self) -> Readiness:
        """Whether a request could be routed now (the service's routing check: live servers cover
        every layer), answered from the last check for READY_CACHE_S so probes cost the swarm little."""
        async with self._readiness_lock:
            last = self._readiness
            if last is None or time.monotonic() - last.checked > READY_CACHE_S:
                try:
                    last = Readiness(True, await self.service.check_route(), time.monotonic())
                except Exception as e:  # NoRoute, a lost bootstrap peer, ...: not ready, and why
                    last = Readiness(False, str(e) or type(e).__name__, time.monotonic())
                self._readiness = last
            return last

    def prepare(self, req: CompletionRequest | ChatCompletionRequest) -> Completion:
        """Check a request against this server and turn it into a generation job (ApiError if it cannot)."""
        if req.model != self.name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        req.check_supported()
        chat = isinstance(req, ChatCompletionRequest)
        max_tokens = req.token_limit if chat else req.max_tokens
        max_tokens = max_tokens or (self.settings.max_tokens_limit if chat else COMPLETIONS_DEFAULT_MAX_TOKENS)
        if max_tokens > self.settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {self.settings.max_tokens_limit}",
                           param="max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens",
                           code="invalid_value")
        ids = self._chat_ids(req) if chat else self._prompt_ids(req)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt", code="invalid_value")
        if len(ids) > self.settings.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server allows at most "
                                f"{self.settings.max_prompt_tokens}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        k = req.dsd_k  # without a draft model, drafts come from prompt lookup
        try:
            options = GenerateOptions(max_tokens, "auto" if k == "auto" else int(k), self.settings.k_max,
                                      req.temperature, req.top_p, req.seed, req.adaptive, self.settings.tau,
                                      self.settings.overlap, require_audit=req.dsd_require_audit)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        return Completion(self, ids, options, req.stops, req.dsd_stats)

    def _prompt_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = self.client.head.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"token ids must be in 0..{vocab - 1}", param="prompt", code="invalid_value")
            return list(prompt)
        text = prompt if isinstance(prompt, str) else "".join(prompt)
        return self.client.tokenizer(text)["input_ids"]

    def _chat_ids(self, req: ChatCompletionRequest) -> list[int]:
        """The messages through the model's chat template, as `dsdnode generate` wraps its prompt."""
        tokenizer = self.client.tokenizer
        if not tokenizer.chat_template:
            raise ApiError(400, f"{self.name!r} has no chat template: use /v1/completions", param="messages",
                           code="unsupported_value")
        try:
            return encode_chat(tokenizer, [m.template_dict() for m in req.messages])
        except Exception as e:  # the template itself rejects the conversation (roles out of order, ...)
            raise ApiError(400, f"the chat template rejected these messages: {e}", param="messages",
                           code="invalid_value") from None


class Completion:
    """One request's generation: its own chain session and drafter, text cut at stop strings."""

    def __init__(self, engine: Engine, ids: list[int], options: GenerateOptions, stops: list[str],
                 report_stats: bool = False):
        self.engine, self.ids, self.options, self.stops = engine, ids, options, stops
        self.report_stats = report_stats  # the request asked for dsd_stats
        self.finish_reason: str | None = None
        self.generation: Generation | None = None  # None when a stop string ended generation
        self.stream = TextStream(engine.client.tokenizer, lambda text: None, stops)
        self.started = asyncio.Event()  # the first tokens came: a route exists and the session is open
        self._returned_tokens: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    @property
    def completion_tokens(self) -> int:
        """Tokens of the text returned: a stop string ends it inside the tokens decoded, and the
        tokens after the cut are not returned, so not counted (nor billed)."""
        return len(self.stream.ids) if self._returned_tokens is None else self._returned_tokens

    @property
    def text(self) -> str:
        return self.stream.text

    def stats(self) -> dict | None:
        """How the generation went, for a stream's closing chunk (the web chat shows it): None when a
        stop string ended it early (the generation's figures were never gathered)."""
        g = self.generation
        if g is None:
            return None
        r = g.result
        audit = None if g.audit is None else {"audits": g.audit.audits, "positions": g.audit.positions,
                                              "unaudited": g.audit.unaudited, "mismatches": g.audit.mismatches}
        return {"tokens": len(r.tokens), "tokens_per_s": r.tokens_per_s, "prefill_s": r.prefill_s,
                "decode_s": r.decode_s, "speculative": self.options.speculative, "drafting": g.drafting,
                "rounds": len(r.rounds),
                "accepted_per_round": r.mean_accepted, "k": r.mean_k, "failovers": g.failovers,
                "route": [{"peer_id": p, "start": a, "end": b} for p, a, b in g.route], "audit": audit,
                "unaudited_layers": [list(span) for span in g.unaudited_layers]}
    @property
    def unaudited_layers(self) -> list[tuple[int, int]]:
        """Layer ranges of the answer no independent server audited (known once it is done)."""
        return self.generation.unaudited_layers if self.generation is not None else []

    async def run(self, emit: Callable[[str], None] | None = None) -> str:
        """Generate; call emit with each new piece of text; return the whole text."""
        if emit is not None:
            self.stream.emit = emit

        def on_tokens(ids: list[int]) -> None:
            self.started.set()
            self.stream.push(ids)

        try:
            self.generation = await self.engine.service.generate(self.ids, self.options, on_tokens=on_tokens)
            self.finish_reason = "stop" if self.generation.result.stopped == "eos" else "length"
        except StopText:
            self.finish_reason = "stop"
            self._returned_tokens = tokens_covering(self.engine.client.tokenizer, self.stream.ids, self.stream.text)
        self.stream.flush()
        return self.stream.text


def tokens_covering(tokenizer, ids: list[int], text: str) -> int:
    """The fewest leading `ids` whose decoding reaches len(text) characters (text is a prefix of the
    decoding of all of them): the tokens a stop-string cut returns, the last one perhaps in part."""
    lo, hi = 0, len(ids)
    while lo < hi:  # decoded length only grows with more tokens: binary search, log2(len(ids)) decodes
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= len(text):
            hi = mid
        else:
            lo = mid + 1
    return lo
