"""Verification: one forward over the flattened tree, then acceptance.

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

from retrospec.compat import cache_kwarg
from retrospec.jit import njit
from retrospec.tree import TreeBuffers


class Acceptance(NamedTuple):
    """The outcome of one verification.

    Attributes:
        slots: ``int64 [A]`` accepted slots, starting with the root slot 0.
        tokens: the tokens to commit: the accepted nodes' tokens, then the bonus token.
    """

    slots: np.ndarray
    tokens: list[int]


def forward_tree(model, cache, buffers: TreeBuffers) -> torch.Tensor:
    """Logits ``[N+1, V]`` of every slot; appends the slots to ``cache``."""
    out = model(
        input_ids=buffers.input_ids,
        attention_mask=buffers.attention_mask,
        position_ids=buffers.position_ids,
        use_cache=True,
        **{cache_kwarg(model): cache},
    )
    return out.logits[0]


def accept_greedy(buffers: TreeBuffers, logits: torch.Tensor) -> Acceptance:
    """Longest root-to-node path whose every token is its parent's argmax, plus the bonus.

    Vectorised over the paths table: one device-to-host transfer.

    >>> from retrospec.tree import DraftTree, to_buffers
    >>> b = to_buffers(DraftTree.from_paths([[5, 6], [7]]), root_token=1, past_len=0)
    >>> logits = torch.zeros(4, 10); logits[0, 5] = logits[1, 9] = logits[2, 0] = logits[3, 0] = 1
    >>> accept_greedy(b, logits)   # root -> 5 accepted, then the model says 9, not 6
    Acceptance(slots=array([0, 1]), tokens=[5, 9])
    """
    preds = logits.argmax(dim=-1)  # [N+1]
    paths = buffers.retrieve  # [P, D+1]
    valid = paths >= 0
    safe = paths.clamp(min=0)
    candidates = buffers.input_ids[0][safe]
    predicted = preds[safe]
    # path p accepts its step d iff its slot d+1 carries the prediction at slot d
    match = (candidates[:, 1:] == predicted[:, :-1]) & valid[:, 1:]
    lengths = match.long().cumprod(dim=1).sum(dim=1)
    best = int(lengths.argmax())
    depth = int(lengths[best])
    slots = paths[best, : depth + 1]
    result = torch.cat([candidates[best, 1 : depth + 1], preds[slots[-1]].reshape(1)]).tolist()
    return Acceptance(slots.cpu().numpy(), result)


def predictions(logits: torch.Tensor, topk: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Each slot's argmax (and its top-k, when a source wants them), in one device-to-host copy."""
    preds = logits.argmax(dim=-1, keepdim=True)
    if topk:
        both = torch.cat([preds, logits.topk(topk, dim=-1).indices], dim=1).cpu().numpy()
        return both[:, 0], both[:, 1:]
    return preds[:, 0].cpu().numpy(), None


@njit()
def _walk(slot_tokens, parent_slots, preds):
    n = slot_tokens.shape[0]
    path = np.empty(n, np.int64)
    path[0], length, slot = 0, 1, 0
    while True:
        nxt = -1
        for child in range(slot + 1, n):  # children come after their parent
            if parent_slots[child] == slot and slot_tokens[child] == preds[slot]:
                nxt = child
                break
        if nxt < 0:
            return path[:length]
        path[length] = nxt
        length += 1
        slot = nxt


def accept_greedy_host(slot_tokens: np.ndarray, parent_slots: np.ndarray, preds: np.ndarray) -> Acceptance:
    """:func:`accept_greedy` on the host, from each slot's argmax ``preds``.

    >>> accept_greedy_host(np.array([1, 5, 6, 7]), np.array([-1, 0, 1, 0]), np.array([5, 9, 0, 0]))
    Acceptance(slots=array([0, 1]), tokens=[5, 9])
    """
    slots = _walk(slot_tokens, parent_slots, preds)
    return Acceptance(slots, slot_tokens[slots[1:]].tolist() + [int(preds[slots[-1]])])


def accept_walk(
    buffers: TreeBuffers,
    logits: torch.Tensor,
    prefix: torch.Tensor,
    logits_processor,
    do_sample: bool,
) -> Acceptance:
    """Acceptance with logits processors and/or sampling, one node at a time.

    At each node the processors see that node's own prefix (``prefix`` ends with the root
    token; ``[1, L]``), exactly as plain ``generate()`` would show it.
    """
    tokens = buffers.input_ids[0].tolist()
    children: dict[tuple[int, int], int] = {}
    for slot in range(1, len(tokens)):
        children[(int(buffers.parent_slots[slot]), tokens[slot])] = slot
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
