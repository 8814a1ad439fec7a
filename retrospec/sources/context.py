"""The context source: continuations of the current suffix inside the request itself.

Prompt lookup (PLD) takes the *first* earlier occurrence of the last 1–3 tokens and
proposes the 10 tokens after it as a chain. This source keeps an incremental index of
every n-gram (n = 1..``max_ngram``) of prompt + output, finds the longest suffix that
occurred before, and merges the continuations of *all* its recent occurrences (topped up
with shorter-suffix matches) into a trie weighted by match length and count — so where the
context repeats with variations, the tree carries every variant.

The index grows with each committed token (``_extend``); it is never rebuilt.

>>> src = ContextSource(ContextConfig(max_depth=3))
>>> session = src.start_request(np.array([1, 2, 3, 9, 1, 2, 4, 1, 2]))
>>> tree = session.propose(np.array([1, 2, 3, 9, 1, 2, 4, 1, 2]), max_nodes=8, max_depth=3)
>>> tree.paths()   # "1 2" was followed by "3 9 1" and by "4 1 2"
[[3, 9, 1], [4, 1, 2]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrospec.sources.base import Verified
from retrospec.sources.trie import PAD, continuation_trie
from retrospec.tree import DraftTree


@dataclass(frozen=True)
class ContextConfig:
    """Settings of :class:`ContextSource`."""

    max_ngram: int = 8
    """Longest suffix looked up; longer matches are counted as this long."""
    min_ngram: int = 1
    """Shortest suffix that may anchor a draft."""
    max_matches: int = 32
    """Most recent occurrences whose continuations are merged."""
    max_depth: int = 16
    """Longest continuation taken from one occurrence."""
    match_weight: float = 2.0
    """An occurrence matching ``n`` suffix tokens weighs ``match_weight ** n``."""
    max_skip: int = 2
    """When the last token never occurred before, match the suffix before it (up to this many
    new tokens back) and skip them: a pattern repeated with a new filler. 0 disables."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if self.max_matches < 1 or self.max_depth < 1:
            raise ValueError(f"max_matches and max_depth must be >= 1, got {self.max_matches}, {self.max_depth}")
        if self.max_skip < 0:
            raise ValueError(f"max_skip must be >= 0, got {self.max_skip}")
        if self.match_weight < 1.0:
            raise ValueError(f"match_weight must be >= 1, got {self.match_weight}")


class ContextSource:
    """Drafts from the request's own prompt and output (see the module docstring)."""

    name = "context"
    topk_wanted = 0

    def __init__(self, config: ContextConfig | None = None) -> None:
        self.config = config or ContextConfig()

    @classmethod
    def from_stores(cls, model=None, tokenizer=None, store=None) -> ContextSource:
        """The registry's constructor (see :mod:`retrospec.sources.registry`): needs nothing."""
        return cls()

    def start_request(self, prompt: np.ndarray, documents: Sequence[str] = ()) -> ContextSession:
        return ContextSession(self.config, prompt)


class NgramIndex:
    """Every n-gram (``n <= max_n``) of a growing token sequence, with its end positions.

    ``extend`` costs ``max_n`` dictionary updates per token; lookups are dictionary hits.

    >>> index = NgramIndex(max_n=3)
    >>> index.extend([1, 2, 3, 1, 2, 4])
    >>> index.occurrences([7, 1, 2], min_n=1, max_matches=8)   # "1 2" ended at 4 and 1
    [(4, 2), (1, 2)]
    >>> index.continuation(1, 3)
    [3, 1, 2]
    """

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.seq: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}
        self._array = np.empty(256, np.int64)  # the same tokens, for vectorised reads

    def __len__(self) -> int:
        return len(self.seq)

    def extend(self, tokens: Sequence[int]) -> None:
        seq, ends, max_n = self.seq, self.ends, self.max_n
        start = len(seq)
        if start + len(tokens) > self._array.shape[0]:
            grown = np.empty(max(2 * self._array.shape[0], start + len(tokens)), np.int64)
            grown[:start] = self._array[:start]
            self._array = grown
        self._array[start : start + len(tokens)] = tokens
        for token in tokens:
            seq.append(int(token))
            t = len(seq) - 1
            for n in range(1, min(max_n, t + 1) + 1):
                key = tuple(seq[t - n + 1 : t + 1])
                bucket = ends.get(key)
                if bucket is None:
                    ends[key] = [t]
                else:
                    bucket.append(t)

    def occurrences(self, tail: Sequence[int], min_n: int, max_matches: int, exclude_end: int = -1) -> list[tuple[int, int]]:
        """``(end position, match length)`` of the most recent occurrences of ``tail``'s suffixes.

        The longest matching suffix first; shorter ones top the list up to ``max_matches``.
        """
        tail = list(tail)[-self.max_n :]
        found: dict[int, int] = {}
        for n in range(len(tail), min_n - 1, -1):
            bucket = self.ends.get(tuple(tail[len(tail) - n :]))
            if not bucket:
                continue
            for end in reversed(bucket):
                if end != exclude_end and end not in found:
                    found[end] = n
                    if len(found) >= max_matches:
                        return list(found.items())
        return list(found.items())

    def continuation(self, end: int, depth: int, stop: int | None = None) -> list[int]:
        """The ``depth`` tokens after position ``end``, cut before ``stop``."""
        out = self.seq[end + 1 : end + 1 + depth]
        if stop is not None and stop in out:
            out = out[: out.index(stop)]
        return out

    def continuation_rows(self, ends: Sequence[int], depth: int) -> np.ndarray:
        """``int64 [len(ends), depth]``: the tokens after each end position, ``PAD`` past the end.

        >>> index = NgramIndex(2); index.extend([1, 2, 3])
        >>> index.continuation_rows([0, 1], 3).tolist()
        [[2, 3, -1], [3, -1, -1]]
        """
        n = len(self.seq)
        idx = np.asarray(ends, np.int64)[:, None] + 1 + np.arange(depth)
        return np.where(idx < n, self._array[np.minimum(idx, n - 1)], PAD)


class ContextSession:
    """The incremental n-gram index of one request."""

    def __init__(self, config: ContextConfig, prompt: np.ndarray) -> None:
        self.config = config
        self.index = NgramIndex(config.max_ngram)
        self.index.extend(np.asarray(prompt).tolist())

    def _sync(self, context: np.ndarray) -> None:
        known = len(self.index)
        if len(context) < known:
            raise ValueError(f"context shrank from {known} to {len(context)} tokens")
        if len(context) > known:
            self.index.extend(np.asarray(context[known:]).tolist())

    def matches(self) -> list[tuple[int, int]]:
        """``(end position, match length)`` of the most recent earlier occurrences of the suffix."""
        cfg, seq = self.config, self.index.seq
        last = len(seq) - 1
        return self.index.occurrences(seq[-cfg.max_ngram :], cfg.min_ngram, cfg.max_matches, exclude_end=last)

    def skip_matches(self, skip: int) -> list[tuple[int, int]]:
        """Occurrences of the suffix *before* the last ``skip`` tokens, when those are new.

        Tokens never seen before often fill a slot in a repeated pattern (another name in a
        list, another identifier in a line of code): what followed the pattern then may
        follow now, ``skip`` tokens later.
        """
        cfg, seq = self.config, self.index.seq
        if len(seq) < skip + 2:
            return []
        head = seq[:-skip]
        return self.index.occurrences(head[-cfg.max_ngram :], cfg.min_ngram, cfg.max_matches, exclude_end=len(head) - 1)

    def propose(self, context: np.ndarray, max_nodes: int, max_depth: int) -> DraftTree:
        self._sync(context)
        if max_nodes <= 0 or max_depth <= 0:
            return DraftTree.empty()
        cfg = self.config
        depth = min(max_depth, cfg.max_depth)
        matches, skip = self.matches(), 0
        while not matches and skip < cfg.max_skip:
            skip += 1
            matches = self.skip_matches(skip)
        if not matches:
            return DraftTree.empty()
        rows = self.index.continuation_rows([end + skip for end, _ in matches], depth)
        weights = cfg.match_weight ** np.asarray([n for _, n in matches], np.float64)
        longest = matches[0][1]
        # a 1-token match predicts far worse than an 8-token one, and a skip-gram worse still
        root_conf = longest / (longest + 1.0 + 2.0 * skip)
        return continuation_trie(rows, weights, root_conf=root_conf, decay=0.9, max_nodes=max_nodes)

    def observe(self, step: Verified) -> None:
        """Nothing to learn: committed tokens reach the index through the next ``propose``."""
