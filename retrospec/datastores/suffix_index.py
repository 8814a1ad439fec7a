"""The n-gram suffix index: continuations of the context's suffix in an offline corpus.

REST (He et al., 2023) showed that a datastore of past conversations or code, searched by
the longest suffix of the current context, drafts well where the prompt alone does not.
Here the datastore is a token suffix array per shard, memory-mapped from disk, so
resident memory does not grow with the corpus and opening an index is O(1).

One query (numba-compiled kernels on the memory-mapped arrays; see :mod:`retrospec.jit` for
lean processes that run them without numba):

1. map the last ``max_ngram`` context tokens to the shard's own vocabulary (a corpus rarely
   uses more than 65,535 distinct tokens; tokens and suffix-array entries are bit-packed in
   the fewest bits that hold them, about 5 bytes per token whatever the model's vocabulary);
2. find the longest suffix ``m`` that occurs, by binary search over ``m`` (occurrence is
   monotone in ``m``), each test a binary search of the suffix array;
3. sample up to ``max_matches`` occurrences evenly across the suffix-array range (so
   frequent continuations are sampled in proportion to their counts), read the tokens
   after each up to a document separator, sort them and merge them into a trie with counts;
4. score each node by its count share times a confidence growing with ``m``.

Tokens from different documents are separated by a reserved value no query can contain,
so no match and no continuation crosses a document boundary.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from retrospec.datastores.files import (
    IndexFormatError,
    check_files,
    check_tokenizer,
    open_array,
    read_manifest,
)
from retrospec.jit import njit
from retrospec.sources.base import Verified
from retrospec.sources.trie import continuation_trie
from retrospec.tree import DraftTree

log = logging.getLogger(__name__)

FORMAT = "retrospec-suffix-index"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SuffixConfig:
    """Query settings of :class:`SuffixIndex`."""

    max_ngram: int = 12
    """Longest context suffix looked up."""
    min_ngram: int = 2
    """Shortest suffix that may anchor a draft (1-token matches mostly add noise)."""
    max_matches: int = 64
    """Occurrences sampled per query."""
    max_depth: int = 12
    """Longest continuation read after an occurrence."""
    release_every: int = 64
    """Release the index pages mapped into this process every this many queries (0: never),
    so its resident memory stays bounded whatever the index size."""
    release_above_mb: int = 128
    """Only indexes larger than this release their pages: a small one stays mapped whole,
    since releasing makes the next queries fault the pages in again (p99 ×5)."""
    cached_levels: int = 16
    """Binary-search levels kept in memory per shard (see ``TopLevels``; 16 levels take
    ``2**16 * max_ngram * 4`` bytes, 3 MB at the defaults; 0: none)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if self.max_matches < 1 or self.max_depth < 1:
            raise ValueError(f"max_matches and max_depth must be >= 1, got {self.max_matches}, {self.max_depth}")
        if not 0 <= self.cached_levels <= 24:
            raise ValueError(f"cached_levels must be in [0, 24], got {self.cached_levels}")


# --------------------------------------------------------------------------- bit-packed arrays
# Tokens and suffix-array entries are stored as little-endian bit-packed unsigned integers
# of the fewest bits that hold them: value i occupies bits [i*w, (i+1)*w) of a byte array
# padded with 8 zero bytes. A 10M-token shard over a corpus of < 65,535 distinct tokens
# takes 16 + 24 bits per token; a multilingual one with a 151k vocabulary 17 + 24.
PAD = 8


def _bits_get_py(data, i, w):
    """``bits_get`` for interpreted kernels: one 8-byte read instead of a loop over numpy scalars."""
    bit = int(i) * w
    byte = bit >> 3
    return (int.from_bytes(data[byte : byte + 8], "little") >> (bit & 7)) & ((1 << w) - 1)


@njit(inline="always", py=_bits_get_py)
def bits_get(data, i, w):
    """Value ``i`` of a ``w``-bit packed array (``w <= 56``)."""
    bit = np.int64(i) * w
    byte = bit >> 3
    shift = bit & 7
    v = np.int64(0)
    for b in range((shift + w + 7) >> 3):
        v |= np.int64(data[byte + b]) << (8 * b)
    return (v >> shift) & ((np.int64(1) << w) - 1)


@njit()
def _pack(values, w, out):
    for i in range(values.shape[0]):
        v = np.int64(values[i])
        bit = np.int64(i) * w
        byte = bit >> 3
        shift = bit & 7
        v = v << shift
        for b in range((shift + w + 7) >> 3):
            out[byte + b] |= np.uint8((v >> (8 * b)) & 0xFF)


def pack_bits(values: np.ndarray, w: int) -> np.ndarray:
    """``int[n]`` (each ``< 2**w``) -> ``uint8`` bit-packed array (padded).

    >>> pack_bits(np.array([1, 2, 3]), 2).tolist()[:1]   # 0b11_10_01
    [57]
    """
    if not 1 <= w <= 56:
        raise ValueError(f"bit width must be in [1, 56], got {w}")
    out = np.zeros((values.shape[0] * w + 7) // 8 + PAD, np.uint8)
    _pack(np.ascontiguousarray(values, np.int64), w, out)
    return out


@njit()
def _unpack(data, w, start, stop):
    out = np.empty(stop - start, np.int64)
    for i in range(start, stop):
        out[i - start] = bits_get(data, i, w)
    return out


def unpack_bits(data: np.ndarray, w: int, start: int, stop: int) -> np.ndarray:
    """``int64`` values ``start..stop-1`` of a ``w``-bit packed array.

    >>> unpack_bits(pack_bits(np.array([5, 70000, 3]), 17), 17, 0, 3).tolist()
    [5, 70000, 3]
    """
    return _unpack(data, w, start, stop)


def bits_for(max_value: int) -> int:
    """Fewest bits that hold ``0..max_value``."""
    return max(int(max_value).bit_length(), 1)


# --------------------------------------------------------------------------- numba kernels
@njit()
def _compare(tok, tw, n, start, pattern, m):
    """Order of the suffix at ``start`` against ``pattern[:m]``: -1 below, 0 prefix match, 1 above."""
    for j in range(m):
        if start + j >= n:
            return -1  # the suffix ended first: it sorts below
        a = bits_get(tok, start + j, tw)
        b = pattern[j]
        if a < b:
            return -1
        if a > b:
            return 1
    return 0


class TopLevels(NamedTuple):
    """The first rows every binary search probes, copied out of the mapped arrays.

    A search over rows ``[0, n)`` always probes the same rows first: row ``mid`` of heap
    node ``h`` (root ``h = 1``; going down-left ``2h``, down-right ``2h + 1``) depends on
    nothing but ``h``. Node ``h < 2**levels`` keeps the first ``width`` tokens of its suffix
    (``length`` of them before the shard ends) once a query has probed it, so later queries
    make their first ``levels`` comparisons without touching the index files: fewer page
    faults, fewer mapped pages, faster queries.
    """

    tokens: np.ndarray  # int32 [2**levels, width]
    length: np.ndarray  # int16 [2**levels]: valid tokens of the entry
    filled: np.ndarray  # uint8 [2**levels]

    @classmethod
    def empty(cls, levels: int, width: int) -> "TopLevels":
        size = 1 << levels if levels > 0 else 1
        return cls(np.zeros((size, width), np.int32), np.zeros(size, np.int16), np.zeros(size, np.uint8))


@njit()
def _compare_top(tok, tw, sa, sw, n, pattern, m, mid, h, top_tok, top_len, top_ok):
    """``_compare`` of row ``mid`` (heap node ``h``), served from the top levels when cached."""
    if h >= top_ok.shape[0] or m > top_tok.shape[1]:
        return _compare(tok, tw, n, bits_get(sa, mid, sw), pattern, m)
    if top_ok[h] == 0:
        start = bits_get(sa, mid, sw)
        k = 0
        while k < top_tok.shape[1] and start + k < n:
            top_tok[h, k] = bits_get(tok, start + k, tw)
            k += 1
        top_len[h] = k
        top_ok[h] = 1
    length = top_len[h]
    for j in range(m):
        if j >= length:
            return -1  # the suffix ended first: it sorts below
        a = top_tok[h, j]
        b = pattern[j]
        if a < b:
            return -1
        if a > b:
            return 1
    return 0


@njit()
def _sa_range(tok, tw, sa, sw, n, pattern, m, top_tok, top_len, top_ok):
    lo, hi, h = 0, n, 1
    upper = n  # the lowest row seen strictly above the pattern bounds the second search
    while lo < hi:  # first row not below the pattern
        mid = (lo + hi) // 2
        order = _compare_top(tok, tw, sa, sw, n, pattern, m, mid, h, top_tok, top_len, top_ok)
        if order < 0:
            lo = mid + 1
            h = 2 * h + 1
        else:
            hi = mid
            h = 2 * h
            if order > 0:
                upper = mid
    first = lo
    hi = upper
    while lo < hi:  # first row above it
        mid = (lo + hi) // 2
        if _compare(tok, tw, n, bits_get(sa, mid, sw), pattern, m) <= 0:
            lo = mid + 1
        else:
            hi = mid
    return first, lo


_NO_TOP = TopLevels.empty(0, 1)


def sa_range(tok, tw, sa, sw, n, pattern, m, top: TopLevels = _NO_TOP) -> tuple[int, int]:
    """``[lo, hi)``: the suffix-array rows whose suffix starts with ``pattern[:m]``.

    Invariant: ``sa`` sorts the ``n`` suffixes of ``tok``, so those rows are contiguous.
    ``top`` caches the rows every search probes first (see :class:`TopLevels`).
    """
    return _sa_range(tok, tw, sa, sw, n, np.asarray(pattern, np.int64), m, top.tokens, top.length, top.filled)


@njit()
def _longest_suffix(tok, tw, sa, sw, n, context, max_m, top_tok, top_len, top_ok):
    c = context.shape[0]
    limit = 0
    while limit < min(max_m, c) and context[c - 1 - limit] >= 0:
        limit += 1
    lo_m, hi_m = 0, limit
    best_lo, best_hi = 0, 0
    while lo_m < hi_m:  # occurrence is monotone in m: binary search the longest
        mid = (lo_m + hi_m + 1) // 2
        a, b = _sa_range(tok, tw, sa, sw, n, context[c - mid :], mid, top_tok, top_len, top_ok)
        if b > a:
            lo_m, best_lo, best_hi = mid, a, b
        else:
            hi_m = mid - 1
    return lo_m, best_lo, best_hi


def longest_suffix(tok, tw, sa, sw, n, context, max_m, top: TopLevels = _NO_TOP) -> tuple[int, int, int]:
    """Largest ``m <= max_m`` such that ``context[-m:]`` occurs, with its row range.

    ``context`` holds local token ids, ``-1`` for tokens the shard never saw. Returns
    ``(0, 0, 0)`` when not even the last token occurs.
    """
    return _longest_suffix(tok, tw, sa, sw, n, np.asarray(context, np.int64), max_m, top.tokens, top.length, top.filled)


@njit()
def gather(tok, tw, sa, sw, n, lo, hi, m, take, depth, sep, out, row0):
    """Write the continuations of ``take`` occurrences, evenly spaced over rows ``[lo, hi)``,
    into ``out[row0 : row0 + take]`` (``-1`` padded, cut at ``sep``); return rows written."""
    count = hi - lo
    if take > count:
        take = count
    for i in range(take):
        row = lo + (i * count) // take
        pos = bits_get(sa, row, sw) + m
        for d in range(depth):
            if pos + d >= n:
                break
            t = bits_get(tok, pos + d, tw)
            if t == sep:
                break
            out[row0 + i, d] = t
    return take


# --------------------------------------------------------------------------- the index
@dataclass
class Shard:
    """One suffix array over part of the corpus (see the bit-packed arrays above)."""

    name: str
    n: int  # positions: tokens + one separator per document
    tokens: np.ndarray  # local ids, ``token_bits``-bit packed; documents separated by ``sep``
    token_bits: int
    sa: np.ndarray  # the suffix array of ``tokens``, ``sa_bits``-bit packed
    sa_bits: int
    vocab: np.ndarray  # uint32: global token id of each local id (sorted)
    sep: int
    top: TopLevels  # the first binary-search levels, filled by queries

    def local(self, ids: np.ndarray) -> np.ndarray:
        """Global ids -> local ids, ``-1`` where the shard never saw the token."""
        pos = np.searchsorted(self.vocab, ids)
        pos = np.minimum(pos, self.vocab.shape[0] - 1)
        return np.where(self.vocab[pos] == ids, pos, -1).astype(np.int64)

    def token_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return unpack_bits(self.tokens, self.token_bits, start, self.n if stop is None else stop)

    def sa_entry(self, row: int) -> int:
        return int(bits_get(self.sa, row, self.sa_bits))


class SuffixIndex:
    """A read-only, memory-mapped corpus index usable as a draft source.

    Open one with :meth:`open`; build one with ``retrospec index build`` or
    :func:`retrospec.datastores.suffix_build.build_index`.
    """

    name = "suffix-index"
    topk_wanted = 0

    def __init__(self, root: Path, manifest: dict, shards: list[Shard], config: SuffixConfig):
        self.root, self.manifest, self.shards, self.config = root, manifest, shards, config
        self._maps: list = []
        self._queries = 0
        self._lock = threading.Lock()  # queries fill the shards' top levels
        self._bytes = sum(f["bytes"] for shard in manifest["shards"] for f in shard["files"].values())

    @classmethod
    def open(cls, root: str | Path, tokenizer=None, config: SuffixConfig | None = None) -> "SuffixIndex":
        """Open an index directory in O(1): manifest, sizes and edge checksums are checked,
        arrays are memory-mapped. With ``tokenizer``, refuse an index built with another."""
        manifest = read_manifest(root, FORMAT, FORMAT_VERSION)
        root = manifest.root
        config = config or SuffixConfig()
        if tokenizer is not None:
            check_tokenizer(manifest, tokenizer)
        shards, maps = [], []
        for entry in manifest.data["shards"]:
            files = entry["files"]
            check_files(root, files)
            names = {k.rsplit("/", 1)[-1]: k for k in files}
            mapped = {short: open_array(root, full, files[full]) for short, full in names.items()}
            maps.extend(m for m in mapped.values() if hasattr(m, "release"))
            arrays = {short: getattr(m, "array", m) for short, m in mapped.items()}
            levels = min(config.cached_levels, max(int(entry["positions"]).bit_length() - 1, 0))
            shard = Shard(entry["name"], int(entry["positions"]), arrays["tokens.bin"], int(entry["token_bits"]),
                          arrays["sa.bin"], int(entry["sa_bits"]), arrays["vocab.bin"], int(entry["sep"]),
                          TopLevels.empty(levels, config.max_ngram))
            _spot_check(root / entry["name"], shard)
            shards.append(shard)
        if not shards:
            raise IndexFormatError(f"{root}: the index has no shards")
        index = cls(root, manifest.data, shards, config)
        index._maps = maps
        return index

    @classmethod
    def from_stores(cls, model=None, tokenizer=None, store: str | None = None) -> "SuffixIndex":
        """The registry's constructor: the index directory ``store``, checked against ``tokenizer``."""
        return cls.open(store, tokenizer=tokenizer)

    def release_pages(self) -> None:
        """Drop the mapped pages this process has touched (see ``MappedArray``)."""
        for m in self._maps:
            m.release()

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def n_documents(self) -> int:
        return int(self.manifest["documents"])

    def query(self, context: np.ndarray, max_nodes: int = 64, max_depth: int | None = None) -> DraftTree:
        """The draft tree for the tokens after ``context`` (global token ids)."""
        cfg = self.config
        self._queries += 1
        try:
            return self._query(context, max_nodes, max_depth)
        finally:  # after the query, so the pages it touched do not stay mapped until the next one
            if cfg.release_every and self._queries % cfg.release_every == 0 and self._bytes > cfg.release_above_mb * 2**20:
                self.release_pages()

    def _query(self, context: np.ndarray, max_nodes: int, max_depth: int | None) -> DraftTree:
        cfg = self.config
        depth = min(cfg.max_depth, max_depth if max_depth is not None else cfg.max_depth)
        if depth <= 0 or max_nodes <= 0 or context.shape[0] == 0:
            return DraftTree.empty()
        tail = np.asarray(context[-cfg.max_ngram :], np.int64)
        found = []
        for shard in self.shards:
            with self._lock:
                m, lo, hi = longest_suffix(shard.tokens, shard.token_bits, shard.sa, shard.sa_bits, shard.n, shard.local(tail),
                                           cfg.max_ngram, shard.top)
            if m >= cfg.min_ngram:
                found.append((m, lo, hi, shard))
        if not found:
            return DraftTree.empty()
        best = max(f[0] for f in found)
        found = [f for f in found if f[0] == best]
        total = sum(hi - lo for _, lo, hi, _ in found)
        rows = np.full((cfg.max_matches + len(found), depth), -1, np.int64)
        used = 0
        for m, lo, hi, shard in found:
            take = max(1, (cfg.max_matches * (hi - lo)) // total)
            start = used
            used += gather(shard.tokens, shard.token_bits, shard.sa, shard.sa_bits, shard.n, lo, hi, m, take, depth, shard.sep, rows, used)
            block = rows[start:used]
            valid = block >= 0
            block[valid] = shard.vocab[block[valid]]  # back to global ids
        # counts as scores, +1 smoothing: one occurrence is weaker evidence than fifty
        return continuation_trie(rows[:used], None, root_conf=best / (best + 1.0), decay=0.95, smoothing=1.0, max_nodes=max_nodes)

    def start_request(self, prompt: np.ndarray, documents: Sequence[str] = ()) -> "SuffixIndexSession":
        return SuffixIndexSession(self)

    def describe(self) -> dict:
        """Counts and build facts, for ``retrospec index info``."""
        m = self.manifest
        return {
            "path": str(self.root),
            "format_version": m["format_version"],
            "tokenizer": m["tokenizer"],
            "tokens": m["tokens"],
            "documents": m["documents"],
            "shards": len(self.shards),
            "bytes": self._bytes,
            "bytes_per_token": round(self._bytes / max(m["tokens"], 1), 3),
            "build": m.get("build", {}),
            "created": m.get("created"),
        }


class SuffixIndexSession:
    """The index holds no per-request state."""

    def __init__(self, index: SuffixIndex):
        self.index = index

    def propose(self, context: np.ndarray, max_nodes: int, max_depth: int) -> DraftTree:
        return self.index.query(context, max_nodes, max_depth)

    def observe(self, step: Verified) -> None:
        """Read-only datastore: nothing to learn."""


def _spot_check(path: Path, shard: Shard, samples: int = 16) -> None:
    """O(1) structural checks: suffix-array entries in range and locally sorted."""
    n = shard.n
    if shard.tokens.shape[0] < (n * shard.token_bits + 7) // 8 or shard.sa.shape[0] < (n * shard.sa_bits + 7) // 8:
        raise IndexFormatError(f"{path}: arrays too short for {n} positions")
    if n < 2:
        return
    rows = np.linspace(0, n - 2, num=min(samples, n - 1)).astype(np.int64)
    for row in rows.tolist():
        a, b = shard.sa_entry(row), shard.sa_entry(row + 1)
        if not (0 <= a < n and 0 <= b < n):
            raise IndexFormatError(f"{path}: suffix array entry out of range at row {row} (corrupted)")
        width = min(32, n - a, n - b)
        x, y = shard.token_ids(a, a + width), shard.token_ids(b, b + width)
        diff = np.flatnonzero(x != y)
        if diff.size and x[diff[0]] > y[diff[0]]:
            raise IndexFormatError(f"{path}: suffix array out of order at row {row} (corrupted)")


def verify_index(root: str | Path) -> dict:
    """Full check: every byte against its sha256, and the whole suffix array sorted."""
    manifest = read_manifest(root, FORMAT, FORMAT_VERSION)
    checked = 0
    for entry in manifest.data["shards"]:
        check_files(manifest.root, entry["files"], full=True)
    index = SuffixIndex.open(root)
    for shard in index.shards:
        if not bool(_sa_sorted(shard.tokens, shard.token_bits, shard.sa, shard.sa_bits, shard.n)):
            raise IndexFormatError(f"{index.root / shard.name}: suffix array is not a sorted permutation (corrupted)")
        if shard.n and int(shard.token_ids().max()) > shard.sep:
            raise IndexFormatError(f"{index.root / shard.name}: token ids beyond the shard vocabulary")
        checked += shard.n
    return {"tokens_checked": checked, "shards": len(index.shards)}


@njit()
def _sa_sorted(tok, tw, sa, sw, n):
    seen = np.zeros(n, np.bool_)
    for row in range(n):
        p = bits_get(sa, row, sw)
        if p < 0 or p >= n or seen[p]:
            return False
        seen[p] = True
        if row > 0:
            q = bits_get(sa, row - 1, sw)
            j = 0
            while q + j < n and p + j < n and bits_get(tok, q + j, tw) == bits_get(tok, p + j, tw):
                j += 1
            # suffix q must sort below suffix p: q ends first, or differs with a smaller token
            if p + j < n and (q + j >= n or bits_get(tok, q + j, tw) < bits_get(tok, p + j, tw)):
                continue
            return False
    return True
