"""A span: decoder layers [start, end) of a model, with a static KV cache per session.

Like gpt-fast, the cache is preallocated and rollback is just moving a position: a block of T new
positions is written at `commit_len` and everything after it is forgotten in O(1). After a token
tree, the accepted path is scattered through the last block: `kept` gathers those rows to where
the block began (O(accepted) copies, nothing recomputed) before the rollback. The layers are
transformers' own decoder-layer modules (every family of models/families.py); we call them one by
one with an explicit 4-D mask, which lets a block carry any mask (tree verification). Each layer gets
the mask its family's own forward would give it: a sliding-window layer's mask also hides the keys
at positions `window` or more before the query's (the cache records each row's position, so this
holds after rollbacks, kept tree paths and in a drafter's cache full of tree nodes alike); the
kernels that refuse SDPA (eager: Gemma 2's softcapping, gpt-oss's sinks) get it as an additive mask.
A server's and a local chain's caches trim sliding-window layers to their window and the block after
it (SpanCache, trim_windows).

A span lives on one device (weights, caches, compute): whatever hidden states, positions or mask
it is given move there first, so callers may hand it CPU tensors from the wire."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from ..devices import synchronize
from ..errors import BadValue
from .families import KVShape, kv_shape, layer_windows
from .weights import CheckpointLoader, load_config


class _Rows:
    """Keys and values of some layers of a span for a run of consecutive cache rows: row `base + i`
    is held at index i. Full-attention layers hold every row (base 0); sliding-window layers, when
    their cache trims, only the rows from `base` on (SpanCache.begin_block moves it)."""

    def __init__(self, layers: int, kv: KVShape, rows: int, dtype: torch.dtype, device: torch.device | str):
        self.keys = torch.zeros(layers, 1, kv.heads, rows, kv.key_dim, dtype=dtype, device=device)
        self.values = torch.zeros(layers, 1, kv.heads, rows, kv.value_dim, dtype=dtype, device=device)
        self.base = 0

    @property
    def rows(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def row_bytes(self) -> int:
        k, v = self.keys, self.values
        return k.shape[0] * k.shape[2] * (k.shape[4] * k.element_size() + v.shape[4] * v.element_size())

    def resize(self, rows: int, end: int) -> None:
        """Hold `rows` rows, keeping the held rows before `end`."""
        used = max(0, min(end - self.base, rows, self.rows))
        for name in ("keys", "values"):  # keys and values may differ in width (DeepSeek-V3's latent cache)
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], rows, old.shape[4]))
            new[:, :, :, :used] = old[:, :, :, :used]
            setattr(self, name, new)

    def move_base(self, base: int, end: int) -> None:
        """Forget the rows before `base` (>= self.base), keeping those up to `end`, moved down."""
        shift, used = base - self.base, end - base
        if shift > 0 and used > 0:
            for t in (self.keys, self.values):
                t[:, :, :, :used] = t[:, :, :, shift:shift + used].clone()
        self.base = base

    def gather(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if not self.keys.shape[0]:  # no layers here
            return
        self.keys[:, :, :, dst - self.base] = self.keys[:, :, :, src - self.base]
        self.values[:, :, :, dst - self.base] = self.values[:, :, :, src - self.base]

    def write(self, i: int, key: torch.Tensor, value: torch.Tensor, start: int, end: int):
        """Write layer i's rows [start, end); return its held rows up to end."""
        self.keys[i, :, :, start - self.base:end - self.base] = key
        self.values[i, :, :, start - self.base:end - self.base] = value
        return self.keys[i, :, :, :end - self.base], self.values[i, :, :, :end - self.base]


class SpanCache:
    """Keys and values of one session for the layers of one span.

    The attention modules call `update(k, v, layer_idx)`; each writes its block at `write_pos`
    and attends to everything before it. `length` is the number of valid rows; `positions` holds
    each row's position id (a tree's siblings share one), which sliding windows are measured in.

    trim_windows: sliding-window layers keep only the rows a later block can still see. A query at
    position q sees keys at positions > q - window; a block's queries sit at positions >= its
    commit_len (the wire checks it), and no row's position exceeds its row (a chain's position is
    its row, a tree node's depth is at most its index; begin_block checks it). So once a block
    starts at commit_len, rows before commit_len - window + 1 are never seen again by a block that
    starts at commit_len or later: those layers forget them by moving a base offset (gpt-fast
    style: rollback stays moving a position; rows are moved down only when the held ones run out),
    holding at most window - 1 + the longest block. A later block that rolls back past what they
    hold is refused (ValueError): exact or refused, never wrong. Clients roll back within the last
    block only (servers, LocalChain); the drafter, which re-roots trees several depths deep and
    rolls back to the longest prefix it shares with the text, keeps every row. gpt-oss's sinks and
    Gemma's softcapping act on the scores of keys the window lets through, so forgetting keys it
    hides changes nothing there either. The full-attention layers keep every row."""

    def __init__(self, config: PretrainedConfig, start: int, end: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", trim_windows: bool = False):
        kv = kv_shape(config)
        windows = layer_windows(config)[start:end]
        trimmed = [w for w in windows if w is not None] if trim_windows else []
        self.window = max(trimmed, default=None)  # the widest trimmed window (None: no layer trims)
        self.full = _Rows(len(windows) - len(trimmed), kv, capacity, dtype, device)
        self.sliding = _Rows(len(trimmed), kv, 0, dtype, device)
        counts = {id(self.full): 0, id(self.sliding): 0}
        self.slots: list[tuple[_Rows, int]] = []  # each layer's rows and its index among them
        for w in windows:
            rows = self.sliding if trim_windows and w is not None else self.full
            self.slots.append((rows, counts[id(rows)]))
            counts[id(rows)] += 1
        self.positions = torch.zeros(capacity, dtype=torch.long, device=device)
        self.start = start
        self.capacity = capacity
        self.length = 0
        self.write_pos = 0
        self.block = 0

    @property
    def keys(self) -> torch.Tensor:
        """The full-attention layers' keys (every layer's when none trims): [layers, 1, heads, rows, dim]."""
        return self.full.keys

    @property
    def nbytes(self) -> int:
        return self.full.nbytes + self.sliding.nbytes

    @property
    def window_start(self) -> int:
        """The first row the sliding-window layers hold (0 when they keep every row)."""
        return self.sliding.base

    def _sliding_rows(self, capacity: int, block: int) -> int:
        return min(capacity, max(self.sliding.rows, self.window - 1 + block)) if self.window is not None else 0

    def nbytes_for(self, capacity: int, block: int) -> int:
        """Bytes this cache holds once grown for `capacity` positions and a block of `block` (grow)."""
        capacity = max(capacity, self.capacity)
        return self.full.row_bytes * capacity + self.sliding.row_bytes * self._sliding_rows(capacity, block)

    def grow(self, capacity: int, block: int = 0) -> None:
        """Make room for `capacity` positions and, in trimmed sliding layers, for a block of `block`
        after their window, keeping what is cached: a server allocates (and charges, nbytes_for) a
        session's cache as its positions are written, not all up front (server/sessions.py)."""
        kept = max(self.length, self.write_pos + self.block)  # the last block's rows may still be kept
        if capacity > self.capacity:
            self.full.resize(capacity, kept)
            positions = self.positions.new_zeros(capacity)
            positions[:kept] = self.positions[:kept]
            self.positions, self.capacity = positions, capacity
        rows = self._sliding_rows(self.capacity, block)
        if rows > self.sliding.rows:
            self.sliding.resize(rows, kept)

    def begin_block(self, commit_len: int, block_len: int, kept: list[int] | None = None,
                    positions: torch.Tensor | None = None) -> None:
        """Keep only the `kept` positions of the last block (indices into it, gathered to its start),
        forget everything after commit_len (the rollback) and make room for block_len positions,
        whose position ids are `positions` ([block_len]; default commit_len, commit_len+1, ...).
        Calling it again for the same block changes nothing more (servers check a block first)."""
        if kept is not None:
            self._compact(kept)
        if not 0 <= commit_len <= self.length:
            raise ValueError(f"commit_len {commit_len} is outside the cached 0..{self.length} positions")
        if commit_len + block_len > self.capacity:
            raise ValueError(f"{commit_len} cached + {block_len} new positions exceed the session's {self.capacity}")
        rows = torch.arange(commit_len, commit_len + block_len, device=self.positions.device)
        positions = rows if positions is None else positions.to(self.positions.device)
        if self.window is not None:
            self._hold_window(commit_len, block_len, positions, rows)
        self.write_pos, self.block = commit_len, block_len
        self.positions[commit_len:commit_len + block_len] = positions

    def _hold_window(self, commit_len: int, block_len: int, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Make the trimmed sliding layers hold rows commit_len - window + 1 .. commit_len + block_len."""
        first = max(0, commit_len - self.window + 1)
        if first < self.sliding.base:
            raise ValueError(f"commit_len {commit_len} rolls back past the rows the sliding-window layers still "
                             f"hold (from {self.sliding.base}): a block may roll back within the last block only")
        if bool((positions > rows).any()) or bool((positions < commit_len).any()):
            raise ValueError(f"a block's positions must lie between its commit_len {commit_len} and its rows")
        end = commit_len + block_len
        if end - self.sliding.base > self.sliding.rows:
            self.sliding.move_base(first, commit_len)  # rows from commit_len on are this block's to write
            if end - first > self.sliding.rows:  # (a server grew it beforehand, and charged it: grow)
                self.sliding.resize(end - first, commit_len)

    def _compact(self, kept: list[int]) -> None:
        if self.length != self.write_pos + self.block:
            raise ValueError("the last block did not finish: there is nothing to keep positions of")
        if any(not 0 <= i < self.block for i in kept) or any(a >= b for a, b in zip(kept, kept[1:])):
            raise ValueError(f"kept positions must be strictly increasing indices into the last block of {self.block}")
        self._gather(self.write_pos, [self.write_pos + i for i in kept])
        self.length = self.write_pos + len(kept)
        self.block = len(kept)

    def end_block(self) -> None:
        self.length = self.write_pos + self.block

    def keep_rows(self, start: int, rows: list[int]) -> None:
        """Keep, of the positions from `start` on, only `rows` (absolute, strictly increasing, each
        >= start), moved down to start, start+1, ...; forget the rest (a drafter keeping the part of
        a tree that the text went on with)."""
        if any(not start <= r < self.length for r in rows) or any(a >= b for a, b in zip(rows, rows[1:])):
            raise ValueError(f"rows to keep must be strictly increasing positions in {start}..{self.length - 1}")
        self._gather(start, rows)
        self.length = self.write_pos = start + len(rows)
        self.block = 0

    def _gather(self, start: int, rows: list[int]) -> None:
        """Move the positions `rows` (increasing, each >= start) to start, start+1, ..."""
        if start < self.sliding.base:
            raise ValueError(f"rows from {start} on: the sliding-window layers hold rows from {self.sliding.base} only")
        moved = [(start + j, r) for j, r in enumerate(rows) if r != start + j]
        if moved:  # rows increase, so every one moves towards the start: gather, then write
            dst, src = (torch.tensor(x, device=self.positions.device) for x in zip(*moved))
            self.full.gather(dst, src)
            self.sliding.gather(dst, src)
            self.positions[dst] = self.positions[src]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        rows, i = self.slots[layer_idx - self.start]
        return rows.write(i, key, value, self.write_pos, self.write_pos + self.block)


def block_mask(commit_len: int, block_len: int, tree_mask: torch.Tensor | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The [1, 1, T, commit_len+T] boolean mask (True = may attend) for a block, on `device`.

    Within the block, causal order unless a tree mask says otherwise. A tree mask is [T, S]: the
    visibility of the last S key positions (S >= T; the block itself is the last T), and every
    position sees all earlier ones (the committed prefix). The wire carries [T, T]; the drafter,
    whose cache already holds the tree's earlier depths, passes wider ones. A lone token needs no
    mask at all."""
    if tree_mask is None:
        if block_len == 1:
            return None
        tree_mask = torch.ones(block_len, block_len, dtype=torch.bool, device=device).tril()
    width = tree_mask.shape[1]
    if tree_mask.shape[0] != block_len or not block_len <= width <= commit_len + block_len:
        raise ValueError(f"tree mask {list(tree_mask.shape)} does not fit a block of {block_len} after {commit_len}")
    prefix = torch.ones(block_len, commit_len + block_len - width, dtype=torch.bool, device=device)
    return torch.cat([prefix, tree_mask.to(device, torch.bool)], dim=1)[None, None]


def layer_masks(visible: torch.Tensor | None, query_pos: torch.Tensor, key_pos: torch.Tensor,
                windows: set[int | None], dtype: torch.dtype, additive: bool,
                held: Sequence[tuple[int, int]] = ()) -> dict[int | None, torch.Tensor | None]:
    """The mask for each window among `windows` (None: full causal attention), from the [B, 1, T, S]
    visibility `visible` (block_mask / batch_mask; None: all keys) of queries at positions
    `query_pos` [B, T] over keys at positions `key_pos` [B, S]: a sliding layer also hides keys
    `window` or more positions back, as transformers' sliding_window_overlay does. held: per batch
    row, the rows [start, end) that row's sliding-window layers hold (SpanCache.window_start): their
    masks cover those keys only. additive: as 0 / dtype-min floats (the eager kernels add the mask
    to the scores), else booleans (SDPA)."""
    masks: dict[int | None, torch.Tensor | None] = {}
    for window in windows:
        mask = visible
        if window is not None and int(query_pos.max()) >= window:  # else nothing is that far back
            near = (query_pos[:, None, :, None] - key_pos[:, None, None, :]) < window
            mask = near if visible is None else visible & near
        if window is not None and any(start for start, _ in held):  # (then some query is a window past 0)
            mask = held_columns(mask, held)
        if additive and mask is not None:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        masks[window] = mask
    return masks


def held_columns(mask: torch.Tensor, held: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Row b's mask over the key rows [start_b, end_b) alone, moved to the left, the batch padded to
    the longest (padding hidden): the keys a trimmed sliding layer holds (SpanCache._hold_window)."""
    out = mask.new_zeros((len(held), *mask.shape[1:3], max(end - start for start, end in held)))
    for b, (start, end) in enumerate(held):
        out[b, :, :, :end - start] = mask[b % mask.shape[0], :, :, start:end]
    return out


@dataclass
class Block:
    """One session's block in a batched forward (the arguments of Span.forward, one session's worth)."""

    hidden: torch.Tensor  # [1, T, H]
    cache: SpanCache
    commit_len: int
    tree_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    kept: list[int] | None = None  # positions of the session's previous block to keep (SpanCache.begin_block)

    @property
    def length(self) -> int:
        return self.hidden.shape[1]


class BatchCache:
    """The caches of a batch of sessions, seen by the attention modules as one cache of B rows.

    `update` writes each row's own block (its padding dropped) into its own session's cache and
    returns every row's keys and values padded to the longest (a trimmed sliding layer's: the rows
    it holds); the batch mask hides the padding."""

    def __init__(self, caches: Sequence[SpanCache]):
        self.caches = list(caches)
        self.width = max(c.write_pos + c.block for c in self.caches)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        held = [cache.update(key[i:i + 1, :, :cache.block], value[i:i + 1, :, :cache.block], layer_idx)
                for i, cache in enumerate(self.caches)]
        width = max(k.shape[2] for k, _ in held)
        keys = key.new_zeros(*key.shape[:2], width, key.shape[3])
        values = value.new_zeros(*value.shape[:2], width, value.shape[3])
        for i, (k, v) in enumerate(held):
            keys[i, :, :k.shape[2]] = k[0]
            values[i, :, :v.shape[2]] = v[0]
        return keys, values


def batch_mask(blocks: Sequence[Block], width: int, device: torch.device | str) -> torch.Tensor:
    """The [B, 1, T, width] mask of a padded batch: row b is block b's own mask (block_mask), its
    padding positions copy its last row (their outputs are dropped; they must just not be empty)."""
    longest = max(b.length for b in blocks)
    mask = torch.zeros(len(blocks), 1, longest, width, dtype=torch.bool, device=device)
    for i, b in enumerate(blocks):
        own = block_mask(b.commit_len, b.length, b.tree_mask, device)
        own = own[0, 0] if own is not None else torch.ones(1, b.commit_len + 1, dtype=torch.bool, device=device)
        mask[i, 0, :b.length, :own.shape[1]] = own
        mask[i, 0, b.length:, :own.shape[1]] = own[-1]
    return mask


class Span(nn.Module):
    """Decoder layers [start, end) and the rotary embedding they need, in `dtype` (the hidden states'
    dtype: a few families keep some weights, e.g. norms, in float32)."""

    def __init__(self, config: PretrainedConfig, start: int, end: int, layers: nn.ModuleList, rotary: nn.Module,
                 dtype: torch.dtype):
        super().__init__()
        self.config, self.start, self.end = config, start, end
        self.layers, self.rotary, self._dtype = layers, rotary, dtype
        self.windows = layer_windows(config)[start:end]
        self.additive_masks = config._attn_implementation == "eager"
        # Gemma 3's rotary embedding differs by layer type (local and global RoPE bases)
        per_type = "layer_type" in inspect.signature(rotary.forward).parameters
        self.rope_types = list(config.layer_types[start:end]) if per_type else [None] * (end - start)
        self.loaded_keys: list[str] = []

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return next(self.layers.parameters()).device

    @classmethod
    def load(cls, model_dir: Path, start: int, end: int, dtype: torch.dtype = torch.bfloat16,
             device: torch.device | str = "cpu") -> "Span":
        """Read only the tensors of layers [start, end) from a converted model directory onto `device`
        (one layer at a time, so the CPU never holds more than one layer of a GPU span)."""
        config = load_config(model_dir)
        n = config.num_hidden_layers
        if not 0 <= start < end <= n:
            raise BadValue(f"layers {start}:{end} are not a span of this {n}-layer model")
        loader = CheckpointLoader(model_dir, config, dtype, device)
        layers = nn.ModuleList(loader.part(f"model.layers.{i}") for i in range(start, end))
        span = cls(config, start, end, layers, loader.part("model.rotary_emb"), dtype)
        span.loaded_keys = loader.reader.read
        return span

    @classmethod
    def of_model(cls, model: nn.Module, start: int, end: int) -> "Span":
        """Layers [start, end) of an already loaded transformers CausalLM (shares its weights)."""
        layers = model.model.layers[start:end]
        return cls(model.config, start, end, layers, model.model.rotary_emb, next(layers.parameters()).dtype)

    def sub(self, start: int, end: int) -> "Span":
        """Layers [start, end) of this span, sharing their weights (a hop may serve part of its span)."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"layers {start}:{end} are not inside this span {self.start}:{self.end}")
        if (start, end) == (self.start, self.end):
            return self
        return Span(self.config, start, end, self.layers[start - self.start:end - self.start], self.rotary, self.dtype)

    def new_cache(self, capacity: int, trim_windows: bool = False) -> SpanCache:
        """trim_windows: for owners that roll back within the last block only (SpanCache)."""
        return SpanCache(self.config, self.start, self.end, capacity, self.dtype, self.device, trim_windows)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        cache: SpanCache,
        commit_len: int,
        tree_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kept: list[int] | None = None,
    ) -> torch.Tensor:
        """Run a block [1, T, H] after the first commit_len cached positions; append it to the cache.

        tree_mask: see block_mask; position_ids: [1, T] (default commit_len..commit_len+T-1);
        kept: positions of the previous block to keep first (SpanCache.begin_block).

        The result is on the span's device, its work finished: callers time this call, and the
        server sends the result on at once anyway."""
        device = self.device
        hidden = hidden.to(device, self.dtype)  # a float32 (int8-quantized) draft span after a bfloat16 head
        block_len = hidden.shape[1]
        if position_ids is None:
            position_ids = torch.arange(commit_len, commit_len + block_len, device=device)[None]
        position_ids = position_ids.to(device)
        cache.begin_block(commit_len, block_len, kept, position_ids[0])
        end = commit_len + block_len
        masks = layer_masks(block_mask(commit_len, block_len, tree_mask, device), position_ids,
                            cache.positions[None, :end], set(self.windows), self.dtype, self.additive_masks,
                            [(cache.window_start, end)])
        hidden = self._layers(hidden, position_ids, cache, masks)
        cache.end_block()
        synchronize(device)
        return hidden

    @torch.inference_mode()
    def forward_batch(self, blocks: Sequence[Block]) -> list[torch.Tensor]:
        """Run the blocks of several sessions in one pass over the layers (each after its own
        commit_len, with its own cache, mask and positions), so the weights are read once for all.

        Blocks are padded to the longest and stacked; a per-row mask (batch_mask) keeps every
        session to its own cache and block. Returns each block's output [1, T_i, H], in order. Each
        cache is checked (begin_block) before any work, so a bad block fails before it touches the
        others' caches; callers check blocks one by one first to fail only the bad one."""
        device = self.device
        longest = max(b.length for b in blocks)
        hidden = torch.zeros(len(blocks), longest, self.config.hidden_size, dtype=blocks[0].hidden.dtype,
                             device=device)
        positions = torch.zeros(len(blocks), longest, dtype=torch.long, device=device)
        for i, b in enumerate(blocks):
            hidden[i, :b.length] = b.hidden[0].to(device)
            own = b.position_ids if b.position_ids is not None else \
                torch.arange(b.commit_len, b.commit_len + b.length)[None]
            positions[i, :b.length] = own[0].to(device)
            positions[i, b.length:] = positions[i, b.length - 1]
        for i, b in enumerate(blocks):
            b.cache.begin_block(b.commit_len, b.length, positions=positions[i, :b.length])
        cache = BatchCache([b.cache for b in blocks])
        key_pos = torch.zeros(len(blocks), cache.width, dtype=torch.long, device=device)
        for i, c in enumerate(cache.caches):
            key_pos[i, :c.write_pos + c.block] = c.positions[:c.write_pos + c.block]
        masks = layer_masks(batch_mask(blocks, cache.width, device), positions, key_pos, set(self.windows),
                            self.dtype, self.additive_masks,
                            [(c.window_start, c.write_pos + c.block) for c in cache.caches])
        hidden = self._layers(hidden, positions, cache, masks)
        for b in blocks:
            b.cache.end_block()
        synchronize(device)
        return [hidden[i:i + 1, :b.length] for i, b in enumerate(blocks)]

    def _layers(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: SpanCache | BatchCache,
                masks: dict[int | None, torch.Tensor | None]) -> torch.Tensor:
        """Every layer over `hidden`, each with its own window's mask and its own layer type's RoPE."""
        ropes = {t: self.rotary(hidden, position_ids, t) if t else self.rotary(hidden, position_ids)
                 for t in set(self.rope_types)}
        for layer, window, rope_type in zip(self.layers, self.windows, self.rope_types):
            hidden = layer(hidden, attention_mask=masks[window], position_ids=position_ids,
                           past_key_values=cache, position_embeddings=ropes[rope_type])
        return hidden
