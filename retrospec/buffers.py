"""How draft trees become the tensors of one forward: ids, positions, cache slots, the mask.

Every forward that reads a tree — the verifiers (dynamic and static, one row or a batch),
the draft model, the step-cost measurement — gets its inputs here, so a change to the
tree mask is made once and every path sees it.

The cache layout (see :mod:`retrospec.verify.cache`): row ``b`` of the KV cache holds its
``past[b]`` committed tokens compactly at indices ``0 .. past[b] - 1`` (index == position),
and a step writes its ``S`` slots at ``past[b] .. past[b] + S - 1``. Slot 0 is the row's
*root* (its last committed token, not yet cached); slot ``i + 1`` is tree node ``i``; slots
past a row's tree are padding (the root token again, seeing only itself).

Two steps, so that a fixed-shape verifier can keep the second inside its CUDA graph:

1. :func:`tree_layout` (host, numpy): token ids, positions, each slot's parent slot, and
   which slots each slot sees (itself and its ancestors), padded to ``slots``;
2. :func:`attention_mask` (device, torch, fixed shapes): the float additive mask
   ``[B, 1, S, K]`` — the committed tokens (cut by a sliding window where a layer has
   one), then the tree block at each row's own offset.

:func:`tree_buffers` does both.

>>> from retrospec.tree import DraftTree
>>> b = tree_buffers([DraftTree.from_paths([[7, 8], [9]])], roots=[3], past=[2])
>>> b.input_ids.tolist(), b.position_ids.tolist(), b.cache_index.tolist()
([[3, 7, 8, 9]], [[2, 3, 4, 3]], [[2, 3, 4, 5]])
>>> (b.attention_mask[0, 0] == 0).int().tolist()
[[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from retrospec.jit import njit
from retrospec.tree import DraftTree

if TYPE_CHECKING:  # torch is imported where tensors are built: trees need only numpy
    import torch

ROOT_SLOT = 0
NO_PARENT = -1
"""``parent_slots`` of the root."""
PAD_SLOT = -2
"""``parent_slots`` of a padding slot (no node: acceptance never reaches it)."""

SLIDING_TYPES = ("sliding_attention",)
FULL_TYPES = ("full_attention",)


def layer_windows(config) -> dict[str, int | None]:
    """Attention layer types of a model and their sliding windows (``None`` = full attention).

    Raises ``ValueError`` for layer kinds a tree mask cannot express (linear attention,
    state-space layers, chunked attention).

    >>> from transformers import LlamaConfig
    >>> layer_windows(LlamaConfig())
    {'full_attention': None}
    """
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if not layer_types:
        # no per-layer types: either all layers slide (Mistral-style) or none does
        uses_window = window is not None and getattr(text, "use_sliding_window", True)
        return {"full_attention": int(window) if uses_window else None}
    out: dict[str, int | None] = {}
    for layer_type in dict.fromkeys(layer_types):
        if layer_type in FULL_TYPES:
            out[layer_type] = None
        elif layer_type in SLIDING_TYPES:
            if window is None:
                raise ValueError(f"{type(config).__name__} has sliding layers but no sliding_window")
            out[layer_type] = int(window)
        else:
            raise ValueError(
                f"layer type {layer_type!r} of {type(config).__name__} cannot be verified with a tree mask; "
                "retrospec supports full and sliding-window attention"
            )
    return out


class TreeLayout(NamedTuple):
    """A batch of trees laid out in ``S`` slots per row, on the host (see the module docstring).

    Attributes:
        input_ids: ``int64 [B, S]``.
        positions: ``int64 [B, S]``: ``past[b] + depth``.
        parent_slots: ``int64 [B, S]``: the parent slot of each slot, ``NO_PARENT`` for the
            root, ``PAD_SLOT`` for padding.
        sees: ``bool [B, S, S]``: ``sees[b, i, j]`` iff slot ``j`` is slot ``i`` or one of
            its ancestors.
        sizes: ``int64 [B]``: slots in use (root + nodes).
        past: ``int64 [B]``: committed tokens in each row's cache.
    """

    input_ids: np.ndarray
    positions: np.ndarray
    parent_slots: np.ndarray
    sees: np.ndarray
    sizes: np.ndarray
    past: np.ndarray


class TreeBuffers(NamedTuple):
    """Everything one tree forward needs, on the model's device (plus the host tables).

    Attributes:
        input_ids: ``LongTensor [B, S]``.
        position_ids: ``LongTensor [B, S]``.
        attention_mask: float additive ``[B, 1, S, K]`` in the model dtype (``0`` =
            visible, dtype min = masked), or a dict of such masks by layer type for models
            that mix full and sliding-window attention.
        cache_index: ``LongTensor [B, S]``: where each slot's keys and values are written
            (``past[b] + slot``).
        parent_slots: ``int64 [B, S]`` (numpy), as in :class:`TreeLayout`.
        sizes: ``int64 [B]`` (numpy): slots in use per row.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | dict[str, torch.Tensor]
    cache_index: torch.Tensor
    parent_slots: np.ndarray
    sizes: np.ndarray


@njit()
def _layout(tokens, parents, offsets, roots, past, ids, positions, parent_slots, sees, sizes):
    """Fill the ``[B, S]`` tables in place. Invariant: a tree's parents come first, so a
    slot's ancestors are known (row ``sees[b, parent]``) when the slot is reached."""
    for b in range(ids.shape[0]):
        n = offsets[b + 1] - offsets[b]
        sizes[b] = n + 1
        for i in range(ids.shape[1]):
            ids[b, i] = roots[b]
            positions[b, i] = past[b]
            parent_slots[b, i] = -2
            for j in range(ids.shape[1]):
                sees[b, i, j] = i == j
        parent_slots[b, 0] = -1
        for k in range(n):
            slot = k + 1
            parent = parents[offsets[b] + k] + 1  # the root's children hang from slot 0
            ids[b, slot] = tokens[offsets[b] + k]
            parent_slots[b, slot] = parent
            positions[b, slot] = positions[b, parent] + 1
            for j in range(slot):
                sees[b, slot, j] = sees[b, parent, j]


def tree_layout(
    trees: Sequence[DraftTree], roots: Sequence[int], past: Sequence[int], slots: int | None = None, out: TreeLayout | None = None
) -> TreeLayout:
    """Lay out one tree per row behind its root, padded to ``slots`` (default: the largest
    tree + 1, the exact size); into the arrays of ``out`` when given (e.g. pinned memory).

    >>> t = tree_layout([DraftTree.from_paths([[5, 6]]), DraftTree.empty()], roots=[1, 2], past=[4, 9])
    >>> t.input_ids.tolist(), t.positions.tolist(), t.parent_slots.tolist()
    ([[1, 5, 6], [2, 2, 2]], [[4, 5, 6], [9, 9, 9]], [[-1, 0, 1], [-1, -2, -2]])
    """
    batch = len(trees)
    if not batch or len(roots) != batch or len(past) != batch:
        raise ValueError(f"need one root and one cache length per tree; got {batch} trees, {len(roots)} roots, {len(past)} lengths")
    widest = max(len(t) for t in trees) + 1
    slots = widest if slots is None else int(slots)
    if slots < widest:
        raise ValueError(f"a tree of {widest - 1} nodes does not fit {slots} slots (root included)")
    offsets = np.zeros(batch + 1, np.int64)
    offsets[1:] = np.cumsum([len(t) for t in trees])
    tokens = np.concatenate([t.tokens for t in trees]).astype(np.int64) if offsets[-1] else np.zeros(0, np.int64)
    parents = np.concatenate([t.parents for t in trees]).astype(np.int64) if offsets[-1] else np.zeros(0, np.int64)
    if out is None:
        out = TreeLayout(np.empty((batch, slots), np.int64), np.empty((batch, slots), np.int64), np.empty((batch, slots), np.int64),
                         np.empty((batch, slots, slots), np.bool_), np.empty(batch, np.int64), np.empty(batch, np.int64))
    elif out.input_ids.shape != (batch, slots):
        raise ValueError(f"out holds {out.input_ids.shape} slots, the layout needs {(batch, slots)}")
    out.past[:] = past
    _layout(tokens, parents, offsets, np.asarray(roots, np.int64), out.past, *out[:5])
    return out


def attention_mask(
    sees: torch.Tensor,
    committed: torch.Tensor,
    base: torch.Tensor,
    query_positions: torch.Tensor,
    tree_positions: torch.Tensor,
    key_len: int,
    windows: dict[str, int | None] | None,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The float additive mask of a tree forward; fixed shapes only (safe inside a CUDA graph).

    Query ``q`` of row ``b`` sees the row's ``committed[b]`` cached tokens (key index ==
    position), and tree slot ``t`` — cached at ``base[b] + t`` — iff ``sees[b, q, t]``. A
    layer with a sliding window ``w`` also hides every key ``w`` or more positions behind
    the query, as plain decoding would.

    Args:
        sees: ``bool [B, Q, T]``; committed, base: ``long [B]``;
        query_positions: ``long [B, Q]``; tree_positions: ``long [B, T]``;
        key_len: ``K``, the keys the forward attends over.

    Returns ``[B, 1, Q, K]`` in ``dtype`` (a dict by layer type when ``windows`` has several).
    """
    import torch

    batch, queries, tree = sees.shape
    keys = torch.arange(key_len, device=sees.device)
    in_context = keys[None, None, :] < committed[:, None, None]  # [B, 1, K]
    rel = keys[None, :] - base[:, None]  # [B, K]: tree slot of each key, if any
    in_tree = (rel >= 0) & (rel < tree)
    slot = rel.clamp(0, tree - 1)
    tree_sees = sees.gather(2, slot[:, None, :].expand(batch, queries, key_len)) & in_tree[:, None, :]
    key_tree_pos = tree_positions.gather(1, slot)  # [B, K]
    minimum = torch.finfo(dtype).min
    masks = {}
    for layer_type, window in (windows or {"full_attention": None}).items():
        context, tree_part = in_context, tree_sees
        if window is not None:
            oldest = query_positions[:, :, None] - window  # keys at or before this are out of the window
            context = context & (keys[None, None, :] > oldest)
            tree_part = tree_part & (key_tree_pos[:, None, :] > oldest)
        visible = context | tree_part
        zero = torch.zeros((), dtype=dtype, device=sees.device)
        masks[layer_type] = torch.where(visible, zero, torch.full((), minimum, dtype=dtype, device=sees.device))[:, None]
    return next(iter(masks.values())) if len(masks) == 1 else masks


def tree_buffers(
    trees: Sequence[DraftTree],
    roots: Sequence[int],
    past: Sequence[int],
    *,
    slots: int | None = None,
    key_len: int | None = None,
    windows: dict[str, int | None] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> TreeBuffers:
    """:func:`tree_layout` + :func:`attention_mask`: the inputs of one tree forward.

    ``slots`` pads every row to that many slots (default: exact); ``key_len`` is the key
    length the forward attends over (default: ``max(past) + slots``, exact; a static cache
    passes its capacity). The mask has ``dtype`` (default float32).
    """
    import torch

    layout = tree_layout(trees, roots, past, slots)
    width = layout.input_ids.shape[1]
    key_len = int(layout.past.max()) + width if key_len is None else int(key_len)
    if int(layout.past.max()) + width > key_len:
        raise ValueError(f"{int(layout.past.max())} cached tokens + {width} slots exceed the {key_len} keys")
    to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    positions, past_t = to(layout.positions), to(layout.past)
    mask = attention_mask(to(layout.sees), past_t, past_t, positions, positions, key_len, windows,
                          torch.float32 if dtype is None else dtype)
    return TreeBuffers(
        input_ids=to(layout.input_ids),
        position_ids=positions,
        attention_mask=mask,
        cache_index=past_t[:, None] + torch.arange(width, device=device)[None],
        parent_slots=layout.parent_slots,
        sizes=layout.sizes,
    )


def to_buffers(
    tree: DraftTree,
    root_token: int,
    past_len: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    windows: dict[str, int | None] | None = None,
) -> TreeBuffers:
    """:func:`tree_buffers` of one tree (batch of one, exact sizes).

    >>> b = to_buffers(DraftTree.from_paths([[7, 8], [9]]), root_token=3, past_len=2)
    >>> b.input_ids.tolist(), b.parent_slots.tolist()
    ([[3, 7, 8, 9]], [[-1, 0, 1, 0]])
    """
    return tree_buffers([tree], [root_token], [past_len], windows=windows, dtype=dtype, device=device)


def prefill_buffers(
    lengths: Sequence[int],
    width: int,
    *,
    key_len: int | None = None,
    scratch: int | None = None,
    windows: dict[str, int | None] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | dict]:
    """Positions, cache indices and mask of a left-padded prompt batch ``[B, width]``.

    Row ``b``'s ``lengths[b]`` real tokens are its last columns; they are cached compactly
    at ``0 .. lengths[b] - 1`` and see their causal past (within each layer's window). The
    padding columns write to ``scratch`` (default: the last key) and see only key 0, so
    their rows stay finite; nothing real ever sees them.

    Returns ``(position_ids [B, W], cache_index [B, W], mask [B, 1, W, K])``.

    >>> pos, index, mask = prefill_buffers([2, 3], 3, key_len=4)
    >>> pos.tolist(), index.tolist()
    ([[0, 0, 1], [0, 1, 2]], [[3, 0, 1], [0, 1, 2]])
    >>> (mask[0, 0] == 0).int().tolist()
    [[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    """
    import torch

    lengths_t = torch.as_tensor(list(lengths), dtype=torch.long, device=device)
    if bool((lengths_t < 1).any()) or bool((lengths_t > width).any()):
        raise ValueError(f"prompt lengths must be in [1, {width}], got {lengths_t.tolist()}")
    key_len = width if key_len is None else int(key_len)
    scratch = key_len - 1 if scratch is None else int(scratch)
    pad = width - lengths_t  # [B]
    cols = torch.arange(width, device=device)
    real = cols[None, :] >= pad[:, None]
    positions = (cols[None, :] - pad[:, None]).clamp(min=0)
    cache_index = torch.where(real, positions, torch.full_like(positions, scratch))
    keys = torch.arange(key_len, device=device)
    dtype = torch.float32 if dtype is None else dtype
    minimum = torch.finfo(dtype).min
    masks = {}
    for layer_type, window in (windows or {"full_attention": None}).items():
        visible = keys[None, None, :] <= positions[:, :, None]
        if window is not None:
            visible = visible & (keys[None, None, :] > positions[:, :, None] - window)
        visible = (visible & real[:, :, None]) | (~real[:, :, None] & (keys[None, None, :] == 0))
        masks[layer_type] = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, minimum)[:, None]
    mask = next(iter(masks.values())) if len(masks) == 1 else masks
    return positions, cache_index, mask
