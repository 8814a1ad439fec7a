"""Continuations of context matches, merged into a scored trie.

Every retrieval source ends the same way: it found places (in the context, a corpus or a
document) where the current suffix occurred before, and the tokens that followed each
occurrence are guesses for what follows now. This module merges those continuations into
one :class:`~retrospec.tree.DraftTree` with count-based scores.

Scoring. A node's *conditional* score is its weighted share of the continuations that go
on below its parent (``smoothing`` pseudo-weight added to the total, so thin evidence
counts for less), times a confidence (``root_conf`` at depth 1, ``decay`` deeper: even
unanimous evidence diverges eventually). The path score is the product along the path.

>>> rows = pad_rows([[4, 5, 6], [4, 5, 7], [8]], 3)
>>> t = continuation_trie(rows, np.array([1.0, 1.0, 2.0]), root_conf=1.0, decay=1.0)
>>> t.tokens.tolist(), [round(float(s), 2) for s in t.scores]
([4, 5, 6, 7, 8], [0.5, 0.5, 0.25, 0.25, 0.5])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrospec.jit import njit
from retrospec.tree import DraftTree, _monotone, path_products, prune

PAD = -1
"""Fills the rows of continuations shorter than the matrix."""


def pad_rows(continuations: Sequence[Sequence[int]], depth: int) -> np.ndarray:
    """``int64 [K, depth]`` rows, ``PAD``-filled.

    >>> pad_rows([[1, 2], [3]], 3).tolist()
    [[1, 2, -1], [3, -1, -1]]
    """
    rows = np.full((len(continuations), depth), PAD, np.int64)
    for i, cont in enumerate(continuations):
        cont = list(cont)[:depth]
        rows[i, : len(cont)] = cont
    return rows


@njit()
def _weighted_trie(rows, weights):
    """Merge lexicographically sorted, PAD-filled rows into a trie.

    Invariant: sorted rows share their common prefix with the previous row, so one pass
    that compares each row with the one before finds every shared node. Nodes come in DFS
    order (parents first). Returns ``(tokens, parents, mass)``.
    """
    r_count, depth = rows.shape
    tokens = np.empty(r_count * depth, np.int64)
    parents = np.empty(r_count * depth, np.int64)
    mass = np.zeros(r_count * depth, np.float64)
    path = np.full(depth, -1, np.int64)
    n = 0
    for r in range(r_count):
        if rows[r, 0] < 0:
            continue
        lcp = 0
        if r > 0:
            while lcp < depth and rows[r, lcp] >= 0 and rows[r, lcp] == rows[r - 1, lcp]:
                lcp += 1
        w = weights[r]
        for d in range(depth):
            t = rows[r, d]
            if t < 0:
                break
            if d < lcp:
                mass[path[d]] += w
            else:
                tokens[n] = t
                parents[n] = path[d - 1] if d > 0 else -1
                mass[n] = w
                path[d] = n
                n += 1
    return tokens[:n], parents[:n], mass[:n]


def continuation_trie(
    rows: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    root_conf: float = 1.0,
    decay: float = 0.9,
    smoothing: float = 0.0,
    max_nodes: int | None = None,
) -> DraftTree:
    """Merge continuation ``rows`` (``int64 [K, D]``, ``PAD``-filled) into a scored trie.

    ``weights[i]`` is the evidence weight of row ``i`` (default 1). The trie is pruned to
    the ``max_nodes`` best nodes by path score.
    """
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return DraftTree.empty()
    weights = np.ones(rows.shape[0]) if weights is None else np.asarray(weights, np.float64)
    order = np.lexsort(rows.T[::-1])
    tokens, parents, scores = _scored_trie(np.ascontiguousarray(rows[order]), weights[order], float(root_conf), float(decay),
                                           float(smoothing))
    if tokens.shape[0] == 0:
        return DraftTree.empty()
    tree = DraftTree(tokens, parents, scores, np.ones(tokens.shape[0], np.uint32))
    return tree if max_nodes is None else prune(tree, max_nodes)


@njit()
def _scored_trie(rows, weights, root_conf, decay, smoothing):
    """:func:`_weighted_trie`, then each node's conditional score (its mass over its
    siblings' and its own, times ``root_conf`` or ``decay``) and monotone path scores, in
    one compiled call: every retrieval source runs this for every row each step."""
    tokens, parents, mass = _weighted_trie(rows, weights)
    n = tokens.shape[0]
    child_mass = np.zeros(n + 1, np.float64)  # [0]: the root's children
    for i in range(n):
        child_mass[parents[i] + 1] += mass[i]
    conditional = np.empty(n, np.float32)
    for i in range(n):
        c = mass[i] / (child_mass[parents[i] + 1] + smoothing)
        conditional[i] = c * (root_conf if parents[i] < 0 else decay)
    parents32 = parents.astype(np.int32)
    return tokens, parents32, _monotone(parents32, path_products(parents32, conditional))
