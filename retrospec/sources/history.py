"""The history source: continuations of the current suffix in *earlier requests*.

The context source sees one request. Agents, structured extraction, tool calls and
templated answers repeat themselves across requests (SuffixDecoding's finding), so this
source keeps the token streams of the requests a :class:`~retrospec.Speculator` has
finished — prompts and outputs apart — in one bounded store shared by every request,
thread and batch row (:mod:`retrospec.datastores.history`). It finds the longest earlier
occurrences of the current suffix (up to ``max_match`` tokens; at least ``min_match``) and
merges the continuations of the newest ``max_matches`` into a trie: an occurrence weighs
``match_weight ** length``, times ``prompt_weight`` inside an earlier prompt, so long
matches in earlier outputs lead and the counts of each continuation set the branch scores.

A request is added when it finishes (``finish``), whole: its own tokens are the context
source's job while it runs.

Isolation: requests of a namespace draft only from that namespace's history. A tenant's
speculator takes ``history.in_namespace(tenant)`` (same store, other namespace).

>>> src = HistorySource(HistoryConfig(min_match=2))
>>> src.start_request(np.array([5, 1, 2])).finish(np.array([5, 1, 2, 3, 4, 9]))
>>> src.start_request(np.array([7, 1, 2])).propose(np.array([7, 1, 2]), max_nodes=8, max_depth=3).paths()
[[3, 4, 9]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrospec.datastores.history import PROMPT, HistoryStore
from retrospec.sources.base import Verified
from retrospec.sources.trie import continuation_trie
from retrospec.tree import DraftTree


@dataclass(frozen=True)
class HistoryConfig:
    """Settings of :class:`HistorySource`."""

    max_tokens: int = 1 << 19
    """Token budget of each namespace's history (prompts, outputs and separators); the
    oldest requests are evicted whole beyond it. ~61 bytes per token when full (16 MiB at 2**18)."""
    min_match: int = 2
    """Shortest suffix match that may anchor a draft (one token matches too much of a long history)."""
    max_match: int = 32
    """Longest suffix compared; longer matches count as this long."""
    max_matches: int = 32
    """Most occurrences whose continuations are merged (longest, then newest, first)."""
    max_chain: int = 64
    """Most candidates looked at per n-gram length (a bound on one lookup's work)."""
    max_depth: int = 16
    """Longest continuation taken from one occurrence."""
    match_weight: float = 2.0
    """An occurrence matching ``n`` tokens weighs ``match_weight ** n``."""
    prompt_weight: float = 0.25
    """Weight of an occurrence whose continuation lies in an earlier prompt, relative to one
    in an earlier output (``learn_prompts=False`` keeps no prompts at all)."""
    learn_prompts: bool = True
    """Keep finished requests' prompts as well as their outputs."""

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {self.max_tokens}")
        if not 1 <= self.min_match <= self.max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {self.min_match}, {self.max_match}")
        if self.max_matches < 1 or self.max_chain < 1 or self.max_depth < 1:
            raise ValueError(f"max_matches, max_chain and max_depth must be >= 1, got "
                             f"{self.max_matches}, {self.max_chain}, {self.max_depth}")
        if self.match_weight < 1.0:
            raise ValueError(f"match_weight must be >= 1, got {self.match_weight}")
        if not 0.0 < self.prompt_weight <= 1.0:  # no prompts at all: learn_prompts=False
            raise ValueError(f"prompt_weight must be in (0, 1], got {self.prompt_weight}")


class HistorySource:
    """Drafts from the finished requests of its namespace (see the module docstring).

    Args:
        config: the lookup and budget settings.
        store: the history to share (default: a new, empty one with ``config.max_tokens``).
        namespace: whose requests it learns from and drafts from.
    """

    name = "history"
    topk_wanted = 0

    def __init__(self, config: HistoryConfig | None = None, store: HistoryStore | None = None, namespace: str = ""):
        self.config = config or HistoryConfig()
        self.store = store if store is not None else HistoryStore(self.config.max_tokens)
        self.namespace = namespace
        self.index = self.store.index(namespace)

    @classmethod
    def from_stores(cls, model=None, tokenizer=None, store: str | None = None) -> HistorySource:
        """The registry's constructor: the history saved at ``store`` when it exists (refused
        if it is damaged or of another tokenizer), else an empty one that ``save`` writes there."""
        if store and Path(store).exists():
            return cls.load(store, tokenizer)
        source = cls(store=HistoryStore(HistoryConfig.max_tokens, tokenizer))
        source.store.path = Path(store) if store else None
        return source

    @property
    def path(self) -> Path | None:
        """Where the history was loaded from or will be saved (for messages)."""
        return self.store.path

    def in_namespace(self, namespace: str) -> HistorySource:
        """A source over the same store that learns and drafts in another namespace."""
        source = HistorySource(self.config, self.store, namespace)
        source.name = self.name
        return source

    def forget(self) -> None:
        """Drop everything this namespace learnt (e.g. a benchmark's warm-up)."""
        self.index = self.store.reset(self.namespace)

    def start_request(self, prompt: np.ndarray, documents: Sequence[str] = ()) -> HistorySession:
        return HistorySession(self, prompt)

    def add(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Learn one finished request (what a session's ``finish`` does)."""
        self.index.add(prompt if self.config.learn_prompts else [], output)

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str | Path | None = None, *, force: bool = False) -> None:
        """Write every namespace of the store (to ``path``, default where it was loaded from)."""
        target = path or self.store.path
        if target is None:
            raise ValueError("save needs a path: this history was not loaded from one")
        self.store.save(target, force=force)
        self.store.path = Path(target)

    @classmethod
    def load(cls, path: str | Path, tokenizer=None, config: HistoryConfig | None = None, namespace: str = "") -> HistorySource:
        """A source over a saved history (see :meth:`HistoryStore.load`: corrupted,
        truncated or another tokenizer's files are refused with a message naming them)."""
        config = config or HistoryConfig()
        return cls(config, HistoryStore.load(path, tokenizer, config.max_tokens), namespace)


class HistorySession:
    """One request's view: drafts from the shared history, adds itself when it finishes."""

    def __init__(self, source: HistorySource, prompt: np.ndarray):
        self.source = source
        self.prompt = np.asarray(prompt, np.int64).copy()
        self.finished = False

    def propose(self, context: np.ndarray, max_nodes: int, max_depth: int) -> DraftTree:
        cfg = self.source.config
        depth = min(max_depth, cfg.max_depth)
        if max_nodes <= 0 or depth <= 0 or context.shape[0] < cfg.min_match:
            return DraftTree.empty()
        index = self.source.index
        ends, lengths = index.matches(context, cfg.min_match, cfg.max_match, cfg.max_matches, cfg.max_chain)
        if ends.shape[0] == 0:
            return DraftTree.empty()
        rows, kinds, live = index.continuations(ends, depth)
        if rows.shape[0] == 0:  # evicted while it was read
            return DraftTree.empty()
        lengths = lengths[live]
        weights = cfg.match_weight ** lengths.astype(np.float64) * np.where(kinds == PROMPT, cfg.prompt_weight, 1.0)
        longest = int(lengths.max())
        return continuation_trie(rows, weights, root_conf=longest / (longest + 1.0), decay=0.9, max_nodes=max_nodes)

    def observe(self, step: Verified) -> None:
        """Nothing per step: the request is learnt whole, when it finishes."""

    def finish(self, context: np.ndarray) -> None:
        """The request ended with ``context`` (prompt + output): add it to the history, once."""
        if self.finished:
            return
        self.finished = True
        self.source.add(self.prompt, np.asarray(context, np.int64)[self.prompt.shape[0]:])
