"""Continuations of context matches, merged into a scored trie.

Every retrieval source ends the same way: it found places (in the context, a corpus or a
document) where the current suffix occurred before, and the tokens that followed each
occurrence are guesses for what follows now. This module merges those continuations into
one :class:`~retrospec.tree.DraftTree` with count-based scores.

Scoring. A node's *conditional* score is the weighted share of the continuations through
its parent that go on with its token, times a confidence (``root_conf`` at depth 1,
``decay`` deeper: even unanimous evidence diverges eventually). The path score is the
product of conditional scores along the path.

>>> t = continuation_trie([[4, 5, 6], [4, 5, 7], [8]], weights=[1.0, 1.0, 2.0], root_conf=1.0, decay=1.0)
>>> t.tokens.tolist(), [round(float(s), 2) for s in t.scores]
([4, 5, 6, 7, 8], [0.5, 0.5, 0.25, 0.25, 0.5])
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from retrospec.tree import ROOT, DraftTree, prune


def continuation_trie(
    continuations: Sequence[Sequence[int]],
    weights: Sequence[float] | None = None,
    *,
    root_conf: float = 1.0,
    decay: float = 0.9,
    source: int = 0,
    max_nodes: int | None = None,
) -> DraftTree:
    """Merge ``continuations`` (token lists, most relevant first) into a scored trie.

    ``weights[i]`` is the evidence weight of continuation ``i`` (default 1). The trie is
    pruned to the ``max_nodes`` best nodes by path score.
    """
    if weights is None:
        weights = [1.0] * len(continuations)
    index: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    mass: list[float] = []
    child_mass: dict[int, float] = {ROOT: 0.0}
    for cont, weight in zip(continuations, weights):
        parent = ROOT
        for token in cont:
            key = (parent, int(token))
            node = index.get(key)
            if node is None:
                node = index[key] = len(tokens)
                tokens.append(int(token))
                parents.append(parent)
                mass.append(0.0)
            mass[node] += weight
            child_mass[parent] = child_mass.get(parent, 0.0) + weight
            parent = node
    if not tokens:
        return DraftTree.empty()
    scores = np.empty(len(tokens), np.float32)
    for i, parent in enumerate(parents):
        if parent == ROOT:
            scores[i] = root_conf * mass[i] / child_mass[ROOT]
        else:
            scores[i] = scores[parent] * decay * mass[i] / child_mass[parent]
    tree = DraftTree(
        np.asarray(tokens, np.int64),
        np.asarray(parents, np.int32),
        scores,
        np.full(len(tokens), 1 << source, np.uint32),
    ).with_monotone_scores()
    return tree if max_nodes is None else prune(tree, max_nodes)
