"""The KV cache of a speculative request, and its compaction to the accepted path.

retrospec gives every request a plain :class:`~transformers.DynamicCache` with full-length
layers — also for sliding-window models: their window is applied by the attention mask
(see :func:`layer_windows`), which makes rolling back rejected tree tokens a simple crop
instead of the sliding layers' lossy trim.

After a verification forward the cache holds ``past_len`` committed tokens and then the
``N + 1`` tree slots. :func:`keep_path` moves the accepted slots' entries right behind the
committed ones and crops the rest, so the next step starts from exactly the cache plain
decoding would have.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import DynamicCache

log = logging.getLogger(__name__)

SLIDING_TYPES = ("sliding_attention",)
FULL_TYPES = ("full_attention",)


def new_cache() -> DynamicCache:
    """An empty cache whose layers keep every token (windows come from the mask)."""
    return DynamicCache()


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


def keep_path(cache: DynamicCache, past_len: int, slots: np.ndarray) -> None:
    """Keep the cache entries of ``slots`` (ascending, starting with the root slot 0).

    Before: ``past_len`` committed entries, then one entry per verified slot. After:
    ``past_len + len(slots)`` entries, the kept slots in order.
    """
    keep = slots.shape[0]
    total = cache.get_seq_length()
    if not np.array_equal(slots, np.arange(keep)):
        for layer in cache.layers:
            index = torch.as_tensor(past_len + slots, device=layer.keys.device)
            layer.keys[:, :, past_len : past_len + keep] = layer.keys.index_select(2, index)
            layer.values[:, :, past_len : past_len + keep] = layer.values.index_select(2, index)
    drop = total - (past_len + keep)
    if drop > 0:
        cache.crop(-drop)
