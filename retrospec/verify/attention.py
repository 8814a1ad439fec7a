"""Tree attention for grouped-query models without copying keys and values per head.

A tree step asks attention for ``1 + S`` queries per row against the row's cache, with a
float additive mask. transformers' ``sdpa`` attention serves one query per row by packing a
key-value head's query heads into one batch of rows (``pack_gqa``), but with more queries
and a mask it repeats every cached key and value once per query head (``repeat_kv``) before
calling ``scaled_dot_product_attention``. For SmolLM2-135M (9 query heads on 3 key-value
heads, 30 layers) at batch 4 with 800 cached tokens that copy is ~440 MB a step on a CPU:
a 2-token forward cost 1.55x a 1-token one, where the weights it reads are the same.

:data:`NAME` is the same computation with the packing extended to many queries: the
``G`` query heads of a key-value head and the ``q`` queries become ``G * q`` rows that attend
to that head's keys once, under the mask repeated per head (a few hundred KB). It is
registered through transformers' public ``AttentionInterface``; anything it does not cover
(one query, no groups, no 4D mask, a per-head mask, position biases, soft-capping, dropout)
goes to transformers' own ``sdpa`` unchanged. :func:`tree_attention` switches a model that
uses ``sdpa`` to it for a call and back (``set_attn_implementation``): ``generate()`` and the
step-cost measurement run under it.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

log = logging.getLogger(__name__)

NAME = "retrospec_sdpa"


def tree_attention_name(current: str | None) -> str | None:
    """The attention a tree step runs with, for a model configured with ``current``: flash
    attention cannot take a tree mask and sdpa repeats the cache per head, so both become
    :data:`NAME`; eager and the rest stay as they are."""
    if isinstance(current, str) and ("flash" in current or current == "sdpa"):
        return NAME
    return current


@contextlib.contextmanager
def tree_attention(model):
    """Run the block with :func:`tree_attention_name`'s attention, then switch back."""
    current = getattr(model.config, "_attn_implementation", None)
    wanted = tree_attention_name(current)
    if wanted == current:
        yield
        return
    if "flash" in current:
        log.info("retrospec: attention %s cannot take a tree mask; using %s for this call", current, wanted)
    model.set_attn_implementation(wanted)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs):
    """``sdpa`` attention (same arguments, same ``(output [B, q, H, D], None)``), with the
    query heads of each key-value head packed into rows instead of repeating the keys."""
    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q, d = query.shape
    if (groups <= 1 or q == 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or dropout > 0.0 or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions") or key.shape[1] * groups != heads):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                               is_causal=is_causal, **kwargs)
    kv_heads, kv = key.shape[1], key.shape[2]
    # head h = k * groups + g reads key-value head k (repeat_kv's order): rows (g, query) of head k
    packed = query.reshape(b, kv_heads, groups * q, d)
    mask = attention_mask[:, :, :, :kv]
    mask = mask[:, :, None].expand(mask.shape[0], 1, groups, q, kv).reshape(mask.shape[0], 1, groups * q, kv)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, q, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # masks built the way sdpa's are
