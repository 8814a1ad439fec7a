"""The KV cache of a batch of speculative requests: one compact row per request.

Rows accept different numbers of tokens each step, so they drift apart: a batch cache
with one shared length would leave holes that grow without bound. :class:`RowCache` is a
transformers :class:`~transformers.Cache` (through its public layer API) whose layers
write each new token at the cache index the verifier chose for it, per row:

* row ``b`` keeps its ``past[b]`` committed tokens at ``0 .. past[b] - 1`` — index equals
  position, with no holes, so sliding windows and tree masks are plain comparisons;
* a tree step writes its ``S`` slots at ``past[b] .. past[b] + S - 1``; after acceptance
  :meth:`RowCache.move` copies the accepted slots right behind the committed tokens;
  whatever lies beyond a row's length is dead and overwritten by the next step;
* the last index (``scratch``) takes the writes of padding (prompt padding, identity
  moves) and is never visible.

Every layer keeps all of its tokens — sliding-window layers too: their window is applied
by the attention mask (see :mod:`retrospec.buffers`), which makes rolling back rejected
tree tokens a copy instead of a lossy trim.

The tensors are allocated once, ``[B, heads, capacity, head_dim]`` per layer, and updated
in place, so a fixed-shape verification can be captured as a CUDA graph.
"""

from __future__ import annotations

import logging

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

log = logging.getLogger(__name__)


class _Writes:
    """What the next forward writes where; shared by every layer of one cache."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None  # long [b, N]: cache index of each new token
        self.rows: torch.Tensor | None = None  # long [b]: cache rows of the forward's rows (None: all)
        self.view = 0  # keys the forward attends over (a prefix of the capacity)


class RowLayer(CacheLayerMixin):
    """One layer of a :class:`RowCache` (see the module docstring)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, writes: _Writes, batch: int, capacity: int):
        super().__init__()
        self.writes, self.batch, self.capacity = writes, batch, capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        heads, device = key_states.shape[1], key_states.device
        self.keys = torch.zeros(self.batch, heads, self.capacity, key_states.shape[-1], dtype=key_states.dtype, device=device)
        self.values = torch.zeros(self.batch, heads, self.capacity, value_states.shape[-1], dtype=value_states.dtype, device=device)
        self.device = device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        w = self.writes
        index = w.index[:, None, :, None]
        keys = self.keys if w.rows is None else self.keys.index_select(0, w.rows)
        values = self.values if w.rows is None else self.values.index_select(0, w.rows)
        keys.scatter_(2, index.expand(-1, keys.shape[1], -1, keys.shape[-1]), key_states)
        values.scatter_(2, index.expand(-1, values.shape[1], -1, values.shape[-1]), value_states)
        if w.rows is not None:  # a forward over some rows only (admitting new requests)
            self.keys.index_copy_(0, w.rows, keys)
            self.values.index_copy_(0, w.rows, values)
        return keys[:, :, : w.view], values[:, :, : w.view]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.writes.view, 0

    def get_seq_length(self) -> int:
        return self.writes.view

    def get_max_length(self) -> int:
        return self.capacity

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for tensor in (self.keys, self.values):
            shape = (-1, tensor.shape[1], -1, tensor.shape[-1])
            moved = tensor.gather(2, src[:, None, :, None].expand(*shape))
            tensor.scatter_(2, dst[:, None, :, None].expand(*shape), moved)


class RowCache(Cache):
    """Per-row compact KV cache for ``batch`` rows of ``capacity`` indices (the last one is
    the scratch index). Set what a forward writes with :meth:`prepare` first.

    >>> from transformers import LlamaConfig
    >>> cache = RowCache(LlamaConfig(num_hidden_layers=2), batch=2, capacity=8)
    >>> cache.scratch, len(cache.layers)
    (7, 2)
    """

    def __init__(self, config, batch: int, capacity: int):
        if batch < 1 or capacity < 2:
            raise ValueError(f"a RowCache needs batch >= 1 and capacity >= 2, got {batch}, {capacity}")
        text = config.get_text_config(decoder=True)
        self.writes = _Writes()
        self.batch, self.capacity = batch, capacity
        super().__init__(layers=[RowLayer(self.writes, batch, capacity) for _ in range(text.num_hidden_layers)])

    @property
    def scratch(self) -> int:
        """The index padding writes go to (never visible)."""
        return self.capacity - 1

    def prepare(self, cache_index: torch.Tensor, view: int, rows: torch.Tensor | None = None) -> None:
        """The next forward writes its token ``[r, n]`` at ``cache_index[r, n]`` of cache row
        ``rows[r]`` (all rows when ``None``) and attends over the first ``view`` indices."""
        if view > self.capacity:
            raise ValueError(f"a view of {view} keys exceeds the cache capacity {self.capacity}")
        self.writes.index, self.writes.rows, self.writes.view = cache_index, rows, int(view)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Per row, copy the entries at ``src[b]`` to ``dst[b]`` (``long [B, M]``; pad with
        ``scratch`` → ``scratch``)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.move(src, dst)

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (in that order): finished requests stop costing work."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.index_select(0, keep)
                layer.values = layer.values.index_select(0, keep)
            layer.batch = int(keep.shape[0])
        self.batch = int(keep.shape[0])

    def copy_rows(self, other: RowCache, rows: torch.Tensor, length: int) -> None:
        """Copy ``other``'s first ``length`` indices of ``rows`` into this cache's rows
        ``0 .. len(rows) - 1`` (moving a batch to a smaller fixed-shape verifier)."""
        for mine, theirs in zip(self.layers, other.layers):
            if not theirs.is_initialized:
                continue
            if not mine.is_initialized:
                mine.lazy_initialization(theirs.keys[:1, :, :1], theirs.values[:1, :, :1])
            n = int(rows.shape[0])
            mine.keys[:n, :, :length] = theirs.keys.index_select(0, rows)[:, :, :length]
            mine.values[:n, :, :length] = theirs.values.index_select(0, rows)[:, :, :length]

    def grow(self, capacity: int) -> None:
        """More indices per row (dynamic verifiers only: a captured graph holds the old tensors)."""
        if capacity <= self.capacity:
            return
        for layer in self.layers:
            if layer.is_initialized:
                for name in ("keys", "values"):
                    old = getattr(layer, name)
                    new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[-1])
                    new[:, :, : self.capacity - 1] = old[:, :, : self.capacity - 1]  # the old scratch is dead
                    setattr(layer, name, new)
            layer.capacity = capacity
        self.capacity = capacity

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.writes.view
