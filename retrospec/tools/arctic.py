"""The peer: ArcticInference's ``SuffixDecodingCache`` as a draft source, for ``retrospec bench``.

SuffixDecoding (Snowflake's ArcticInference, ``arctic-inference==0.3.0``) keeps a suffix
tree of each active request's prompt and one *global* suffix tree of the responses of
earlier requests. This wraps its lifecycle (``start_request``, ``add_active_response``,
``speculate``, ``stop_request``) as a :class:`~retrospec.Source`: its drafts, our lossless
verification, same prompts, same run. Speculation uses ArcticInference's own defaults
(tree speculation, ``max_spec_factor=1.0``, ``min_token_prob=0.1``, tree depth 64) with at
most the bench budget of tokens; the global cache is unbounded by default, as there.

It is a bench extra, not a dependency: the sdist builds a C++ extension and no vLLM::

    pip install nanobind cmake
    CMAKE_ARGS="-DPython_EXECUTABLE=$(which python)" pip install --no-deps --no-build-isolation arctic-inference==0.3.0
"""

from __future__ import annotations

import importlib.util
import itertools
import threading
from collections.abc import Sequence

import numpy as np

from retrospec.sources.base import Verified
from retrospec.tree import DraftTree

INSTALL = ('pip install nanobind cmake && CMAKE_ARGS="-DPython_EXECUTABLE=$(which python)" '
           "pip install --no-deps --no-build-isolation arctic-inference==0.3.0")


def available() -> bool:
    """Whether ArcticInference's suffix decoding can be imported."""
    return importlib.util.find_spec("arctic_inference") is not None


class MissingPeer(ImportError):
    """The peer's package is not installed (the bench skips its methods)."""


def require_arctic():
    if not available():
        raise MissingPeer(f"the ArcticInference peer needs arctic-inference==0.3.0, which is not installed: {INSTALL}")
    from arctic_inference.suffix_decoding import SuffixDecodingCache

    return SuffixDecodingCache


class ArcticSource:
    """ArcticInference's suffix decoding, drafting for retrospec's verifier.

    Args:
        max_spec_tokens: most draft tokens per step (the bench budget).
        max_cached_requests: responses kept in the global tree (``-1``: all, ``0``: none,
            i.e. per-request suffix decoding only).
    """

    name = "arctic"
    topk_wanted = 0

    def __init__(self, max_spec_tokens: int = 16, max_cached_requests: int = -1, max_tree_depth: int = 64,
                 max_spec_factor: float = 1.0, min_token_prob: float = 0.1):
        self._new_cache = lambda: require_arctic()(max_tree_depth=max_tree_depth, max_cached_requests=max_cached_requests)
        self.cache = self._new_cache()
        self.max_spec_tokens = int(max_spec_tokens)
        self.max_spec_factor, self.min_token_prob = max_spec_factor, min_token_prob
        self._ids = itertools.count()
        self._lock = threading.Lock()  # the C++ cache is not documented as thread-safe

    def forget(self) -> None:
        """Start over with an empty cache (e.g. after a benchmark's warm-up)."""
        with self._lock:
            self.cache = self._new_cache()

    def start_request(self, prompt: np.ndarray, documents: Sequence[str] = ()) -> ArcticSession:
        return ArcticSession(self, prompt)


class ArcticSession:
    def __init__(self, source: ArcticSource, prompt: np.ndarray):
        self.source = source
        self.id = next(source._ids)
        self.known = int(prompt.shape[0])
        with source._lock:
            source.cache.start_request(self.id, np.ascontiguousarray(prompt, np.int32))
        self.open = True

    def _sync(self, context: np.ndarray) -> None:
        if context.shape[0] > self.known:
            with self.source._lock:
                self.source.cache.add_active_response(self.id, np.ascontiguousarray(context[self.known :], np.int32))
            self.known = int(context.shape[0])

    def propose(self, context: np.ndarray, max_nodes: int, max_depth: int) -> DraftTree:
        self._sync(context)
        src = self.source
        with src._lock:
            draft = src.cache.speculate(self.id, np.ascontiguousarray(context, np.int32),
                                        max_spec_tokens=min(max_nodes, src.max_spec_tokens), max_spec_factor=src.max_spec_factor,
                                        min_token_prob=src.min_token_prob, use_tree_spec=True)
        if not draft.token_ids:
            return DraftTree.empty()
        tree = DraftTree(np.asarray(draft.token_ids, np.int64), np.asarray(draft.parents, np.int32),
                         np.asarray(draft.probs, np.float32), np.ones(len(draft.token_ids), np.uint32))
        return tree.with_monotone_scores()

    def observe(self, step: Verified) -> None:
        """Committed tokens reach the cache through the next ``propose`` (or ``finish``)."""

    def finish(self, context: np.ndarray) -> None:
        if not self.open:
            return
        self._sync(context)
        with self.source._lock:
            self.source.cache.stop_request(self.id)
        self.open = False
