"""The one place a generation is built: options -> settings -> drafter -> generator -> chain.

Every entry point (the library API, `dsdnode generate`, the HTTP API, the bench, the demo) goes
through ClientService, so a generation is assembled the same way everywhere: a chain from the
service's chain source (in-process spans or the swarm), a drafter with its own KV cache (prompt
lookup where the client holds no draft model: ClientModels.draft_fallback says why), the
adaptive verifier's token classes when asked for, and a draft-length controller carried over from
earlier generations with the same settings (a fresh controller spends most of a short answer
re-learning the round cost)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Protocol

import torch

from ..speculative.controller import ControllerSettings, DraftLengthController
from ..speculative.draft import Drafter
from ..speculative.lookup import PromptLookupDrafter
from ..speculative.importance import AdaptiveSettings, ImportanceScorer
from ..speculative.predraft import PredraftSettings
from ..speculative.sampling import SamplingSettings
from ..net.wire import WIRE_MODES
from ..errors import BadValue
from .generate import SEQUENTIAL_PREFILL_CHUNK, GenerationResult, GenerationSettings, Generator
from .interface import Chain
from .loading import ClientModels
from .metrics import ClientMetrics
from .streaming import StopText

if TYPE_CHECKING:  # the swarm's modules load only when a swarm chain is used
    from .audit import AuditStats


SEEDED_K = 4  # draft length of a seeded, sampled generation asked for k="auto" (see GenerateOptions.reproducible)


@dataclass(frozen=True)
class GenerateOptions:
    """What a caller chooses for one generation (typed; the CLI and HTTP API map their inputs here)."""

    max_new_tokens: int = 128
    k: int | Literal["auto"] = "auto"  # draft length: "auto" (chosen each round), a fixed number, 0 = none
    k_max: int = 8  # longest block with k="auto"
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # with temperature > 0: reproducible, drafting without overlap and a fixed k
    adaptive: bool = False  # adaptive verification (lossy): relax acceptance of low-importance tokens
    tau: float = 0.3  # adaptive: accept a non-key draft token with p >= tau * p(top)
    overlap: bool = True  # draft the next block while the current one is in flight
    width_max: int = 1  # widest token tree with k="auto" (1: chains of drafts only)
    lookup: bool = False  # add prompt-lookup branches (n-gram matches in the text so far) to each draft
    audit: bool = True  # have other servers recheck the chain's work (swarm chains; client/audit.py)
    require_audit: bool = False  # refuse (AuditsRequired) rather than return outputs no independent server audited
    prefill_pipeline: bool = True  # send the prompt's chunks back to back, so the hops overlap them
    rejections_ahead: int = PredraftSettings().rejections  # with overlap: rejection outcomes of a block in
    # flight whose next tree is drafted ahead (speculative speculative decoding; 0: full acceptance only)
    rejections_gated: bool = PredraftSettings().gated  # only in rounds where the measured odds say it pays
    wire: str = "exact"  # hidden states between hops: "exact" (lossless) or "int8" (opt-in, lossy: int8 with a
    # float16 scale per 64 values, about a quarter of float32's bytes; net/wire.py)

    def __post_init__(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise BadValue(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.k != "auto" and not (isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 0):
            raise BadValue(f"k must be 'auto' or an int >= 0, got {self.k!r}")
        if not (isinstance(self.k_max, int) and self.k_max >= 1):
            raise BadValue(f"k_max must be an int >= 1, got {self.k_max!r}")
        if not self.temperature >= 0:
            raise BadValue(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise BadValue(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.width_max, int) and self.width_max >= 1):
            raise BadValue(f"width_max must be an int >= 1, got {self.width_max!r}")
        if not 0 < self.tau <= 1:
            raise BadValue(f"tau must be in (0, 1], got {self.tau!r}")
        if not (isinstance(self.rejections_ahead, int) and self.rejections_ahead >= 0):
            raise BadValue(f"rejections_ahead must be an int >= 0, got {self.rejections_ahead!r}")
        if self.wire not in WIRE_MODES:
            raise BadValue(f"wire must be one of {', '.join(WIRE_MODES)}, got {self.wire!r}")
        if self.require_audit and not self.audit:
            raise BadValue("require_audit needs audit: a generation cannot require audits it turns off")

    @property
    def speculative(self) -> bool:
        return self.k != 0

    @property
    def reproducible(self) -> bool:
        """Seeded sampling: the same request gives the same text. Which random numbers a round
        draws depends on its k and on whether the next block was drafted while this one was in
        flight, and both depend on timing ("auto" k follows measured round costs; the overlapped
        guess races the chain), so a seeded, sampled generation drafts without overlap and with a
        fixed k (the one asked for, or SEEDED_K for "auto")."""
        return self.seed is not None and self.temperature > 0

    def settings(self) -> GenerationSettings:
        fixed = None if self.k == "auto" else self.k
        if self.reproducible and fixed is None:
            fixed = min(SEEDED_K, self.k_max)
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            speculative=self.speculative,
            overlap=self.overlap and not self.reproducible,
            sampling=SamplingSettings(temperature=self.temperature, top_p=self.top_p, seed=self.seed),
            controller=ControllerSettings(k_max=max(self.k_max, fixed or 1), k_fixed=fixed,
                                          k_initial=min(4, self.k_max) if fixed is None else 1,
                                          width_max=self.width_max if fixed is None else 1),
            adaptive=AdaptiveSettings(enabled=self.adaptive, tau=self.tau),
            lookup=self.lookup,
            prefill_pipeline=self.prefill_pipeline,
            predraft=PredraftSettings(self.rejections_ahead, self.rejections_gated),
        )


class ChainSource(Protocol):
    async def start(self) -> None:
        """Called once, inside the event loop that will run the generations."""

    def new_chain(self, audit: bool = True, require_audit: bool = False, wire: str = "exact") -> Chain:
        """A chain for one generation (audited, where the chain can be, unless audit=False; refusing
        what it cannot audit with require_audit; hidden states sent as `wire`, net/wire.py WIRE_MODES);
        its session opens when generation starts."""

    async def check_route(self) -> str:
        """The chain a generation would use now, in words; raises (NoRoute, ...) if there is none."""

    async def stop(self) -> None:
        """Called once at the end."""


class LocalChains:
    """The target's spans in this process (no network); each generation gets fresh KV caches."""

    def __init__(self, spans, link_latency_s: float = 0.0):
        self.spans, self.link_latency_s = spans, link_latency_s

    @classmethod
    def load(cls, target_dir, hops: int, dtype: torch.dtype, link_latency_ms: float = 0.0,
             device: torch.device | str = "cpu") -> LocalChains:
        """The target split into `hops` spans on `device` with emulated link latency."""
        from ..models.span import Span
        from ..models.weights import load_config
        from .local import split_layers

        n = load_config(target_dir).num_hidden_layers
        return cls([Span.load(target_dir, a, b, dtype, device) for a, b in split_layers(n, hops)],
                   link_latency_ms / 1000)

    async def start(self) -> None:
        pass

    def new_chain(self, audit: bool = True, require_audit: bool = False, wire: str = "exact") -> Chain:
        from .local import LocalChain  # the user's own process: nothing to audit
        return LocalChain(self.spans, self.link_latency_s, wire)

    async def check_route(self) -> str:
        return f"{len(self.spans)} local spans"

    async def stop(self) -> None:
        pass


class SwarmChains:
    """The swarm: one libp2p node for the service's life (or the caller's), one routed session per
    generation. relay=True carries each block hop by hop through the client (a baseline).
    private_span: the target's first layers, run by the client itself so no server sees token
    embeddings (client/private.py); the swarm is routed from its end."""

    def __init__(self, model: str, config, bootstrap: list[str], dtype: torch.dtype, *, weights: str,
                 link_latency_ms: float = 0.0, relay: bool = False, node=None, trust=None, private_span=None):
        if not bootstrap and node is None:
            raise BadValue("give --bootstrap or --peers to join a swarm, or --local to run without one")
        self.model, self.config, self.bootstrap, self.dtype = model, config, list(bootstrap), dtype
        self.link_latency_ms, self.relay, self.weights = link_latency_ms, relay, weights
        self.private_span = private_span
        self.first_layer = private_span.end if private_span is not None else 0
        self.node, self._own_node = node, node is None
        from .standing import Standing, TrustSettings
        self.trust = trust or TrustSettings()
        self.standing = Standing(self.trust)  # what one generation measured, the next routes on
        from .prefill import PrefillMeter
        self.meter = PrefillMeter()  # what blocks cost on our chains: prefill chunks are sized by it

    async def start(self) -> None:
        if self.node is None:
            from ..net.latency import LinkLatency
            from ..net.p2p import P2PNode
            self.node = await P2PNode.start(bootstrap=self.bootstrap, latency=LinkLatency(self.link_latency_ms),
                                            require_bootstrap=True, client=True)

    async def check_route(self) -> str:
        """Routing alone (find live servers, choose a chain), without opening a session."""
        from .routing import best_chain, live_candidates

        hops = best_chain(await live_candidates(self.node, self.model, self.weights), self.config.num_hidden_layers,
                          first_layer=self.first_layer)
        route = " -> ".join(f"{h.candidate.record.peer_id} [{h.start}:{h.end})" for h in hops)
        return f"local [0:{self.first_layer}) -> {route}" if self.first_layer else route

    def new_chain(self, audit: bool = True, require_audit: bool = False, wire: str = "exact") -> Chain:
        from dataclasses import replace

        from .swarm_chain import RemoteChain
        trust = (replace(self.trust, require_audit=self.trust.require_audit or require_audit) if audit
                 else replace(self.trust, audit_rate=0.0))
        chain = RemoteChain(self.node, self.model, self.config.num_hidden_layers, self.config.hidden_size,
                            weights=self.weights, dtype=self.dtype, relay=self.relay, trust=trust,
                            standing=self.standing, meter=self.meter, first_layer=self.first_layer, wire=wire)
        if self.private_span is None:
            return chain
        from .local import LocalChain
        from .private import PrivateLayersChain
        return PrivateLayersChain(LocalChain([self.private_span]), chain)

    async def stop(self) -> None:
        if self.node is not None and self._own_node:
            await self.node.stop()
            self.node = None


class ClientService:
    """The client's models and a chain source; builds and runs generations."""

    def __init__(self, models: ClientModels, chains: ChainSource, metrics: ClientMetrics | None = None):
        self.models, self.chains = models, chains
        self.metrics = metrics or ClientMetrics()
        self.controllers: dict[ControllerSettings, DraftLengthController] = {}
        self._importance: ImportanceScorer | None = None
        self._importance_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.chains.start()

    async def stop(self) -> None:
        await self.chains.stop()

    async def check_route(self) -> str:
        """Whether a generation could start now: the chain it would use, or an exception why not."""
        return await self.chains.check_route()

    async def importance(self) -> ImportanceScorer:
        """The adaptive verifier's token classes, built once on first use (a pass over the vocabulary)."""
        async with self._importance_lock:
            if self._importance is None:
                self._importance = await asyncio.get_running_loop().run_in_executor(None, self.models.importance)
        return self._importance

    async def generate(self, ids: list[int], options: GenerateOptions,
                       on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
        """One generation of up to options.max_new_tokens after `ids`, over a new chain session."""
        m, s = self.models, options.settings()
        check_context(m.head.config, len(ids) + s.max_new_tokens,
                      f"the prompt ({len(ids)} tokens) and max_new_tokens {s.max_new_tokens}")
        drafter = None
        if s.speculative and m.draft_head is None:  # lossless all the same: the target verifies every proposal
            drafter = PromptLookupDrafter()
        elif s.speculative:
            # room for the block, the tree grown below it and a tree below each rejection drafted ahead
            drafter = Drafter(m.draft_head, m.draft_spans,
                              len(ids) + s.max_new_tokens + (2 + s.predraft.rejections) * s.max_block + 1, s.sampling)
        importance = await self.importance() if s.adaptive.enabled else None
        chain = self.chains.new_chain(options.audit, options.require_audit, options.wire)
        generator = Generator(m.head, chain, drafter, s, m.eos_ids, importance, self.controllers.get(s.controller))
        t0, first = time.perf_counter(), []

        def on_new(tokens: list[int]) -> None:
            if not first:
                first.append(time.perf_counter() - t0)
            if on_tokens is not None:
                on_tokens(tokens)
        try:
            result = await generator.generate(ids, on_tokens=on_new)
        except StopText:  # the caller ended it at a stop string: a normal end
            self.metrics.stopped(time.perf_counter() - t0, first[0] if first else None)
            raise
        except BaseException:
            self.metrics.failed()
            raise
        finally:
            if generator.controller is not None:  # trained by however many rounds ran
                self.controllers[s.controller] = generator.controller
        self.metrics.observe(result, time.perf_counter() - t0, first[0] if first else None, chain.failovers)
        text = m.tokenizer.decode(result.tokens, skip_special_tokens=True)
        auditor = getattr(chain, "auditor", None)  # swarm chains audit; in-process chains have nothing to audit
        return Generation(text, result, list(chain.route), chain.failovers, auditor.stats if auditor else None,
                          list(chain.unaudited_layers), drafting_of(drafter))

    async def next_token_logits(self, ids: list[int]) -> torch.Tensor:
        """The target's float32 logits [vocab] for the token after `ids`, from a session of its own
        (prefilled in chunks as a generation prefills, not audited): how close a greedy choice was,
        e.g. where two decodings of one prompt part (`dsdnode demo` checks near-ties so)."""
        chunk = SEQUENTIAL_PREFILL_CHUNK
        chain = self.chains.new_chain(audit=False)
        await chain.start_session(len(ids))
        try:
            for at in range(0, len(ids), chunk):
                out = await chain.forward(self.models.head.embed_tokens(ids[at:at + chunk]), at)
            return self.models.head.logits(out.hidden)[-1]
        finally:
            await chain.close()


def check_context(config, tokens: int, what: str) -> None:
    """Refuse a generation longer than the model's context before any server is asked (`what`
    names what adds up to `tokens`). Servers may cap sessions shorter still: they refuse the
    session, and the client says so."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and tokens > context:
        raise BadValue(f"{what} come to {tokens} tokens, more than the model's context ({context} tokens)")


def build_service(model: str, *, bootstrap: list[str] | tuple[str, ...] = (), local: bool = False, hops: int = 4,
                  draft: str | bool = True, dtype: str | None = None, device: str = "auto",
                  link_latency_ms: float = 0.0, relay: bool = False, draft_int8: bool | None = None,
                  draft_vocab: int | None = None, private_layers: int = 0) -> ClientService:
    """Load the client's models and make its chain source (blocking: loads weights); start() it in
    the event loop that will generate. See library.AsyncClient.connect for the arguments."""
    from ..dtypes import HIDDEN_DTYPES
    from .loading import default_draft, load_client_models

    if dtype is not None and dtype not in HIDDEN_DTYPES:
        raise BadValue(f"dtype must be one of {', '.join(HIDDEN_DTYPES)}, got {dtype!r}")
    if link_latency_ms < 0:
        raise BadValue(f"link_latency_ms must be >= 0, got {link_latency_ms}")
    if not local and not bootstrap:
        raise BadValue("give --bootstrap or --peers to join a swarm, or --local to run without one")
    if private_layers and local:
        raise BadValue("private_layers applies to a swarm; --local runs every layer in this process already")
    models = load_client_models(model, default_draft(model) if draft is True else draft or None, dtype, device,
                                draft_int8, draft_vocab)
    if local:  # the spans share the client's device and dtype
        chains = LocalChains.load(models.target_dir, hops, models.dtype, link_latency_ms, models.device)
    else:  # hidden states cross the wire in the client's dtype, from and to the CPU
        chains = SwarmChains(model, models.head.config, list(bootstrap), models.dtype,
                             weights=models.weights, link_latency_ms=link_latency_ms, relay=relay,
                             private_span=load_private_span(models, private_layers))
    return ClientService(models, chains)


def load_private_span(models: ClientModels, layers: int):
    """The target's layers [0, layers) on the client's device and dtype, or None for layers=0."""
    from ..models.span import Span

    num_layers = models.head.config.num_hidden_layers
    if not 0 <= layers < num_layers:
        raise BadValue(f"private_layers must be in 0..{num_layers - 1} (the model has {num_layers} layers; "
                       f"the swarm must run at least one), got {layers}")
    return Span.load(models.target_dir, 0, layers, models.dtype, models.device) if layers else None


@dataclass
class Generation:
    text: str
    result: GenerationResult  # tokens, rounds (k, accepted, timings), prefill and decode time
    route: list[tuple[str, int, int]]  # (peer id or "local", start, end) of the chain that finished it
    failovers: int
    audit: AuditStats | None = None  # what the chain's audits checked (None: a chain that does not audit)
    # layer ranges whose outputs no independent server audited (see GenerateOptions.require_audit)
    unaudited_layers: list[tuple[int, int]] = field(default_factory=list)
    drafting: str = "draft model"  # what proposed the drafts: "draft model", "prompt lookup" or "none" (k=0)

    @property
    def tokens(self) -> list[int]:
        return self.result.tokens


def drafting_of(drafter: Drafter | PromptLookupDrafter | None) -> str:
    """Generation.drafting: what proposed a generation's drafts."""
    if drafter is None:
        return "none"
    return "prompt lookup" if isinstance(drafter, PromptLookupDrafter) else "draft model"
