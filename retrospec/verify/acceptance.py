"""Acceptance: which drafted tokens a verified tree commits, row by row.

Greedy acceptance follows, from the root, the child whose token is the argmax of its
parent's logits, and adds the argmax after the last accepted node as a bonus token — the
tokens plain greedy decoding would produce. Sampling acceptance draws a token from the
processed target distribution at each node and descends while a child carries it: since
the draft never depends on the draw, every committed token is an exact sample from the
model (the rule used by SpecInfer/Medusa for deterministic drafts; "typical acceptance"
would not be lossless).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from retrospec.jit import njit


class Acceptance(NamedTuple):
    """The outcome of one row's verification.

    Attributes:
        slots: ``int64 [A]`` accepted slots, starting with the root slot 0.
        tokens: the tokens to commit: the accepted nodes' tokens, then the bonus token.
    """

    slots: np.ndarray
    tokens: list[int]


def predictions(logits: torch.Tensor, topk: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Each slot's argmax (and its top-k, when a source wants them), in one device-to-host
    copy: ``logits [..., V]`` -> ``int64 [...]`` and ``int64 [..., k]`` (or ``None``)."""
    preds = logits.argmax(dim=-1, keepdim=True)
    if topk:
        both = torch.cat([preds, logits.topk(topk, dim=-1).indices], dim=-1).cpu().numpy()
        return both[..., 0], both[..., 1:]
    return preds[..., 0].cpu().numpy(), None


@njit()
def _walk(slot_tokens, parent_slots, preds, sizes, paths, lengths):
    """Per row, the greedy path from the root (children come after their parent)."""
    for b in range(slot_tokens.shape[0]):
        n = sizes[b]
        paths[b, 0], length, slot = 0, 1, 0
        while True:
            nxt = -1
            for child in range(slot + 1, n):
                if parent_slots[b, child] == slot and slot_tokens[b, child] == preds[b, slot]:
                    nxt = child
                    break
            if nxt < 0:
                break
            paths[b, length] = nxt
            length += 1
            slot = nxt
        lengths[b] = length


def accept_greedy(
    slot_tokens: np.ndarray, parent_slots: np.ndarray, preds: np.ndarray, sizes: np.ndarray | None = None
) -> list[Acceptance]:
    """Greedy acceptance of every row, from each slot's argmax ``preds`` (all ``[B, S]``;
    ``sizes [B]``: slots in use, default all).

    >>> accept_greedy(np.array([[1, 5, 6, 7]]), np.array([[-1, 0, 1, 0]]), np.array([[5, 9, 0, 0]]))
    [Acceptance(slots=array([0, 1]), tokens=[5, 9])]
    """
    batch, width = slot_tokens.shape
    sizes = np.full(batch, width, np.int64) if sizes is None else np.asarray(sizes, np.int64)
    paths = np.empty((batch, width), np.int64)
    lengths = np.empty(batch, np.int64)
    _walk(slot_tokens, parent_slots, preds, sizes, paths, lengths)
    out = []
    for b in range(batch):
        slots = paths[b, : lengths[b]].copy()
        out.append(Acceptance(slots, slot_tokens[b, slots[1:]].tolist() + [int(preds[b, slots[-1]])]))
    return out


def accept_walk(
    slot_tokens: np.ndarray,
    parent_slots: np.ndarray,
    logits: torch.Tensor,
    prefix: torch.Tensor,
    logits_processor,
    do_sample: bool,
) -> Acceptance:
    """Acceptance of one row with logits processors and/or sampling, one node at a time.

    ``slot_tokens``, ``parent_slots``: ``[S]``; ``logits``: ``[S, V]``. At each node the
    processors see that node's own prefix (``prefix`` ends with the root token; ``[1, L]``),
    exactly as plain ``generate()`` would show it.
    """
    children: dict[tuple[int, int], int] = {}
    for slot in range(1, slot_tokens.shape[0]):
        if parent_slots[slot] >= 0:
            children[(int(parent_slots[slot]), int(slot_tokens[slot]))] = slot
    slots = [0]
    committed: list[int] = []
    ids = prefix
    while True:
        slot = slots[-1]
        token = pick_token(logits[slot : slot + 1], ids, logits_processor, do_sample)
        committed.append(token)
        child = children.get((slot, token))
        if child is None:
            return Acceptance(np.asarray(slots, np.int64), committed)
        slots.append(child)
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)


def pick_token(logits: torch.Tensor, prefix: torch.Tensor, logits_processor, do_sample: bool) -> int:
    """The next token from one row of logits ``[1, V]`` after ``prefix`` ``[1, L]``, as plain
    ``generate()`` picks it: float32 copy, processors, then argmax or a multinomial draw."""
    scores = logits.to(dtype=torch.float32, copy=True)
    if logits_processor is not None:
        scores = logits_processor(prefix, scores)
    if do_sample:
        return int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1))
    return int(scores.argmax(dim=-1))
