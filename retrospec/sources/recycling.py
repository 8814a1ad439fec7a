"""Token Recycling: the model's own past top-k predictions, as a V × k adjacency matrix.

Every verification computes the model's next-token distribution at every tree node, and
plain decoding throws all but one token of it away. Token Recycling (Luo et al., 2024)
keeps the top-k: row ``t`` of the matrix holds the k most likely tokens the model last
predicted after token ``t``. A draft is a breadth-first walk of a static tree template from
the last committed token: a template node ``(r1, r2, ...)`` is the ``r1``-th candidate of
the root, then the ``r2``-th candidate of that token, and so on.

After each verification, the rows of *all* verified tokens (rejected branches included)
are overwritten with the top-k of their logits; the accepted path is written last, so its
fresher evidence wins. The matrix is kept across requests (``save``/``load``), and several
requests may share one source: a stale or racy row only makes a draft worse, never the
output different.

>>> rec = TokenRecycling(vocab_size=10, k=2, template=((0,), (1,), (0, 0)))
>>> rec.matrix[3] = [4, 5]; rec.matrix[4] = [6, 7]
>>> rec.start_request(np.array([1, 3])).propose(np.array([1, 3]), 8, 4).paths()
[[5], [4, 6]]
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrospec.datastores.recycling import EMPTY, FORMAT_VERSION, load_matrix, save_matrix  # noqa: F401 (re-exported)
from retrospec.jit import njit
from retrospec.sources.base import Verified
from retrospec.tree import ROOT, DraftTree, path_products, subtree


def _level(parents: list[tuple[int, ...]], ranks_by_parent: Sequence[int]) -> list[tuple[int, ...]]:
    """Children of ``parents`` (in order): parent ``i`` gets ranks ``0 .. ranks_by_parent[i]-1``."""
    return [p + (r,) for p, n in zip(parents, ranks_by_parent) for r in range(n)]


def _reference_template() -> tuple[tuple[int, ...], ...]:
    """The 80-node, depth-6 tree of the Token Recycling paper, as rank paths (BFS order).

    Level sizes 8, 21, 25, 15, 8, 3; each level lists how many candidates each node of the
    previous level expands (earlier, likelier nodes expand more).
    """
    levels = [[()]]
    fanouts = [
        [8],
        [8, 4, 3, 2, 1, 1, 1, 1],
        [8, 3, 2, 1, 1, 1, 1, 1, 2, 1, 0, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0],
        [5, 2, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0],
        [3, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0],
        [2, 0, 0, 1, 0, 0, 0, 0],
    ]
    for fanout in fanouts:
        levels.append(_level(levels[-1], fanout))
    return tuple(path for level in levels[1:] for path in level)


REFERENCE_TEMPLATE = _reference_template()
RANK_PRIOR = (0.45, 0.14, 0.08, 0.05, 0.04, 0.03, 0.025, 0.02)
"""Raw conditional score of the r-th candidate before calibration has seen any outcome."""


def model_fingerprint(model) -> str:
    """A short id of a model's vocabulary and output embeddings (dtype-independent)."""
    import torch

    head = model.get_output_embeddings().weight
    sample = head[:8, :64].detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
    return hashlib.sha256(sample + str(head.shape[0]).encode()).hexdigest()[:16]


class TokenRecycling:
    """The Token Recycling source (see the module docstring).

    Args:
        vocab_size: rows of the matrix (the model's vocabulary size).
        k: candidates kept per token.
        template: rank paths of the draft tree, parents before children; default the paper's
            80-node tree.
        fingerprint: id of the model the matrix belongs to (checked by ``load``).
    """

    name = "recycling"

    def __init__(self, vocab_size: int, k: int = 8, template: Sequence[Sequence[int]] | None = None, fingerprint: str = ""):
        if vocab_size < 1 or k < 1:
            raise ValueError(f"vocab_size and k must be >= 1, got {vocab_size}, {k}")
        template = tuple(tuple(int(r) for r in p) for p in (template or REFERENCE_TEMPLATE))
        seen = set()
        for path in template:
            if not path or max(path) >= k or min(path) < 0:
                raise ValueError(f"template path {path} needs ranks in [0, {k})")
            if path[:-1] and path[:-1] not in seen:
                raise ValueError(f"template path {path} comes before its parent {path[:-1]}")
            seen.add(path)
        self.k = k
        self.topk_wanted = k
        self.template = template
        self.fingerprint = fingerprint
        self.path: Path | None = None  # the file it was loaded from, for messages
        self.matrix = np.full((vocab_size, k), EMPTY, np.int32)
        # template as flat arrays: each node's template parent and rank
        index = {path: i for i, path in enumerate(template)}
        self._parent = np.array([index[p[:-1]] if len(p) > 1 else ROOT for p in template], np.int64)
        self._rank = np.array([p[-1] for p in template], np.int64)
        prior = np.array(RANK_PRIOR + (RANK_PRIOR[-1],) * max(0, k - len(RANK_PRIOR)), np.float32)
        self._conditional = prior[self._rank]

    @classmethod
    def for_model(cls, model, k: int = 8, template=None) -> TokenRecycling:
        """An empty matrix sized and fingerprinted for ``model``."""
        vocab = model.get_output_embeddings().weight.shape[0]
        return cls(vocab, k, template, fingerprint=model_fingerprint(model))

    @classmethod
    def from_stores(cls, model, tokenizer=None, store: str | None = None) -> TokenRecycling:
        """The registry's constructor: the matrix saved at ``store`` when it exists, else an
        empty one for ``model``."""
        if store and Path(store).exists():
            return cls.load(store, model)
        return cls.for_model(model)

    # -- drafting ---------------------------------------------------------------------
    def draft(self, root_token: int, max_nodes: int, max_depth: int) -> DraftTree:
        """BFS over the template from ``root_token``; nodes without a candidate are skipped
        together with their subtrees."""
        n = len(self.template)
        if not 0 <= root_token < self.matrix.shape[0]:
            return DraftTree.empty()
        tokens, alive = _bfs(self.matrix, self._parent, self._rank, root_token, max_depth)
        # BFS order: a parent precedes its children, so the first max_nodes live nodes are prefix-closed
        keep = np.flatnonzero(alive)[:max_nodes]
        if keep.size == 0:
            return DraftTree.empty()
        template = DraftTree(tokens, self._parent.astype(np.int32), self._conditional, np.ones(n, np.uint32))
        kept = subtree(template, keep)
        return DraftTree(kept.tokens, kept.parents, path_products(kept.parents, kept.scores), kept.sources).with_monotone_scores()

    def start_request(self, prompt: np.ndarray, documents: Sequence[str] = ()) -> RecyclingSession:
        return RecyclingSession(self)

    # -- learning ---------------------------------------------------------------------
    def update(self, slot_tokens: np.ndarray, topk: np.ndarray, accepted_slots: np.ndarray | None = None) -> None:
        """Overwrite the rows of the verified tokens with the top-k predicted after them.

        ``topk`` is ``[N+1, >=k]``; rows of tokens on the accepted path are written last.
        """
        order = np.arange(slot_tokens.shape[0])
        if accepted_slots is not None and accepted_slots.size:
            on_path = np.zeros(order.shape[0], bool)
            on_path[accepted_slots] = True
            order = np.concatenate([order[~on_path], order[on_path]])
        tokens = slot_tokens[order]
        valid = (tokens >= 0) & (tokens < self.matrix.shape[0])
        rows = np.asarray(topk[order[valid], : self.k])
        # a model whose logits are wider than the matrix must not plant ids the BFS cannot follow
        rows = np.where((rows >= 0) & (rows < self.matrix.shape[0]), rows, EMPTY)
        # numpy assigns repeated indices in order: the last write of a row wins
        self.matrix[tokens[valid]] = rows

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | Path, *, force: bool = False) -> None:
        """Write the matrix as a versioned ``.npz`` (atomically; no pickle). ``path`` may be
        absent or a Token Recycling file; anything else only with ``force`` (see
        :func:`retrospec.datastores.recycling.save_matrix`)."""
        save_matrix(path, self.matrix, self.fingerprint, self.template, force=force)

    @classmethod
    def load(cls, path: str | Path, model=None) -> TokenRecycling:
        """Read a matrix written by :meth:`save`, every value checked; with ``model``, refuse
        one made for another model (or carrying no fingerprint) or of another size."""
        expected = model_fingerprint(model) if model is not None else None
        rows = model.get_output_embeddings().weight.shape[0] if model is not None else None
        data = load_matrix(path, expected, rows)
        rec = cls(data.vocab_size, data.k, data.template, fingerprint=data.fingerprint)
        rec.matrix[:] = data.matrix
        rec.path = Path(path)
        return rec


@njit()
def _bfs(matrix, parent, rank, root_token, max_depth):
    """Tokens of the template's nodes from ``root_token``; ``alive`` is False where a node
    (or an ancestor) has no candidate or lies deeper than ``max_depth``."""
    n = parent.shape[0]
    tokens = np.zeros(n, np.int64)
    alive = np.zeros(n, np.bool_)
    depth = np.zeros(n, np.int64)
    for i in range(n):  # template order is BFS: parents first
        p = parent[i]
        if p < 0:
            source, depth[i] = root_token, 1
        elif alive[p]:
            source, depth[i] = tokens[p], depth[p] + 1
        else:
            continue
        if source < 0 or source >= matrix.shape[0] or rank[i] >= matrix.shape[1]:
            continue  # never index outside the matrix, whatever was written into it
        token = matrix[source, rank[i]]
        if 0 <= token < matrix.shape[0] and depth[i] <= max_depth:  # EMPTY (or garbage): no candidate
            tokens[i], alive[i] = token, True
    return tokens, alive


class RecyclingSession:
    """A request's view: drafts from the shared matrix, feeds verified logits back into it."""

    def __init__(self, source: TokenRecycling):
        self.source = source

    def propose(self, context: np.ndarray, max_nodes: int, max_depth: int) -> DraftTree:
        if context.shape[0] == 0:
            return DraftTree.empty()
        return self.source.draft(int(context[-1]), max_nodes, max_depth)

    def observe(self, step: Verified) -> None:
        if step.topk is not None:
            self.source.update(step.slot_tokens, step.topk, step.accepted_slots)
