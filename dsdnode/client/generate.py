"""The generation loop: autoregressive or speculative, over any chain (local or remote).

One round: draft a token tree (a chain of k drafts is a width-1 tree; prompt-lookup branches may
be added; a target without a draft model drafts by prompt lookup alone, speculative/lookup.py),
embed [last token + tree nodes], one chain pass with the previous round's rollback riding on it
(commit_len, and the kept path when the previous block was a tree), verify, commit.
Autoregressive decoding is the same loop with depth 0, so the baseline and DSD share every line
but the drafting. While a block is in flight the client drafts the next one (the bonus token, then
a tree of the same shape) on the guess that the draft's own choice at every step (the path of first
children) is accepted whole, and keeps it if the guess holds. The draft model's prefill runs during
the chain's.

A chain that audits its servers (client/audit.py) says after each round how far the outputs are
checked: tokens go to on_tokens only once checked, and when an audit finds a wrong output the tokens
produced from it on are dropped and generated again (on a route without the wrong server), so what
the caller sees equals an honest run."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from ..models.head import Head
from ..speculative.controller import ControllerSettings, DraftLengthController, RoundObservation
from ..speculative.draft import Drafter, TreeGrowth
from ..speculative.lookup import LookupGrowth, PromptLookupDrafter
from ..speculative.importance import AdaptiveSettings, ImportanceScorer
from ..speculative.predraft import Ahead, AheadGate, Predraft, PredraftSettings, RejectionSource
from ..speculative.sampling import SamplingSettings, make_rng
from ..speculative.tree import TokenTree, TreeShape, lookup_continuation
from ..speculative.verify import VerifyResult, verify_tree_adaptive, verify_tree_greedy, verify_tree_sampling
from .interface import Chain, Checkpoint, TreeBlock
from ..errors import BadValue

Growth = TreeGrowth | LookupGrowth  # a round's draft, grown depth by depth (a draft model's tree, or a lookup chain)

SEQUENTIAL_PREFILL_CHUNK = 64  # positions per block of an unpipelined prefill (a server's default max_block)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    speculative: bool = True  # False: plain autoregressive decoding (the baseline)
    overlap: bool = True  # draft the next block while this one is in flight (seeded sampling is
    # reproducible only without it and with a fixed k: both depend on timing)
    prefill_chunk: int | None = None  # prompt positions per block during prefill (None: the chain chooses
    # from measured link and compute costs, client/prefill.py; 64 without pipelining)
    prefill_pipeline: bool = True  # send the prompt's chunks back to back, so the hops overlap them
    lookup: bool = False  # add prompt-lookup branches (n-gram matches in the text so far) to each tree
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    adaptive: AdaptiveSettings = field(default_factory=AdaptiveSettings)
    predraft: PredraftSettings = field(default_factory=PredraftSettings)  # what to draft ahead in flight (overlap)

    @property
    def max_block(self) -> int:
        """The largest block a round sends: the root, the widest deepest tree, a lookup branch."""
        if not self.speculative:
            return 1
        c = self.controller
        return 1 + c.width_max * c.k_max + (c.k_max if self.lookup else 0)


@dataclass
class RoundStats:
    k: int
    accepted: int
    relaxed: int
    round_s: float
    draft_s: float  # drafting on the critical path (not hidden behind the wait)
    hop_compute_s: list[float]
    predrafted: int  # tree nodes drafted ahead (while the last block was in flight, or the chain prefilled)
    hop_link_s: list[float] = field(default_factory=list)  # between consecutive hops (swarm chains)
    width: int = 1  # tree width drafted (1: a chain of k drafts; k is the tree's depth)
    nodes: int = 0  # tree nodes sent (drafts and prompt-lookup candidates)
    block_bytes: int = 0  # the block's frame on each link of the chain (swarm chains)
    reply_bytes: int = 0  # what came back to the client: the result and every hop's copy
    ahead: str = "none"  # where the round's tree came from: "none" (drafted after the last reply),
    # "prefill" (drafted while the chain prefilled), "accept" (the last tree grown on below its deepest
    # nodes) or "rejection" (a branch drafted ahead for the last block's rejection: speculative/predraft.py)
    rejections: int = 0  # rejection outcomes drafted ahead while this block was in flight
    rejection_hit: bool = False  # the block ended in one of them: the next round's tree was ready


@dataclass
class GenerationResult:
    tokens: list[int]
    rounds: list[RoundStats]
    prefill_s: float
    decode_s: float
    stopped: str  # "eos" or "length"
    warm_start: bool = False  # the controller began with a round cost learned by earlier generations
    first_token_s: float = 0.0  # time to first token: the prefill and the first round
    prefill_chunk: int = 0  # positions per prefill block
    prefill_bytes: int = 0  # the prompt's blocks on each link of the chain (swarm chains)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        return sum(r.accepted for r in self.rounds) / max(1, len(self.rounds))

    @property
    def mean_k(self) -> float:
        return sum(r.k for r in self.rounds) / max(1, len(self.rounds))

    @property
    def rejection_hit_rate(self) -> float | None:
        """Of the rounds that ended in a rejection while branches were drafted ahead for some, the
        share whose outcome was one of them (None: no such round)."""
        tried = [r for r in self.rounds if r.rejections and r.accepted < r.k]
        return sum(r.rejection_hit for r in tried) / len(tried) if tried else None

    def summary(self) -> str:
        return (f"{len(self.tokens)} tokens in {self.decode_s:.2f} s ({self.tokens_per_s:.2f} tok/s), "
                f"{len(self.rounds)} rounds, mean accepted {self.mean_accepted:.2f}/round, mean k {self.mean_k:.2f}, "
                f"prefill {self.prefill_s:.2f} s, stopped on {self.stopped}")


class Generator:
    def __init__(self, head: Head, chain: Chain, drafter: Drafter | PromptLookupDrafter | None,
                 settings: GenerationSettings, eos_ids: set[int], importance: ImportanceScorer | None = None,
                 controller: DraftLengthController | None = None):
        """controller: one that earlier generations trained, so this one starts from their estimate
        of the round cost instead of re-learning it in its first rounds (which is most of a short
        answer); a fresh one when None. Acceptance starts from the prior: it belongs to the text
        (measured: carried over from code answers, it kept the next math answer at k = 8)."""
        if settings.speculative and drafter is None:
            raise ValueError("speculative decoding needs a drafter")
        if settings.adaptive.enabled and importance is None:
            raise ValueError("adaptive verification needs an importance scorer")
        if controller is not None and controller.settings != settings.controller:
            raise ValueError("the controller was made with other settings than settings.controller")
        self.head, self.chain, self.drafter, self.settings = head, chain, drafter, settings
        self.controller = controller
        self.eos_ids, self.importance = eos_ids, importance
        self.gate = AheadGate()  # whether drafting ahead for rejections pays, round by round
        # verification and drafting run in different threads (overlap): one random number generator each
        self.rng = make_rng(settings.sampling)
        if drafter is not None:
            draft_seed = None if settings.sampling.seed is None else settings.sampling.seed + 1
            drafter.sampling = settings.sampling
            drafter.rng = make_rng(SamplingSettings(settings.sampling.temperature,
                                                                settings.sampling.top_p, draft_seed))

    async def generate(self, prompt: list[int], on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
        if not prompt:
            raise BadValue("the prompt is empty")
        s = self.settings
        await self.chain.start_session(len(prompt) + s.max_new_tokens + s.max_block)
        controller = self._controller()
        warm_start = s.speculative and controller.timing is not None
        ahead: Ahead | None = None  # the next round's tree, drafted ahead
        kept: list[int] | None = None  # the last block's accepted path, when it was a tree
        try:
            t0 = time.perf_counter()
            ahead, prefill = await self._prefill(prompt, self._clipped(controller, s.max_new_tokens))
            prefill_s, t_decode = time.perf_counter() - t0, time.perf_counter()
            first_token_s = 0.0
            tokens, rounds, stopped, emitted = list(prompt), [], "length", len(prompt)
            path = [0]  # the last block's accepted path (block indices; 0 is the token it started from)
            rerouted = False  # an audit rolled back: the chain is routed anew in the next round
            while True:
                if stopped == "eos" or len(tokens) - len(prompt) >= s.max_new_tokens:
                    check = await self.chain.finish(path)  # every token is checked before the generation returns
                    if check.rollback_to is None:
                        self._emit(tokens, emitted, check, on_tokens)
                        break
                else:
                    shape = self._clipped(controller, s.max_new_tokens - (len(tokens) - len(prompt)))
                    failovers = self.chain.failovers
                    result, stats, ahead = await self._round(tokens, shape, ahead, kept)
                    path = [0] + [i + 1 for i in result.path]
                    kept = None if path == list(range(len(path))) else path  # a chain's rollback is commit_len alone
                    new = result.tokens
                    eos_at = next((i for i, t in enumerate(new) if t in self.eos_ids), None)
                    if eos_at is not None:
                        new, stopped = new[:eos_at], "eos"
                    tokens.extend(new)
                    rounds.append(stats)
                    first_token_s = first_token_s or time.perf_counter() - t0
                    if s.speculative and (self.chain.failovers != failovers or rerouted
                                          or len(stats.hop_compute_s) != controller.n_hops):
                        # a new chain (perhaps with another number of hops) costs something else, and this
                        # round's time includes the failover: learn the new chain's cost from scratch (the
                        # hop count also changes when the route failed over before this round, in the prefill)
                        controller.reset_timing(len(stats.hop_compute_s))
                        rerouted = False
                    elif s.speculative:
                        controller.observe(RoundObservation(stats.k, result.accepted, stats.round_s, stats.draft_s,
                                                            stats.hop_compute_s, stats.width, stats.nodes, result.ranks))
                    check = await self.chain.checkpoint()
                if check.rollback_to is not None:  # an audit found a wrong output: generate again from there
                    del tokens[max(len(prompt), check.rollback_to + 1):]
                    stopped, kept, path, ahead = "length", None, [0], None  # the chain replays the kept prefix
                    rerouted = True
                    continue
                emitted = self._emit(tokens, emitted, check, on_tokens)
            return GenerationResult(tokens[len(prompt):], rounds, prefill_s, time.perf_counter() - t_decode, stopped,
                                    warm_start, first_token_s, *prefill)
        finally:
            await self.chain.close()

    @staticmethod
    def _emit(tokens: list[int], emitted: int, check: Checkpoint, on_tokens) -> int:
        """Hand out the tokens whose outputs are checked (token j comes from the output at position j-1);
        returns the length of tokens handed out so far."""
        upto = min(len(tokens), check.verified + 1)
        if on_tokens is not None and upto > emitted:
            on_tokens(tokens[emitted:upto])
        return max(emitted, upto)

    def _controller(self) -> DraftLengthController:
        """The given controller (acceptance back to the prior; timing forgotten if this chain has
        another number of hops), or a new one."""
        n_hops = self.chain.n_hops  # known once the session is routed
        if self.controller is None:
            self.controller = DraftLengthController(self.settings.controller, n_hops)
            return self.controller
        self.controller.reset_acceptance()
        if self.controller.n_hops != n_hops:
            self.controller.reset_timing(n_hops)
        return self.controller

    def _clipped(self, controller: DraftLengthController, remaining: int) -> TreeShape:
        """The controller's next shape, no deeper than the tokens still wanted need (AR: depth 0)."""
        shape = controller.choose_shape() if self.settings.speculative else TreeShape(1, 0)
        return TreeShape(shape.width, min(shape.depth, remaining - 1))

    async def _prefill(self, prompt: list[int], shape: TreeShape) -> tuple[Ahead | None, tuple[int, int]]:
        """Cache every prompt position but the last, which opens the first round, in the chain: in
        chunks sent back to back (pipelined: the hops overlap them) or one after another.
        Meanwhile, in a worker thread, the draft model prefills too and (with overlap) drafts the first
        round's tree of `shape`, which is returned with (chunk, bytes per link); without overlap it
        caches the same positions."""
        s = self.settings
        first, draft = None, None
        if s.speculative and s.overlap and shape.depth > 0:
            first = Predraft(self.drafter.growth(prompt, shape.width), shape.depth)
        elif s.speculative:
            draft = asyncio.get_running_loop().run_in_executor(None, self.drafter.prefill, prompt)
        cached = prompt[:-1]
        try:
            if not cached:
                outs, chunk = [], 0
            elif s.prefill_pipeline:
                outs = await self.chain.prefill(self.head.embed_tokens(cached), s.prefill_chunk)
                chunk = outs[0].hidden.shape[1]
            else:
                chunk = s.prefill_chunk or SEQUENTIAL_PREFILL_CHUNK
                outs = [await self.chain.forward(self.head.embed_tokens(cached[at:at + chunk]), at)
                        for at in range(0, len(cached), chunk)]
        finally:  # the drafter is free again before anything else may use it
            if first is not None:
                await first.finish()
            if draft is not None:
                await draft
        return (Ahead(first.growth, "prefill") if first is not None else None), (chunk, sum(o.block_bytes for o in outs))

    async def _round(self, tokens: list[int], shape: TreeShape, ahead: Ahead | None,
                     kept: list[int] | None) -> tuple[VerifyResult, RoundStats, Ahead | None]:
        """Draft a tree of `shape` (taking `ahead`, the tree drafted ahead, where there is one), send
        [last token + nodes] with commit_len = len(tokens)-1 and the last block's kept path, verify.

        Returns the verification, the round's stats and the next round's tree drafted ahead."""
        t_round = time.perf_counter()
        growth = ahead.growth if ahead is not None else self._new_growth(tokens, shape.width)
        predrafted = len(growth.tree.truncated(shape.depth))
        if growth.depth < shape.depth:
            await asyncio.get_running_loop().run_in_executor(None, self._grow, growth, shape.depth)
        tree = growth.tree.truncated(shape.depth)
        if self.settings.lookup and shape.depth > 0:
            tree.add_branch(lookup_continuation(tokens, shape.depth), merge=self.settings.sampling.greedy)
        draft_s = time.perf_counter() - t_round
        commit_len = len(tokens) - 1
        layout = None if tree.is_chain else TreeBlock(tree.block_mask(), tree.positions(commit_len))
        t_send = time.perf_counter()
        forward = asyncio.ensure_future(
            self.chain.forward(self.head.embed_tokens([tokens[-1]] + tree.tokens), commit_len, layout, kept))
        # grow on below the deepest nodes (this block's depth, a bonus token, the next block's depth),
        # and a tree of the next block's depth below each likely rejection worth it
        nxt = Predraft(growth, 2 * shape.depth + 1, self._rejection_source(tree, shape),
                       shape.depth) if self.settings.overlap and shape.depth > 0 else None
        try:
            out = await forward
            flight_s = time.perf_counter() - t_send
            if nxt is not None:  # the draft step under way ends beside verification, not before it
                nxt.stop.set()
            result = self._verify(tree, self.head.logits(out.hidden))
        finally:
            if nxt is not None:
                await nxt.finish()
        round_s = time.perf_counter() - t_round
        # the next round's draft, if the text went on through the tree grown ahead (accepted drafts and bonus)
        on = growth.tree.follow(result.tokens) if nxt is not None else None
        hit = bool(on) and not {b.root for b in growth.branches}.isdisjoint(on)
        if nxt is not None:
            self.gate.observe(flight_s, nxt.steps, nxt.share, result.accepted < shape.depth, hit)
        # k: the depth sent (a lookup's chain may stop short of the shape, or be empty)
        stats = RoundStats(max(tree.depths(), default=0), result.accepted, result.relaxed, round_s, draft_s,
                           out.hop_compute_s, predrafted, out.hop_link_s, growth.width, len(tree), out.block_bytes,
                           out.reply_bytes, ahead.source if ahead is not None else "none",
                           len(nxt.rejections) if nxt else 0, hit)
        return result, stats, Ahead(growth.rerooted(on[-1]), "rejection" if hit else "accept") if on else None

    def _rejection_source(self, block: TokenTree, shape: TreeShape) -> RejectionSource:
        """The rejections of `block` to draft ahead for: up to the settings' count, as many as pay
        by the gate's measurements when gated (the chance of a full acceptance: the controller's
        measured acceptance of a depth of this width, to the block's depth)."""
        p = self.settings.predraft
        if not (p.rejections and p.gated):
            return RejectionSource(block, p.rejections)
        full = self.controller.width_acceptance(shape.width) ** shape.depth
        return RejectionSource(block, p.rejections, self.gate.odds(full))

    def _new_growth(self, tokens: list[int], width: int) -> Growth:
        """The drafter's new draft after `tokens`; without a drafter (autoregressive decoding, depth
        0) an empty tree that is never grown."""
        return self.drafter.growth(tokens, width) if self.drafter is not None else TreeGrowth(None, tokens, width)

    @staticmethod
    def _grow(growth: Growth, depth: int) -> None:
        while growth.depth < depth:
            growth.step()

    def _verify(self, tree: TokenTree, logits) -> VerifyResult:
        s = self.settings
        if s.adaptive.enabled:
            return verify_tree_adaptive(tree, logits, self.importance, s.adaptive)
        if s.sampling.greedy:
            return verify_tree_greedy(tree, logits)
        return verify_tree_sampling(tree, logits, s.sampling, self.rng)
