"""The draft tree: one flat, prefix-closed record, and the pure functions on it.

A draft tree holds guesses for the tokens that follow the last committed token (the
*root*, which is not part of the tree). Node ``i`` proposes ``tokens[i]`` after the path
to its parent ``parents[i]`` (``ROOT`` for a child of the root). Invariants, checked by
:meth:`DraftTree.validate` and kept by every function here:

* topological order: ``parents[i] < i``;
* a trie: no two children of one parent carry the same token;
* ``scores[i]`` estimates the probability that the whole path to node ``i`` is accepted,
  so it never exceeds its parent's score — the top-``k`` nodes by score are prefix-closed;
* ``sources[i]`` is a bitmask of the sources that proposed node ``i``.

Worked example — two sources guess after "the":

>>> a = DraftTree.from_paths([[5, 6], [5, 7]], [[0.8, 0.5], [0.8, 0.2]], source=0)
>>> b = DraftTree.from_paths([[5, 6, 9]], [[0.6, 0.4, 0.3]], source=1)
>>> t = fuse([a, b])
>>> t.tokens.tolist(), t.parents.tolist(), t.sources.tolist()
([5, 6, 7, 9], [-1, 0, 0, 1], [3, 3, 1, 2])
>>> prune(t, 2).tokens.tolist()
[5, 6]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrospec.jit import njit

ROOT = -1
"""Parent index of the children of the root (the last committed token)."""

SCORE_EPS = 1e-6
"""Scores are clipped to [SCORE_EPS, 1]: a node with score 0 would never be worth verifying."""


@dataclass(frozen=True, eq=False)
class DraftTree:
    """A flat draft tree (see the module docstring for its invariants).

    Attributes:
        tokens: ``int64 [N]`` proposed token ids.
        parents: ``int32 [N]`` index of each node's parent, ``ROOT`` for children of the root.
        scores: ``float32 [N]`` estimated probability that the path to the node is accepted.
        sources: ``uint32 [N]`` bitmask of the proposing sources (bit ``s`` = source ``s``).
    """

    tokens: np.ndarray
    parents: np.ndarray
    scores: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @staticmethod
    def empty() -> DraftTree:
        return DraftTree(
            np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.uint32)
        )

    @staticmethod
    def from_paths(
        paths: Sequence[Sequence[int]],
        scores: Sequence[Sequence[float]] | None = None,
        source: int = 0,
    ) -> DraftTree:
        """Build a trie from token paths (shared prefixes merge; a prefix keeps its highest score).

        ``scores[p][j]`` is the path score of ``paths[p][:j+1]``; by default every node scores 1.

        >>> DraftTree.from_paths([[1, 2], [1, 3], [4]]).parents.tolist()
        [-1, 0, 0, -1]
        """
        index: dict[tuple[int, int], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        best: list[float] = []
        for p, path in enumerate(paths):
            parent = ROOT
            for j, token in enumerate(path):
                score = 1.0 if scores is None else float(scores[p][j])
                key = (parent, int(token))
                node = index.get(key)
                if node is None:
                    node = index[key] = len(tokens)
                    tokens.append(int(token))
                    parents.append(parent)
                    best.append(score)
                else:
                    best[node] = max(best[node], score)
                parent = node
        tree = DraftTree(
            np.asarray(tokens, np.int64),
            np.asarray(parents, np.int32),
            np.asarray(best, np.float32),
            np.full(len(tokens), 1 << source, np.uint32),
        )
        return tree.with_monotone_scores()

    def depths(self) -> np.ndarray:
        """``int32 [N]`` depth of each node; children of the root have depth 1."""
        return _depths(self.parents)

    def with_monotone_scores(self) -> DraftTree:
        """Clip scores into ``[SCORE_EPS, 1]`` and to at most the parent's score."""
        return DraftTree(self.tokens, self.parents, _monotone(self.parents, self.scores.astype(np.float32)), self.sources)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first broken invariant."""
        n = len(self)
        for name in ("parents", "scores", "sources"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected ({n},)")
        seen: set[tuple[int, int]] = set()
        for i in range(n):
            parent = int(self.parents[i])
            if not ROOT <= parent < i:
                raise ValueError(f"node {i} has parent {parent}: parents must come first")
            key = (parent, int(self.tokens[i]))
            if key in seen:
                raise ValueError(f"node {i} repeats token {key[1]} under parent {parent}")
            seen.add(key)
            if parent != ROOT and self.scores[i] > self.scores[parent] + 1e-7:
                raise ValueError(f"node {i} scores {self.scores[i]} above its parent's {self.scores[parent]}")

    def paths(self) -> list[list[int]]:
        """Token paths from the root to every leaf, in node order (for display and tests)."""
        has_child = np.zeros(len(self), bool)
        has_child[self.parents[self.parents >= 0]] = True
        out = []
        for leaf in np.flatnonzero(~has_child).tolist():
            path, node = [], leaf
            while node != ROOT:
                path.append(int(self.tokens[node]))
                node = int(self.parents[node])
            out.append(path[::-1])
        return out


# Hot loops over a tree, compiled. Invariant they rely on: parents[i] < i, so one forward
# pass sees every parent before its children.
@njit()
def _depths(parents):
    depth = np.empty(parents.shape[0], np.int32)
    for i in range(parents.shape[0]):
        depth[i] = 1 if parents[i] < 0 else depth[parents[i]] + 1
    return depth


@njit()
def _monotone(parents, scores):
    out = np.empty(scores.shape[0], np.float32)
    for i in range(scores.shape[0]):
        s = min(max(scores[i], SCORE_EPS), 1.0)
        if parents[i] >= 0 and s > out[parents[i]]:
            s = out[parents[i]]
        out[i] = s
    return out


@njit()
def path_products(parents, conditional):
    """``float32 [N]``: the product of ``conditional`` along each node's path.

    >>> path_products(np.array([-1, 0, 1]), np.array([0.5, 0.5, 0.5], np.float32)).tolist()
    [0.5, 0.25, 0.125]
    """
    out = np.empty(conditional.shape[0], np.float32)
    for i in range(conditional.shape[0]):
        out[i] = conditional[i] if parents[i] < 0 else conditional[i] * out[parents[i]]
    return out


def fuse(trees: Sequence[DraftTree], combine: str = "noisy_or") -> DraftTree:
    """Merge trees by longest-prefix match: the same token path becomes one node.

    A node proposed by several trees gets the union of their ``sources`` and a combined
    score: ``noisy_or`` (``1 - prod(1 - s)``: independent sources that agree are more
    likely right) or ``max``.

    >>> a = DraftTree.from_paths([[1, 2]], [[0.5, 0.4]], source=0)
    >>> b = DraftTree.from_paths([[1, 3]], [[0.5, 0.1]], source=2)
    >>> t = fuse([a, b])
    >>> t.tokens.tolist(), t.sources.tolist(), [round(float(s), 2) for s in t.scores]
    ([1, 2, 3], [5, 1, 4], [0.75, 0.4, 0.1])
    """
    tree, _ = fuse_with_index(trees, combine)
    return tree


def fuse_with_index(
    trees: Sequence[DraftTree], combine: str = "noisy_or"
) -> tuple[DraftTree, list[np.ndarray]]:
    """:func:`fuse`, also returning for each input tree the fused index of each of its nodes."""
    if combine not in ("noisy_or", "max"):
        raise ValueError(f"combine must be 'noisy_or' or 'max', got {combine!r}")
    nonempty = [t for t in trees if len(t)]
    if len(nonempty) <= 1:
        tree = nonempty[0] if nonempty else DraftTree.empty()
        return tree, [np.arange(len(t), dtype=np.int64) for t in trees]

    offsets = np.cumsum([0] + [len(t) for t in trees])
    tokens, parents, scores, sources, mapping = _fuse(
        np.concatenate([t.tokens for t in trees]).astype(np.int64),
        np.concatenate([t.parents for t in trees]).astype(np.int64),
        np.concatenate([t.scores for t in trees]).astype(np.float64),
        np.concatenate([t.sources for t in trees]).astype(np.int64),
        offsets.astype(np.int64),
        combine == "noisy_or",
    )
    fused = DraftTree(tokens, parents.astype(np.int32), scores.astype(np.float32), sources.astype(np.uint32))
    return fused.with_monotone_scores(), [mapping[offsets[k] : offsets[k + 1]] for k in range(len(trees))]


@njit()
def _fuse(tokens, parents, scores, sources, offsets, noisy_or):
    """Merge concatenated tries (``offsets`` delimit them; parents are tree-local) by
    (fused parent, token), with an open-addressing table. Invariant: within each tree
    parents come first, so a node's fused parent is known when the node is reached."""
    total = tokens.shape[0]
    cap = 16
    while cap < 2 * total:
        cap *= 2
    slot_parent = np.full(cap, -2, np.int64)
    slot_token = np.zeros(cap, np.int64)
    slot_node = np.zeros(cap, np.int64)
    out_tokens = np.empty(total, np.int64)
    out_parents = np.empty(total, np.int64)
    acc = np.empty(total, np.float64)  # noisy-or: product of (1 - s); max: the running max
    out_sources = np.zeros(total, np.int64)
    mapping = np.empty(total, np.int64)
    n = 0
    for t in range(offsets.shape[0] - 1):
        base = offsets[t]
        for i in range(offsets[t], offsets[t + 1]):
            p = parents[i]
            fused_parent = -1 if p < 0 else mapping[base + p]
            token = tokens[i]
            h = ((fused_parent + 1) * 0x9E3779B1 + token * 0x85EBCA77) & (cap - 1)
            while slot_parent[h] != -2 and not (slot_parent[h] == fused_parent and slot_token[h] == token):
                h = (h + 1) & (cap - 1)
            if slot_parent[h] == -2:
                slot_parent[h], slot_token[h], slot_node[h] = fused_parent, token, n
                out_tokens[n], out_parents[n] = token, fused_parent
                acc[n] = 1.0 - scores[i] if noisy_or else scores[i]
                out_sources[n] = sources[i]
                node = n
                n += 1
            else:
                node = slot_node[h]
                acc[node] = acc[node] * (1.0 - scores[i]) if noisy_or else max(acc[node], scores[i])
                out_sources[node] |= sources[i]
            mapping[i] = node
    values = 1.0 - acc[:n] if noisy_or else acc[:n]
    return out_tokens[:n], out_parents[:n], values, out_sources[:n], mapping


def prune(tree: DraftTree, budget: int) -> DraftTree:
    """Keep the ``budget`` nodes with the highest path score (ties: earlier node first).

    Because a node never outscores its parent and parents come first, the kept set is
    prefix-closed.

    >>> t = DraftTree.from_paths([[1, 2, 3], [4]], [[0.9, 0.5, 0.1], [0.6]])
    >>> prune(t, 3).tokens.tolist(), prune(t, 3).parents.tolist()
    ([1, 2, 4], [-1, 0, -1])
    """
    return prune_with_index(tree, budget)[0]


def prune_with_index(tree: DraftTree, budget: int) -> tuple[DraftTree, np.ndarray]:
    """:func:`prune`, also returning the original index of each kept node."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    n = len(tree)
    if n <= budget:
        return tree, np.arange(n, dtype=np.int64)
    # score descending, then index ascending: a parent always ranks before its children
    keep = np.sort(np.lexsort((np.arange(n), -tree.scores))[:budget])
    return subtree(tree, keep), keep


def subtree(tree: DraftTree, keep: np.ndarray) -> DraftTree:
    """The nodes ``keep`` (ascending indices, prefix-closed: every kept node's parent is
    kept) as a tree of their own, parents renumbered.

    >>> t = DraftTree.from_paths([[1, 2], [3]])
    >>> subtree(t, np.array([0, 2])).parents.tolist()
    [-1, -1]
    """
    remap = np.full(len(tree), ROOT, np.int64)
    remap[keep] = np.arange(keep.shape[0])
    kept_parents = tree.parents[keep]
    new_parents = np.where(kept_parents == ROOT, ROOT, remap[np.maximum(kept_parents, 0)]).astype(np.int32)
    assert (new_parents[kept_parents != ROOT] != ROOT).all(), "the kept nodes are not prefix-closed"
    return DraftTree(tree.tokens[keep], new_parents, tree.scores[keep], tree.sources[keep])


def cap_depth(tree: DraftTree, max_depth: int) -> DraftTree:
    """Drop nodes deeper than ``max_depth`` (e.g. past the remaining token budget)."""
    if len(tree) == 0 or max_depth <= 0:
        return DraftTree.empty()
    depth = tree.depths()
    if depth.max() <= max_depth:
        return tree
    return subtree(tree, np.flatnonzero(depth <= max_depth))
