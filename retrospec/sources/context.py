"""The context source: continuations of the current suffix inside the request itself.

Prompt lookup (PLD) takes the *first* earlier occurrence of the last 1–3 tokens and
proposes the 10 tokens after it as a chain. This source keeps an incremental index of
every n-gram (n = 1..``max_ngram``) of prompt + output, finds the longest suffix that
occurred before, and merges the continuations of *all* its recent occurrences (topped up
with shorter-suffix matches) into a trie weighted by match length and count — so where the
context repeats with variations, the tree carries every variant.

The index grows with each committed token (``NgramIndex.extend``); it is never rebuilt.

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

from retrospec.jit import njit
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


_SEED, _PRIME, _MASK = 0x27D4EB2F165667C5, 0x100000001B3, (1 << 62) - 1


@njit()
def _mix(h, token):
    """One token more in an n-gram's hash (the same low bits compiled or interpreted)."""
    return ((h ^ (token + 2)) * _PRIME) & _MASK


@njit()
def _same(arr, end, other, other_end, n):
    """Whether the ``n`` tokens ending at ``arr[end]`` equal those ending at ``other[other_end]``."""
    for k in range(n):  # noqa: SIM110 (a loop numba compiles; all() of a generator it does not)
        if arr[end - k] != other[other_end - k]:
            return False
    return True


@njit()
def _index_ngrams(arr, start, stop, max_n, heads, sizes, prev) -> int:
    """Index the n-grams (``n <= max_n``) ending at ``start .. stop - 1``: each table slot
    holds an n-gram's latest end (``heads``) and length (``sizes``); ``prev[n - 1, t]`` the
    end before ``t`` of the n-gram ending at ``t`` (-1: none). Returns the new n-grams."""
    mask = heads.shape[0] - 1
    added = 0
    for t in range(start, stop):
        h = _SEED
        for n in range(1, min(max_n, t + 1) + 1):
            h = _mix(h, arr[t - n + 1])
            slot = (h ^ (h >> 29)) & mask
            while True:
                p = heads[slot]
                if p < 0:
                    heads[slot], sizes[slot], prev[n - 1, t] = t, n, -1
                    added += 1
                    break
                if sizes[slot] == n and _same(arr, p, arr, t, n):
                    prev[n - 1, t], heads[slot] = p, t
                    break
                slot = (slot + 1) & mask
    return added


@njit()
def _occurrences(arr, tail, min_n, max_matches, exclude_end, heads, sizes, prev, out_end, out_n) -> int:
    """The most recent ends of ``tail``'s suffixes, longest first, into ``out_end`` /
    ``out_n`` (distinct ends, ``exclude_end`` left out); returns how many."""
    mask = heads.shape[0] - 1
    m = tail.shape[0]
    hashes = np.empty(m + 1, np.int64)
    h = _SEED
    for n in range(1, m + 1):
        h = _mix(h, tail[m - n])
        hashes[n] = h
    found = 0
    for n in range(m, min_n - 1, -1):
        h = hashes[n]
        slot = (h ^ (h >> 29)) & mask
        end = -1
        while heads[slot] >= 0:
            if sizes[slot] == n and _same(arr, heads[slot], tail, m - 1, n):
                end = heads[slot]
                break
            slot = (slot + 1) & mask
        while end >= 0:
            if end != exclude_end:
                seen = False
                for i in range(found):
                    if out_end[i] == end:
                        seen = True
                        break
                if not seen:
                    out_end[found], out_n[found] = end, n
                    found += 1
                    if found >= max_matches:
                        return found
            end = prev[n - 1, end]
    return found


class NgramIndex:
    """Every n-gram (``n <= max_n``) of a growing token sequence, with its end positions.

    Arrays, not Python objects: an open-addressing hash table from each n-gram to its latest
    end, and per length a chain from each end to the one before. ``extend`` costs ``max_n``
    table probes per token, a lookup one probe per suffix length plus one step per
    occurrence, in compiled kernels; nothing here is left for the garbage collector to scan
    (a dict of tuples and lists of 64 requests' contexts made its full collections take
    tens of milliseconds).

    >>> index = NgramIndex(max_n=3)
    >>> index.extend([1, 2, 3, 1, 2, 4])
    >>> index.occurrences([7, 1, 2], min_n=1, max_matches=8)   # "1 2" ended at 4 and 1
    [(4, 2), (1, 2)]
    >>> index.continuation(1, 3)
    [3, 1, 2]
    """

    def __init__(self, max_n: int, capacity: int = 256):
        self.max_n = max_n
        self._n = 0
        self._array = np.empty(capacity, np.int64)
        self._prev = np.empty((max_n, capacity), np.int64)
        self._rehash(2 * capacity)  # the table: a power of two, at most half full
        self._out = (np.empty(1, np.int64), np.empty(1, np.int64))

    def __len__(self) -> int:
        return self._n

    def tokens(self) -> np.ndarray:
        """The sequence so far (a read-only view)."""
        view = self._array[: self._n]
        view.flags.writeable = False
        return view

    def extend(self, tokens: Sequence[int] | np.ndarray) -> None:
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        start, stop = self._n, self._n + tokens.shape[0]
        if stop > self._array.shape[0]:
            size = max(2 * self._array.shape[0], stop)
            array, prev = np.empty(size, np.int64), np.empty((self.max_n, size), np.int64)
            array[:start], prev[:, :start] = self._array[:start], self._prev[:, :start]
            self._array, self._prev = array, prev
        self._array[start:stop] = tokens
        if 2 * (self._entries + self.max_n * tokens.shape[0]) > self._heads.shape[0]:
            self._rehash(2 * (self._entries + self.max_n * tokens.shape[0]))
        self._entries += _index_ngrams(self._array, start, stop, self.max_n, self._heads, self._sizes, self._prev)
        self._n = stop

    def _rehash(self, least: int) -> None:
        size = 1 << max(int(least - 1).bit_length(), 1)
        self._heads, self._sizes = np.full(2 * size, -1, np.int64), np.zeros(2 * size, np.int64)  # n-gram -> latest end, length
        self._entries = _index_ngrams(self._array, 0, self._n, self.max_n, self._heads, self._sizes, self._prev)

    def occurrences(self, tail: Sequence[int] | np.ndarray, min_n: int, max_matches: int, exclude_end: int = -1) -> list[tuple[int, int]]:
        """``(end position, match length)`` of the most recent occurrences of ``tail``'s suffixes.

        The longest matching suffix first; shorter ones top the list up to ``max_matches``.
        """
        tail = np.asarray(tail, np.int64).reshape(-1)[-self.max_n :]
        if self._out[0].shape[0] < max_matches:
            self._out = (np.empty(max_matches, np.int64), np.empty(max_matches, np.int64))
        ends, lengths = self._out
        found = _occurrences(self._array, tail, min_n, max_matches, exclude_end, self._heads, self._sizes, self._prev, ends, lengths)
        return list(zip(ends[:found].tolist(), lengths[:found].tolist()))

    def continuation(self, end: int, depth: int, stop: int | None = None) -> list[int]:
        """The ``depth`` tokens after position ``end``, cut before ``stop``."""
        out = self._array[end + 1 : min(end + 1 + depth, self._n)].tolist()
        if stop is not None and stop in out:
            out = out[: out.index(stop)]
        return out

    def continuation_rows(self, ends: Sequence[int], depth: int) -> np.ndarray:
        """``int64 [len(ends), depth]``: the tokens after each end position, ``PAD`` past the end.

        >>> index = NgramIndex(2); index.extend([1, 2, 3])
        >>> index.continuation_rows([0, 1], 3).tolist()
        [[2, 3, -1], [3, -1, -1]]
        """
        n = self._n
        idx = np.asarray(ends, np.int64)[:, None] + 1 + np.arange(depth)
        return np.where(idx < n, self._array[np.minimum(idx, n - 1)], PAD)


class ContextSession:
    """The incremental n-gram index of one request."""

    def __init__(self, config: ContextConfig, prompt: np.ndarray) -> None:
        self.config = config
        self.index = NgramIndex(config.max_ngram)
        self.index.extend(prompt)

    def _sync(self, context: np.ndarray) -> None:
        known = len(self.index)
        if len(context) < known:
            raise ValueError(f"context shrank from {known} to {len(context)} tokens")
        if len(context) > known:
            self.index.extend(context[known:])

    def matches(self) -> list[tuple[int, int]]:
        """``(end position, match length)`` of the most recent earlier occurrences of the suffix."""
        cfg, seq = self.config, self.index.tokens()
        return self.index.occurrences(seq[-cfg.max_ngram :], cfg.min_ngram, cfg.max_matches, exclude_end=seq.shape[0] - 1)

    def skip_matches(self, skip: int) -> list[tuple[int, int]]:
        """Occurrences of the suffix *before* the last ``skip`` tokens, when those are new.

        Tokens never seen before often fill a slot in a repeated pattern (another name in a
        list, another identifier in a line of code): what followed the pattern then may
        follow now, ``skip`` tokens later.
        """
        cfg, seq = self.config, self.index.tokens()
        head = seq.shape[0] - skip
        if head < 2:
            return []
        return self.index.occurrences(seq[max(head - cfg.max_ngram, 0) : head], cfg.min_ngram, cfg.max_matches, exclude_end=head - 1)

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
