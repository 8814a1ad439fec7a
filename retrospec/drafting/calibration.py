"""Online calibration of each source's scores against what verification accepts.

Sources score their nodes on their own scales (count ratios, rank priors, draft-model
probabilities). Fusion and pruning compare nodes across sources, so each score must mean
the same thing: the probability that the node is accepted. Verification tells us exactly
that, for every node whose parent was accepted (a *tested* node).

For each source the calibrator keeps, by (depth bucket, raw conditional score bucket), how
many tested nodes there were and how many were accepted. A node's calibrated conditional
score is the bucket's acceptance rate, smoothed towards the raw score by a prior of
``prior_weight`` pseudo-observations — so with no history the raw score is used as is.

>>> cal = Calibrator(n_sources=1, prior_weight=1.0)
>>> cal.learn(0, raw=np.array([0.9, 0.9]), depth=np.array([1, 1]), accepted=np.array([False, False]))
>>> round(float(cal.conditional(0, np.array([0.9]), np.array([1]))[0]), 3)   # (0 + 1 * 0.9) / (2 + 1)
0.3
"""

from __future__ import annotations

import threading

import numpy as np

from retrospec.jit import njit
from retrospec.tree import ROOT, SCORE_EPS, DraftTree, path_products

SCORE_EDGES = (0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
"""Bucket edges of raw conditional scores: fine at the low end, where rank priors live."""


class Calibrator:
    """Per-source acceptance tables (see the module docstring)."""

    def __init__(self, n_sources: int, *, edges: tuple[float, ...] = SCORE_EDGES, max_depth_bin: int = 4, prior_weight: float = 6.0):
        if max_depth_bin < 1 or prior_weight <= 0 or list(edges) != sorted(edges):
            raise ValueError(
                f"need ascending edges, max_depth_bin >= 1, prior_weight > 0; got {edges}, {max_depth_bin}, {prior_weight}"
            )
        self.edges = np.asarray(edges, np.float32)
        self.max_depth_bin = max_depth_bin
        self.prior_weight = prior_weight
        shape = (n_sources, max_depth_bin, len(edges) + 1)
        self.tested = np.zeros(shape, np.float64)
        self.accepted = np.zeros(shape, np.float64)
        self._lock = threading.Lock()

    def _buckets(self, raw: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.clip(depth, 1, self.max_depth_bin) - 1
        b = np.searchsorted(self.edges, raw, side="right")
        return d, b

    def conditional(self, source: int, raw: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Calibrated P(node accepted | parent accepted) for raw conditional scores ``raw``."""
        d, b = self._buckets(raw, depth)
        tested = self.tested[source, d, b]
        accepted = self.accepted[source, d, b]
        return ((accepted + self.prior_weight * raw) / (tested + self.prior_weight)).astype(np.float32)

    def learn(self, source: int, raw: np.ndarray, depth: np.ndarray, accepted: np.ndarray) -> None:
        """Record tested nodes of ``source``: raw conditional scores, depths, outcomes."""
        if raw.shape[0] == 0:
            return
        d, b = self._buckets(raw, depth)
        with self._lock:
            np.add.at(self.tested[source], (d, b), 1.0)
            np.add.at(self.accepted[source], (d, b), accepted.astype(np.float64))

    def calibrated(self, source: int, tree: DraftTree, calibrate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One pass over a source's tree: ``(raw conditional scores, depths, calibrated path
        scores)`` — the path scores clipped to ``[SCORE_EPS, 1]`` and to their parent's, as
        :func:`conditional_scores`, :meth:`conditional`, :func:`path_scores` and
        ``DraftTree.with_monotone_scores`` give them one after the other (the same float32
        arithmetic, in one compiled loop: this runs for every source of every row each step).
        """
        n = len(tree)
        raw, depth, out = np.empty(n, np.float32), np.empty(n, np.int32), np.empty(n, np.float32)
        _calibrate(tree.parents, tree.scores.astype(np.float32, copy=False), bool(calibrate and n), self.tested[source],
                   self.accepted[source], self.edges, self.max_depth_bin, np.float32(self.prior_weight), raw, depth, out)
        return raw, depth, out

    def acceptance_rates(self, source: int) -> np.ndarray:
        """``[depth bucket, score bucket]`` measured acceptance rates (NaN where untested), for reports."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.accepted[source] / self.tested[source]


@njit()
def _calibrate(parents, scores, use_table, tested, accepted, edges, max_bin, prior, raw, depth, out):
    """See :meth:`Calibrator.calibrated`. Invariant: parents come first."""
    prod = np.empty(parents.shape[0], np.float32)  # path products before clipping, as path_products gives them
    one, tiny, zero = np.float32(1.0), np.float32(1e-12), np.float32(0.0)
    for i in range(parents.shape[0]):
        p = parents[i]
        parent_score = one if p < 0 else scores[p]
        if parent_score < tiny:
            parent_score = tiny
        r = np.float32(scores[i] / parent_score)
        if r < zero:
            r = zero
        if r > one:
            r = one
        raw[i] = r
        depth[i] = 1 if p < 0 else depth[p] + 1
        c = r
        if use_table:
            d = min(max(depth[i], 1), max_bin) - 1
            b = 0
            while b < edges.shape[0] and edges[b] <= r:  # searchsorted(edges, r, side="right")
                b += 1
            c = np.float32((accepted[d, b] + np.float64(np.float32(prior * r))) / (tested[d, b] + np.float64(prior)))
        prod[i] = c if p < 0 else np.float32(c * prod[p])
        s = min(max(np.float64(prod[i]), SCORE_EPS), 1.0)
        if p >= 0 and s > out[p]:
            s = out[p]
        out[i] = s


def conditional_scores(tree: DraftTree) -> np.ndarray:
    """``s_i / s_parent(i)``: each node's score given that its parent is accepted."""
    parent_scores = np.where(tree.parents == ROOT, 1.0, tree.scores[np.maximum(tree.parents, 0)])
    return np.clip(tree.scores / np.maximum(parent_scores, 1e-12), 0.0, 1.0).astype(np.float32)


def path_scores(parents: np.ndarray, conditional: np.ndarray) -> np.ndarray:
    """Products of conditional scores along each path (parents come first)."""
    return path_products(parents, conditional.astype(np.float32))
