"""The n-gram suffix index: continuations of the context's suffix in an offline corpus.

REST (He et al., 2023) showed that a datastore of past conversations or code, searched by
the longest suffix of the current context, drafts well where the prompt alone does not.
Here the datastore is a token suffix array per shard, memory-mapped from disk or read
with ``pread`` (see *reads* below), so resident memory does not grow with the corpus and
opening an index is O(1).

One query (numba-compiled kernels over every shard in one call; see :mod:`retrospec.jit` for
lean processes that run them without numba):

1. map the last ``max_ngram`` context tokens to the shard's own vocabulary (a corpus rarely
   uses more than 65,535 distinct tokens; tokens and suffix-array entries are bit-packed in
   the fewest bits that hold them, about 5 bytes per token whatever the model's vocabulary);
2. find the longest suffix ``m`` that occurs, by binary search over ``m`` (occurrence is
   monotone in ``m``; the shards after the first gallop up from the longest found so far),
   each test a binary search of the suffix array;
3. sample up to ``max_matches`` occurrences evenly across the suffix-array range (so
   frequent continuations are sampled in proportion to their counts), read the tokens
   after each up to a document separator, sort them and merge them into a trie with counts;
4. check the crc32 of every block of ``tokens.bin``/``sa.bin`` the query read for the first
   time (see *Integrity* below), then score each node by its count share times a
   confidence growing with ``m``.

Tokens from different documents are separated by a reserved value no query can contain,
so no match and no continuation crosses a document boundary.

Integrity: an index may come from anywhere. Opening validates the manifest (its own
checksum, every field, every path inside the folder, sizes consistent with the files) and
reads the small files whole (``vocab.bin``, the block checksums). The large arrays are
covered by a crc32 per block of each shard's ``block_bytes`` (``tokens.crc``, ``sa.crc``),
checked lazily: the kernels note each block they read that is not verified yet, and the
query checks those blocks before it uses its answer, so a flipped byte is found by the first query that reads
it, at a cost paid once per block and process. A bad block raises :class:`IndexFormatError`
and the shard stays off; the kernels never read outside the arrays whatever the bytes say.
``verify_index`` checks everything, the suffix order in O(n).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from retrospec import jit
from retrospec.datastores.files import (
    NAME,
    IndexFormatError,
    Manifest,
    array_entry,
    check_files,
    check_tokenizer,
    confined,
    file_entry,
    open_array,
    read_manifest,
    read_small_array,
    tokenizer_fields,
)
from retrospec.jit import njit
from retrospec.sources.base import Verified
from retrospec.sources.trie import continuation_trie
from retrospec.tree import DraftTree

log = logging.getLogger(__name__)

FORMAT = "retrospec-suffix-index"
FORMAT_VERSION = 2
"""2: a checksummed manifest, per-block crc32 files, ``docs.sqlite`` in the manifest. Version 1
indexes are refused with a message to rebuild them (their manifest cannot be trusted)."""
DOCS_DB = "docs.sqlite"
BLOCK_BYTES = 1 << 16
"""Bytes per crc32 block of ``tokens.bin``/``sa.bin`` (see ``benchmarks/datastore_fuzz.md``)."""
MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = 1 << 12, 1 << 24
MAX_SHARD_POSITIONS = 1 << 31
MAX_SHARDS = 100_000
SHARD_FILES = ("tokens.bin", "sa.bin", "vocab.bin", "tokens.crc", "sa.crc")
MAX_CONTEXT = 1 << 24


READS = ("auto", "mapped", "pread")


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
    release_mapped_mb: int = 0
    """Also release once the file pages this process maps have grown by more than this since
    the last release (read from ``/proc/self/statm`` after each query, ~4 µs; 0: off). A query
    maps pages in every shard it searches, so with many shards a budget in bytes bounds
    resident memory where a count of queries does not."""
    cached_levels: int = 16
    """Binary-search levels kept in memory per shard (see ``TopLevels``; 16 levels take
    ``2**16 * max_ngram * 4`` bytes, 3 MB at the defaults; 0: none)."""
    reads: str = "auto"
    """How queries read ``tokens.bin`` and ``sa.bin``: ``"mapped"``, from memory maps (fastest
    while the pages stay mapped; a large index then drops them, see ``release_every``, and
    faults them in again), ``"pread"``, a ``pread`` call per probe from the page cache
    (nothing is mapped, so resident memory stays flat with nothing to release; POSIX only),
    or ``"auto"``: ``"pread"`` for an index larger than ``release_above_mb`` where the OS has
    it, ``"mapped"`` otherwise."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if self.release_every < 0 or self.release_mapped_mb < 0:
            raise ValueError(f"release_every and release_mapped_mb must be >= 0, got {self.release_every}, {self.release_mapped_mb}")
        if self.max_matches < 1 or self.max_depth < 1:
            raise ValueError(f"max_matches and max_depth must be >= 1, got {self.max_matches}, {self.max_depth}")
        if not 0 <= self.cached_levels <= 24:
            raise ValueError(f"cached_levels must be in [0, 24], got {self.cached_levels}")
        if self.reads not in READS:
            raise ValueError(f"reads must be one of {READS}, got {self.reads!r}")
        if self.reads == "pread" and not HAVE_PREAD:
            raise ValueError("reads='pread' needs os.pread (POSIX); use 'mapped' or 'auto'")


# --------------------------------------------------------------------------- bit-packed arrays
# Tokens and suffix-array entries are stored as little-endian bit-packed unsigned integers
# of the fewest bits that hold them: value i occupies bits [i*w, (i+1)*w) of a byte array
# padded with 8 zero bytes. A 10M-token shard over a corpus of < 65,535 distinct tokens
# takes 16 + 24 bits per token; a multilingual one with a 151k vocabulary 17 + 24.
PAD = 8


def _bits_at_py(data, bit, w):
    """``bits_at`` for interpreted kernels: one 8-byte read instead of a loop over numpy scalars."""
    bit, w = int(bit), int(w)  # numpy ints overflow in the shifts below
    byte = bit >> 3
    return (int.from_bytes(data[byte : byte + 8], "little") >> (bit & 7)) & ((1 << w) - 1)


def _bits_get_py(data, i, w):
    return _bits_at_py(data, int(i) * int(w), w)


@njit(inline="always", py=_bits_at_py)
def bits_at(data, bit, w):
    """The ``w``-bit value (``w <= 56``) that starts at bit ``bit`` of a packed byte array."""
    byte = bit >> 3
    shift = bit & 7
    v = np.int64(0)
    for b in range((shift + w + 7) >> 3):
        v |= np.int64(data[byte + b]) << (8 * b)
    return (v >> shift) & ((np.int64(1) << w) - 1)


@njit(inline="always", py=_bits_get_py)
def bits_get(data, i, w):
    """Value ``i`` of a ``w``-bit packed array (``w <= 56``)."""
    return bits_at(data, np.int64(i) * w, w)


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


def _unpack_py(data, w, start, stop, chunk=1 << 20):
    """``_unpack`` for interpreted kernels: vectorised 8-byte reads, a chunk at a time."""
    out = np.empty(max(stop - start, 0), np.int64)
    data = np.asarray(data, np.uint8)
    for lo in range(start, stop, chunk):
        hi = min(lo + chunk, stop)
        bit = np.arange(lo, hi, dtype=np.int64) * w
        window = data[(bit >> 3)[:, None] + np.arange(8)].astype(np.uint64)
        word = (window << (np.arange(8, dtype=np.uint64) * np.uint64(8))).sum(axis=1, dtype=np.uint64)
        out[lo - start : hi - start] = ((word >> (bit & 7).astype(np.uint64)) & np.uint64((1 << w) - 1)).astype(np.int64)
    return out


@njit(py=_unpack_py)
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


def block_crcs(data: np.ndarray, block_bytes: int) -> np.ndarray:
    """``uint32 [ceil(len / block_bytes)]``: the crc32 of each block of a byte array."""
    view = memoryview(np.ascontiguousarray(data, np.uint8)).cast("B")
    return np.fromiter((zlib.crc32(view[lo : lo + block_bytes]) for lo in range(0, len(view), block_bytes)),
                       np.uint32, -(-len(view) // block_bytes))


# --------------------------------------------------------------------------- reads
# A query reads a shard one of two ways (``SuffixConfig.reads``), chosen by ``io`` (see
# ``IO_FIELDS``): the descriptors of tokens.bin and sa.bin (-1: mapped), a count of short
# reads (a file that shrank since it was opened; the query then refuses the shard), and the
# window of suffix-array rows in ``buf``.
# - mapped: straight from the memory-mapped arrays. Fastest while the pages stay mapped, but
#   every page a query touches joins the process's resident set, a page-cache folio at a
#   time (~200 KB per fault on ext4 with large folios), so a large index must drop them
#   (``release_every``) and fault them in again: ~6 us a fault, ~470 faults a query over 8
#   shards of 125M tokens.
# - pread: ``pread`` copies the few bytes a probe needs out of the page cache (~1 us); nothing
#   is mapped, so resident memory stays flat without releasing anything.
HAVE_PREAD = hasattr(os, "pread") and os.name == "posix"


def _pread_py(fd, buf, at, nbytes, offset):
    """``_pread`` for interpreted kernels."""
    return os.preadv(int(fd), [memoryview(buf)[int(at) : int(at) + int(nbytes)]], int(offset))


if jit.ENABLED and HAVE_PREAD:
    from numba import types as _types

    _LIBC_PREAD = _types.ExternalFunction("pread", _types.intp(_types.intc, _types.voidptr, _types.uintp, _types.intp))

    @njit(inline="always", py=_pread_py)
    def _pread(fd, buf, at, nbytes, offset):
        """libc's ``pread``: ``nbytes`` of the file at ``offset`` into ``buf[at:]``; bytes read, or -1."""
        return _LIBC_PREAD(fd, buf.ctypes.data + at, nbytes, offset)
else:

    @njit(inline="always", py=_pread_py)
    def _pread(fd, buf, at, nbytes, offset):
        return -1  # never called: without pread every shard is mapped


WINDOW_BYTES = 1 << 15
"""``buf[:WINDOW_BYTES]`` holds a run of suffix-array rows read at once: a search reads the
rows left below its cached levels in one call (~1,900 rows of a 125M-token shard after 16
levels), then takes every row it probes from there; ``buf[WINDOW_BYTES:]`` is the scratch
of single reads."""
IO_FIELDS = 6
"""``io`` per shard: tokens.bin's descriptor, sa.bin's (-1: mapped), short reads, then the
window's first row, its row count (0: none) and the byte of sa.bin it starts at."""


def new_io(fds: Sequence[tuple[int, int]]) -> np.ndarray:
    """``int64 [shards, IO_FIELDS]`` for shards with these descriptors, no window loaded."""
    io = np.zeros((len(fds), IO_FIELDS), np.int64)
    io[:, :2] = np.asarray(fds, np.int64).reshape(-1, 2)
    return io


def _mapped_reads(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(io, buf, win)`` for kernels that read mapped arrays, ``width`` tokens at a time."""
    return new_io([(-1, -1)])[0], np.zeros(8, np.uint8), np.zeros(max(int(width), 1), np.int64)


def read_buffers(width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(buf, win)``: the window and scratch for reading up to ``width`` tokens at once (of
    at most 56 bits)."""
    width = max(int(width), 1)
    return np.zeros(WINDOW_BYTES + 7 * width + 16, np.uint8), np.zeros(width, np.int64)


# --------------------------------------------------------------------------- numba kernels
# Lazy block checks: each shard keeps a ``state`` per block of tokens.bin and sa.bin
# (VERIFIED, or the stamp of the query that last noted it). A kernel that reads bytes of a
# block not verified yet appends ``2 * block + kind`` (kind 0: tokens, 1: sa) to ``pend``
# (``pend[0]`` counts; -1 once full), and the query checks those blocks before it uses its
# answer. Invariant that keeps every read inside the arrays whatever the bytes say: a read of
# token ``j`` happens only for ``j < n`` and of row ``r`` only for ``r < n``.
VERIFIED = 1


@njit(inline="always")
def _touch(state, first_byte, last_byte, shift, pend, stamp, kind):
    """Note the blocks holding bytes ``first_byte..last_byte`` that are not verified yet."""
    for b in range(first_byte >> shift, (last_byte >> shift) + 1):
        s = state[b]
        if s != VERIFIED and s != stamp:
            state[b] = stamp
            c = pend[0]
            if c >= 0:
                if c + 1 < pend.shape[0]:
                    pend[c + 1] = 2 * b + kind
                    pend[0] = c + 1
                else:
                    pend[0] = -1  # full: the query checks every unverified block


@njit(inline="always")
def _row(sa, sw, io, buf, row, ss, shift, pend, stamp):
    """Suffix-array entry ``row`` (noting its block): from the map, or read from ``sa.bin``."""
    bit = np.int64(row) * sw
    _touch(ss, bit >> 3, (bit + sw - 1) >> 3, shift, pend, stamp, 1)
    if io[1] < 0:
        return bits_get(sa, row, sw)
    if io[3] <= row < io[3] + io[4]:  # in the window
        return bits_at(buf, bit - 8 * io[5], sw)
    if _pread(io[1], buf, WINDOW_BYTES, 8, bit >> 3) != 8:  # 8 bytes hold any entry; the file's padding holds the last's
        io[2] += 1
        return 0
    return bits_at(buf, 8 * WINDOW_BYTES + (bit & 7), sw)


@njit(inline="always")
def _window(sw, io, buf, lo, hi):
    """Read rows ``[lo, hi)`` of sa.bin into the window in one call, where they fit and are not
    there already (mapped shards: nothing to do)."""
    if io[1] < 0 or hi <= lo or (io[3] <= lo and hi <= io[3] + io[4]):
        return
    first = (np.int64(lo) * sw) >> 3
    nbytes = ((np.int64(hi - 1) * sw) >> 3) - first + 8
    if nbytes > WINDOW_BYTES:
        return
    if _pread(io[1], buf, 0, nbytes, first) != nbytes:
        io[2] += 1
        io[4] = 0
        return
    io[3], io[4], io[5] = lo, hi - lo, first


@njit(inline="always")
def _load(tok, tw, n, io, buf, win, start, count):
    """``win[:k]`` = tokens ``start .. start + k - 1`` with ``k = min(count, n - start)``
    (``win`` holds ``count``: the search's pattern, the top levels' width, the draft depth),
    from the map or in one read of ``tokens.bin``; returns ``k``."""
    k = min(count, n - start, win.shape[0])  # callers size win; the bound keeps a mistake inside it
    if k <= 0:
        return 0
    if io[0] < 0:
        for j in range(k):
            win[j] = bits_get(tok, start + j, tw)
        return k
    bit = np.int64(start) * tw
    byte = bit >> 3
    nbytes = ((bit + (k - 1) * tw) >> 3) - byte + 8  # the last token's 8-byte window ends in the file
    if _pread(io[0], buf, WINDOW_BYTES, nbytes, byte) != nbytes:
        io[2] += 1
        return 0
    shift = 8 * WINDOW_BYTES + (bit & 7)
    for j in range(k):
        win[j] = bits_at(buf, shift + j * tw, tw)
    return k


@njit(inline="always")
def _note_tokens(tok, tw, n, start, count, ts, shift, pend, stamp):
    """Note the blocks of tokens ``start .. start + count - 1`` (those before ``n``)."""
    k = min(count, n - start)
    if k > 0:
        _touch(ts, (start * tw) >> 3, ((start + k) * tw - 1) >> 3, shift, pend, stamp, 0)


@njit()
def _compare(tok, tw, n, io, buf, win, start, pattern, m, ts, shift, pend, stamp):
    """Order of the suffix at ``start`` against ``pattern[:m]``: -1 below, 0 prefix match, 1 above."""
    _note_tokens(tok, tw, n, start, m, ts, shift, pend, stamp)
    if io[0] < 0:  # mapped: read only up to the first difference
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
    return _order(win, _load(tok, tw, n, io, buf, win, start, m), pattern, m)


@njit(inline="always")
def _order(values, k, pattern, m):
    """``_compare``'s order for a suffix whose first ``k`` tokens are ``values[:k]`` (``k < m``:
    the suffix ends there)."""
    for j in range(m):
        if j >= k:
            return -1  # the suffix ended first: it sorts below
        a = values[j]
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
    def empty(cls, levels: int, width: int) -> TopLevels:
        size = 1 << levels if levels > 0 else 1
        return cls(np.zeros((size, width), np.int32), np.zeros(size, np.int16), np.zeros(size, np.uint8))


class BlockChecks(NamedTuple):
    """One query's view of a shard's block states (see the kernels' comment)."""

    tokens: np.ndarray  # uint32 [blocks of tokens.bin]
    sa: np.ndarray  # uint32 [blocks of sa.bin]
    shift: int  # log2(block_bytes)
    pend: np.ndarray  # int64 [1 + capacity]
    stamp: int

    @classmethod
    def none(cls) -> BlockChecks:
        """Nothing to check (every byte falls in block 0, marked verified)."""
        one = np.full(1, VERIFIED, np.uint32)
        return cls(one, one, 62, np.zeros(2, np.int64), 2)


@njit()
def _compare_top(tok, tw, sa, sw, n, io, buf, win, pattern, m, mid, h, top_tok, top_len, top_ok, ts, ss, shift, pend, stamp):
    """``_compare`` of row ``mid`` (heap node ``h``), served from the top levels when cached."""
    if h >= top_ok.shape[0] or m > top_tok.shape[1]:
        return _compare(tok, tw, n, io, buf, win, _row(sa, sw, io, buf, mid, ss, shift, pend, stamp), pattern, m, ts, shift, pend, stamp)
    if top_ok[h] == 0:
        start = _row(sa, sw, io, buf, mid, ss, shift, pend, stamp)
        _note_tokens(tok, tw, n, start, top_tok.shape[1], ts, shift, pend, stamp)
        k = _load(tok, tw, n, io, buf, win, start, top_tok.shape[1])
        for j in range(k):
            top_tok[h, j] = win[j]
        top_len[h] = k
        top_ok[h] = 1
    return _order(top_tok[h], top_len[h], pattern, m)


@njit()
def _lower_bound(tok, tw, sa, sw, n, io, buf, win, pattern, m, top_tok, top_len, top_ok, ts, ss, shift, pend, stamp):
    """``(first, upper, found)``: the first row not below ``pattern[:m]``, the lowest row seen
    strictly above it (it bounds the upper search), and whether any row starts with it (a
    row compared equal: the rows that match are contiguous, so ``first`` is one of them)."""
    lo, hi, h = 0, n, 1
    upper = n
    found = False
    while lo < hi:
        if h >= top_ok.shape[0] or m > top_tok.shape[1]:  # below the cached levels: the rows left in one read
            _window(sw, io, buf, lo, hi)
        mid = (lo + hi) // 2
        order = _compare_top(tok, tw, sa, sw, n, io, buf, win, pattern, m, mid, h, top_tok, top_len, top_ok, ts, ss, shift, pend, stamp)
        if order < 0:
            lo = mid + 1
            h = 2 * h + 1
        else:
            hi = mid
            h = 2 * h
            if order > 0:
                upper = mid
            else:
                found = True
    return lo, upper, found


@njit()
def _upper_bound(tok, tw, sa, sw, n, io, buf, win, pattern, m, first, upper, top_tok, top_len, top_ok, ts, ss, shift, pend, stamp):
    """The first row above ``pattern[:m]``, given ``_lower_bound``'s ``first`` and ``upper``:
    the same walk down the heap from the root, so that its first levels are served from the
    top levels too; rows outside ``[first, upper)`` are known without a comparison (below:
    to the right, above: to the left)."""
    lo, hi, h = 0, n, 1
    while lo < hi:
        if (h >= top_ok.shape[0] or m > top_tok.shape[1]) and first < hi and lo < upper:  # rows it will compare
            _window(sw, io, buf, max(lo, first), min(hi, upper))
        mid = (lo + hi) // 2
        if mid < first:
            order = -1
        elif mid >= upper:
            order = 1
        else:
            order = _compare_top(tok, tw, sa, sw, n, io, buf, win, pattern, m, mid, h, top_tok, top_len, top_ok, ts, ss, shift, pend, stamp)
        if order <= 0:
            lo = mid + 1
            h = 2 * h + 1
        else:
            hi = mid
            h = 2 * h
    return lo


@njit()
def _sa_range(tok, tw, sa, sw, n, io, buf, win, pattern, m, top_tok, top_len, top_ok, ts, ss, shift, pend, stamp):
    first, upper, found = _lower_bound(tok, tw, sa, sw, n, io, buf, win, pattern, m, top_tok, top_len, top_ok, ts, ss, shift, pend, stamp)
    if not found:
        return first, first
    return first, _upper_bound(tok, tw, sa, sw, n, io, buf, win, pattern, m, first, upper, top_tok, top_len, top_ok, ts, ss, shift,
                               pend, stamp)


_NO_TOP = TopLevels.empty(0, 1)


def sa_range(tok, tw, sa, sw, n, pattern, m, top: TopLevels = _NO_TOP, checks: BlockChecks | None = None) -> tuple[int, int]:
    """``[lo, hi)``: the suffix-array rows whose suffix starts with ``pattern[:m]``.

    Invariant: ``sa`` sorts the ``n`` suffixes of ``tok``, so those rows are contiguous.
    ``top`` caches the rows every search probes first (see :class:`TopLevels`); ``checks``
    collects the blocks read that are not verified yet.
    """
    c = checks or BlockChecks.none()
    io, buf, win = _mapped_reads(max(m, top.tokens.shape[1]))
    return _sa_range(tok, tw, sa, sw, n, io, buf, win, np.asarray(pattern, np.int64), m, top.tokens, top.length, top.filled,
                     c.tokens, c.sa, c.shift, c.pend, c.stamp)


@njit()
def _longest_from(tok, tw, sa, sw, n, io, buf, win, context, max_m, floor, gallop, top_tok, top_len, top_ok, ts, ss, shift, pend,
                  stamp):
    """``(m, lo, hi)``: the longest ``m <= max_m`` such that ``context[-m:]`` occurs, with its
    row range, among matches of at least ``floor >= 1`` tokens (``(0, 0, 0)``: none). Lengths
    are searched on the lower bound alone (whether a length occurs); only the longest pays
    for its upper bound, so a query reads half the rows. With ``gallop``, lengths just above
    the floor are tried first (``floor + 1``, ``+ 3``, ``+ 7`` ...), then binary searched:
    for a floor another shard reached, where a longer match is rare, that is one search in
    the common case instead of ``log2(max_m - floor)``."""
    c = context.shape[0]
    limit = 0
    while limit < min(max_m, c) and context[c - 1 - limit] >= 0:
        limit += 1
    if floor > limit:
        return 0, 0, 0
    first, upper, found = _lower_bound(tok, tw, sa, sw, n, io, buf, win, context[c - floor :], floor, top_tok, top_len, top_ok, ts, ss,
                                       shift, pend, stamp)
    if not found:
        return 0, 0, 0
    lo_m, hi_m = floor, limit
    step = 1 if gallop else 0  # galloping until the first length that does not occur
    while lo_m < hi_m:  # occurrence is monotone in m: the longest lies in [lo_m, hi_m]
        mid = min(lo_m + step, hi_m) if step else (lo_m + hi_m + 1) // 2
        f, u, ok = _lower_bound(tok, tw, sa, sw, n, io, buf, win, context[c - mid :], mid, top_tok, top_len, top_ok, ts, ss, shift,
                                pend, stamp)
        if ok:
            lo_m, first, upper = mid, f, u
            step *= 2
        else:
            hi_m = mid - 1
            step = 0
    last = _upper_bound(tok, tw, sa, sw, n, io, buf, win, context[c - lo_m :], lo_m, first, upper, top_tok, top_len, top_ok, ts, ss, shift,
                        pend, stamp)
    return lo_m, first, last


def longest_suffix(tok, tw, sa, sw, n, context, max_m, top: TopLevels = _NO_TOP, checks: BlockChecks | None = None) -> tuple[int, int, int]:
    """Largest ``m <= max_m`` such that ``context[-m:]`` occurs, with its row range.

    ``context`` holds local token ids, ``-1`` for tokens the shard never saw. Returns
    ``(0, 0, 0)`` when not even the last token occurs.
    """
    c = checks or BlockChecks.none()
    io, buf, win = _mapped_reads(max(max_m, top.tokens.shape[1]))
    return _longest_from(tok, tw, sa, sw, n, io, buf, win, np.asarray(context, np.int64), max_m, 1, False, top.tokens, top.length,
                         top.filled, c.tokens, c.sa, c.shift, c.pend, c.stamp)


@njit()
def _gather(tok, tw, sa, sw, n, io, buf, win, lo, hi, m, take, depth, sep, out, row0, ts, ss, shift, pend, stamp):
    count = hi - lo
    if take > count:
        take = count
    _window(sw, io, buf, lo, hi)  # where the range fits, every row it samples in one read
    for i in range(take):
        row = lo + (i * count) // take
        pos = _row(sa, sw, io, buf, row, ss, shift, pend, stamp) + m
        _note_tokens(tok, tw, n, pos, depth, ts, shift, pend, stamp)
        for d in range(_load(tok, tw, n, io, buf, win, pos, depth)):
            t = win[d]
            if t >= sep:  # a separator (or, in a damaged shard, no token at all)
                break
            out[row0 + i, d] = t
    return take


def gather(tok, tw, sa, sw, n, lo, hi, m, take, depth, sep, out, row0, checks: BlockChecks | None = None) -> int:
    """Write the continuations of ``take`` occurrences, evenly spaced over rows ``[lo, hi)``,
    into ``out[row0 : row0 + take]`` (``-1`` padded, cut at ``sep``); return rows written."""
    c = checks or BlockChecks.none()
    io, buf, win = _mapped_reads(depth)
    return _gather(tok, tw, sa, sw, n, io, buf, win, lo, hi, m, take, depth, sep, out, row0, c.tokens, c.sa, c.shift, c.pend, c.stamp)


@njit()
def _fan_out(toks, sas, ios, buf, win, vocabs, top_toks, top_lens, top_oks, tstates, sstates, params, tail, max_m, min_m, max_matches,
             depth, out, pend, stamp):
    """One query over every shard in one compiled call; returns ``(rows written, match length)``.

    1. per shard: the context's tail in the shard's own ids (``-1``: a token it never saw),
       then the longest suffix that occurs there and its row range, among those at least as
       long as the longest found so far (a shorter match adds nothing: its continuations
       follow less context), so most shards cost one search, not a binary search over lengths;
    2. the longest of those; none at least ``min_m`` long: no rows;
    3. ``max_matches`` occurrences shared out over the shards that match in proportion to
       their counts (at least one each), gathered into ``out`` and mapped back to global ids.

    ``params[i]`` is ``(n, token_bits, sa_bits, sep, block_shift)`` of shard ``i``, ``ios[i]``
    how it is read (see *reads* above; ``buf`` and ``win`` are the reads' scratch); ``pend[i]``
    collects the blocks it read that are not verified yet. Invariant: every read of shard
    ``i`` stays inside its arrays (see the kernels above), whatever the bytes say.
    """
    k = params.shape[0]
    found = np.zeros((k, 3), np.int64)  # m, lo, hi
    local = np.empty(tail.shape[0], np.int64)
    best = 0
    for i in range(k):
        n, tw, sw, shift = params[i, 0], params[i, 1], params[i, 2], params[i, 4]
        vocab = vocabs[i]
        for j in range(tail.shape[0]):  # global -> local ids (vocab is sorted)
            p = np.searchsorted(vocab, tail[j])
            local[j] = p if p < vocab.shape[0] and vocab[p] == tail[j] else -1
        ios[i, 4] = 0  # buf's window belongs to one shard at a time
        m, lo, hi = _longest_from(toks[i], tw, sas[i], sw, n, ios[i], buf, win, local, max_m, max(min_m, best), best > 0,
                                  top_toks[i], top_lens[i], top_oks[i], tstates[i], sstates[i], shift, pend[i], stamp)
        found[i, 0], found[i, 1], found[i, 2] = m, lo, hi
        best = max(best, m)
    if best < min_m:
        return 0, best
    total = 0
    for i in range(k):
        if found[i, 0] == best:
            total += found[i, 2] - found[i, 1]
    if total <= 0:  # only where reads failed (a file cut short): the query refuses the shard
        return 0, best
    used = 0
    for i in range(k):
        if found[i, 0] != best:
            continue
        lo, hi = found[i, 1], found[i, 2]
        take = max(1, (max_matches * (hi - lo)) // total)
        start = used
        ios[i, 4] = 0
        used += _gather(toks[i], params[i, 1], sas[i], params[i, 2], params[i, 0], ios[i], buf, win, lo, hi, best, take, depth,
                        params[i, 3], out, used, tstates[i], sstates[i], params[i, 4], pend[i], stamp)
        vocab = vocabs[i]
        for r in range(start, used):  # back to global ids (gather keeps local ids < sep)
            for d in range(depth):
                t = out[r, d]
                if t >= 0:
                    out[r, d] = vocab[t]
    return used, best


class FanOut(NamedTuple):
    """Every shard's arrays side by side, as the one kernel that queries them all takes them
    (numba typed lists once compiled, plain lists when interpreted)."""

    tokens: Sequence
    sa: Sequence
    vocab: Sequence
    top_tokens: Sequence
    top_length: Sequence
    top_filled: Sequence
    tokens_state: Sequence
    sa_state: Sequence
    params: np.ndarray  # int64 [shards, 5]: n, token_bits, sa_bits, sep, block_shift
    io: np.ndarray  # int64 [shards, IO_FIELDS] (see *reads*)

    @classmethod
    def of(cls, shards: list[Shard]) -> FanOut:
        from retrospec import jit

        def listed(values):
            if not jit.ENABLED:
                return list(values)
            from numba.typed import List

            out = List()
            for v in values:
                out.append(v)
            return out

        def readonly(a):  # one array type per list: mapped files are read-only, so are the rest
            v = a.view()
            v.flags.writeable = False
            return v

        params = np.array([[s.n, s.token_bits, s.sa_bits, s.sep, s.block_shift] for s in shards], np.int64).reshape(-1, 5)
        return cls(listed(readonly(s.tokens) for s in shards), listed(readonly(s.sa) for s in shards),
                   listed(np.ascontiguousarray(s.vocab, np.int64) for s in shards), listed(s.top.tokens for s in shards),
                   listed(s.top.length for s in shards), listed(s.top.filled for s in shards),
                   listed(s.tokens_state for s in shards), listed(s.sa_state for s in shards), params,
                   new_io([s.fds for s in shards]))


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
    path: Path  # the shard's folder, for messages
    block_shift: int  # log2 of the checksum block size
    tokens_crc: np.ndarray  # uint32: crc32 per block of ``tokens``
    sa_crc: np.ndarray  # uint32: crc32 per block of ``sa``
    tokens_state: np.ndarray  # uint32 per block: VERIFIED, or the stamp of a query that read it
    sa_state: np.ndarray
    bad: str | None = None  # why the shard is off (a block failed its checksum)
    fds: tuple[int, int] = (-1, -1)  # descriptors of tokens.bin and sa.bin when queries pread them

    def local(self, ids: np.ndarray) -> np.ndarray:
        """Global ids -> local ids, ``-1`` where the shard never saw the token."""
        pos = np.searchsorted(self.vocab, ids)
        pos = np.minimum(pos, self.vocab.shape[0] - 1)
        return np.where(self.vocab[pos] == ids, pos, -1).astype(np.int64)

    def token_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return unpack_bits(self.tokens, self.token_bits, start, self.n if stop is None else stop)

    def sa_entry(self, row: int) -> int:
        return int(bits_get(self.sa, row, self.sa_bits))

    def checks(self, pend: np.ndarray, stamp: int) -> BlockChecks:
        return BlockChecks(self.tokens_state, self.sa_state, self.block_shift, pend, stamp)

    def verify_blocks(self, pend: np.ndarray) -> None:
        """Check the blocks a kernel noted in ``pend`` (then empty it); raise on a bad one."""
        count = int(pend[0])
        if count < 0:
            codes = np.concatenate([2 * np.flatnonzero(self.tokens_state != VERIFIED),
                                    2 * np.flatnonzero(self.sa_state != VERIFIED) + 1])
        else:
            codes = np.unique(pend[1 : count + 1])
        size = 1 << self.block_shift
        for code in codes.tolist():
            kind, block = code & 1, code >> 1
            state, data, crcs, file = ((self.tokens_state, self.tokens, self.tokens_crc, "tokens.bin") if kind == 0
                                       else (self.sa_state, self.sa, self.sa_crc, "sa.bin"))
            if state[block] == VERIFIED:
                continue
            lo = block * size
            fd = self.fds[kind]
            raw = os.pread(fd, size, lo) if fd >= 0 else data[lo : lo + size]  # pread: nothing gets mapped
            if zlib.crc32(raw) != int(crcs[block]):
                self.bad = (f"{self.path / file}: block {block} (bytes {lo:,} to {lo + size:,}) does not match its checksum "
                            f"(corrupted); run `retrospec index verify` or rebuild the index")
                raise IndexFormatError(self.bad)
            state[block] = VERIFIED
        pend[0] = 0


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
PENDING = 1024
"""Blocks one kernel call may note before the query checks every unverified block instead."""


def read_index_manifest(root: str | Path) -> Manifest:
    """Read and validate the manifest of a suffix index (see :func:`validate_manifest`)."""
    manifest = read_manifest(root, FORMAT, FORMAT_VERSION)
    validate_manifest(manifest)
    return manifest


def validate_manifest(manifest: Manifest) -> None:
    """Every field of a suffix-index manifest against its schema: types, ranges, exactly the
    expected files per shard, sizes that follow from the counts and bit widths, no shard
    listed twice, totals equal to the sums over the shards."""
    f = manifest.fields()
    vocab_size = tokenizer_fields(f)["vocab_size"]
    total_tokens = f.integer("tokens", 1, MAX_SHARDS * MAX_SHARD_POSITIONS)
    total_docs = f.integer("documents", 1, total_tokens)
    if "build" in f.data:
        f.obj("build")
    if "created" in f.data:
        f.text("created", max_len=64)
    files = f.obj("files")
    if set(files.data) != {DOCS_DB}:
        f.fail("files", f"must list exactly {[DOCS_DB]}", sorted(files.data))
    file_entry(files, DOCS_DB)
    names: set[str] = set()
    tokens = documents = 0
    for i in range(len(f.items("shards", 1, MAX_SHARDS))):
        s = f.item("shards", i)
        name = s.text("name", NAME)
        if name in names:
            s.fail("name", "repeats another shard's name (a shard listed twice)", name)
        names.add(name)
        n_tok = s.integer("tokens", 1, MAX_SHARD_POSITIONS)
        n_doc = s.integer("documents", 1, n_tok)
        n = s.integer("positions", n_tok + n_doc, n_tok + n_doc)
        sep = s.integer("sep", 1, vocab_size)
        tw = s.integer("token_bits", bits_for(sep), bits_for(sep))
        sw = s.integer("sa_bits", bits_for(max(n - 1, 1)), bits_for(max(n - 1, 1)))
        block = s.integer("block_bytes", MIN_BLOCK_BYTES, MAX_BLOCK_BYTES)
        if block & (block - 1):
            s.fail("block_bytes", "must be a power of two", block)
        shard_files = s.obj("files")
        expected = {f"{name}/{x}" for x in SHARD_FILES}
        if set(shard_files.data) != expected:
            s.fail("files", f"must list exactly {sorted(expected)}", sorted(shard_files.data))
        tok_bytes, sa_bytes = (n * tw + 7) // 8 + PAD, (n * sw + 7) // 8 + PAD
        array_entry(shard_files, f"{name}/tokens.bin", "|u1", (tok_bytes,))
        array_entry(shard_files, f"{name}/sa.bin", "|u1", (sa_bytes,))
        array_entry(shard_files, f"{name}/vocab.bin", "<u4", (sep,))
        array_entry(shard_files, f"{name}/tokens.crc", "<u4", (-(-tok_bytes // block),))
        array_entry(shard_files, f"{name}/sa.crc", "<u4", (-(-sa_bytes // block),))
        tokens += n_tok
        documents += n_doc
    if tokens != total_tokens:
        f.fail("tokens", f"must be the shards' total {tokens}", total_tokens)
    if documents != total_docs:
        f.fail("documents", f"must be the shards' total {documents}", total_docs)


def _as_context(context) -> np.ndarray:
    """A query's context as ``int64 [L]``, or a ``TypeError``/``ValueError`` saying what it takes."""
    if type(context) is np.ndarray and context.dtype == np.int64 and context.ndim == 1:
        return context  # what the speculator passes: nothing to check
    if isinstance(context, (list, tuple, range)):
        try:
            context = np.asarray(context)
        except (ValueError, OverflowError) as err:
            raise ValueError(f"context must be a 1-D sequence of token ids; {err}") from None
    if not isinstance(context, np.ndarray):
        raise TypeError(f"context must be a 1-D numpy array or list of token ids, got {type(context).__name__}")
    if context.ndim != 1:
        raise ValueError(f"context must be 1-D token ids, got an array of shape {context.shape}; pass one sequence")
    if context.shape[0] == 0:
        return np.zeros(0, np.int64)
    if context.dtype == np.bool_ or not np.issubdtype(context.dtype, np.integer):
        raise TypeError(f"context must hold integer token ids, got dtype {context.dtype}")
    return context.astype(np.int64, copy=False)


def _count(value, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


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
        self._stamps = itertools.count()
        self._bytes = _index_bytes(manifest)
        self._fan = FanOut.of(shards)
        self._top_width = max((s.top.tokens.shape[1] for s in shards), default=1)
        self._scratch = read_buffers(max(config.max_ngram, config.max_depth, self._top_width))
        self._statm: int | None = None  # /proc/self/statm, opened on the first release_mapped_mb check
        self._mapped_after_release: int | None = None  # statm's count after the last release (once checked)

    @classmethod
    def open(cls, root: str | Path, tokenizer=None, config: SuffixConfig | None = None) -> SuffixIndex:
        """Open an index directory in O(1) (plus its small files): the manifest is validated,
        sizes and edge checksums checked, ``vocab.bin`` and the block checksums read whole,
        the arrays memory-mapped. With ``tokenizer``, refuse an index built with another, or
        holding ids it does not have."""
        manifest = read_index_manifest(root)
        root = manifest.root
        config = config or SuffixConfig()
        bound = manifest.data["tokenizer"]["vocab_size"]
        if tokenizer is not None:
            bound = min(bound, check_tokenizer(manifest, tokenizer)["vocab_size"])
        big = _index_bytes(manifest.data) > config.release_above_mb * 2**20
        pread = config.reads == "pread" or (config.reads == "auto" and HAVE_PREAD and big)
        shards, maps = [], []
        try:
            for entry in manifest.data["shards"]:
                shard, mapped = _open_shard(root, entry, bound, config, pread)
                shards.append(shard)
                maps.extend(mapped)
        except BaseException:
            _close_shards(shards)
            raise
        index = cls(root, manifest.data, shards, config)
        index._maps = maps
        return index

    @classmethod
    def from_stores(cls, model=None, tokenizer=None, store: str | None = None) -> SuffixIndex:
        """The registry's constructor: the index directory ``store``, checked against ``tokenizer``."""
        return cls.open(store, tokenizer=tokenizer)

    def close(self) -> None:
        """Close the files queries read with ``pread`` (the maps close with the arrays)."""
        _close_shards(self.shards)
        self._fan.io[:, :2] = -1

    @property
    def reads(self) -> str:
        """``"pread"`` while every shard is read with descriptors, else ``"mapped"``."""
        return "pread" if self.shards and all(min(s.fds) >= 0 for s in self.shards) else "mapped"

    def release_pages(self) -> None:
        """Drop the mapped pages this process has touched (see ``MappedArray``)."""
        for m in self._maps:
            m.release()
        if self._mapped_after_release is not None:
            self._mapped_after_release = self._mapped_pages()

    def _mapped_pages(self) -> int:
        """Resident file-backed (and shared) pages of this process (field 3 of ``statm``)."""
        try:
            if self._statm is None:
                self._statm = os.open("/proc/self/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return int(os.pread(self._statm, 128, 0).split()[2])
        except (OSError, IndexError, ValueError):  # no /proc: the query count alone decides
            return 0

    def _should_release(self) -> bool:
        cfg = self.config
        if self.reads == "pread" or self._bytes <= cfg.release_above_mb * 2**20:  # pread maps nothing
            return False
        if cfg.release_every and self._queries % cfg.release_every == 0:
            return True
        if cfg.release_mapped_mb:
            now = self._mapped_pages()
            if self._mapped_after_release is None:
                self._mapped_after_release = now
            return (now - self._mapped_after_release) * PAGE_BYTES > cfg.release_mapped_mb * 2**20
        return False

    def __del__(self) -> None:
        if getattr(self, "_statm", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._statm)
        _close_shards(getattr(self, "shards", []))

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def n_documents(self) -> int:
        return int(self.manifest["documents"])

    def query(self, context: np.ndarray | Sequence[int], max_nodes: int = 64, max_depth: int | None = None) -> DraftTree:
        """The draft tree for the tokens after ``context`` (``int64 [L]`` global token ids, or a
        list of ints): at most ``max_nodes`` nodes, ``max_depth`` deep (default the config's).

        Raises :class:`IndexFormatError` when a block the query read fails its checksum.
        """
        context = _as_context(context)
        max_nodes = _count(max_nodes, "max_nodes")
        max_depth = _count(max_depth, "max_depth", allow_none=True)
        self._queries += 1
        try:
            return self._query(context, max_nodes, max_depth)
        finally:  # after the query, so the pages it touched do not stay mapped until the next one
            if self._should_release():
                self.release_pages()

    def _query(self, context: np.ndarray, max_nodes: int, max_depth: int | None) -> DraftTree:
        cfg = self.config
        depth = min(cfg.max_depth, max_depth if max_depth is not None else cfg.max_depth)
        if depth <= 0 or max_nodes <= 0 or context.shape[0] == 0:
            return DraftTree.empty()
        for shard in self.shards:
            if shard.bad:
                raise IndexFormatError(shard.bad)
        tail = np.asarray(context[-cfg.max_ngram :], np.int64)
        fan = self._fan
        pend = np.empty((len(self.shards), PENDING + 1), np.int64)  # one list of noted blocks per shard
        pend[:, 0] = 0
        stamp = 2 + next(self._stamps) % ((1 << 32) - 2)  # never VERIFIED, never 0
        rows = np.full((cfg.max_matches + len(self.shards), depth), -1, np.int64)
        width = max(cfg.max_ngram, depth, self._top_width)
        with self._lock:  # the kernel fills the shards' top levels (and uses the one scratch)
            if self._scratch[1].shape[0] < width:
                self._scratch = read_buffers(width)
            buf, win = self._scratch
            used, best = _fan_out(fan.tokens, fan.sa, fan.io, buf, win, fan.vocab, fan.top_tokens, fan.top_length,
                                  fan.top_filled, fan.tokens_state, fan.sa_state, fan.params, tail, cfg.max_ngram,
                                  cfg.min_ngram, cfg.max_matches, depth, rows, pend, stamp)
            short = np.flatnonzero(fan.io[:, 2]).tolist()
            fan.io[:, 2] = 0
        for i in short:
            self.shards[i].bad = (f"{self.shards[i].path}: tokens.bin or sa.bin is shorter than when the index was opened "
                                  f"(changed on disk); reopen or rebuild the index")
            raise IndexFormatError(self.shards[i].bad)
        for i in np.flatnonzero(pend[:, 0]).tolist():  # blocks read for the first time (rare once a process is warm)
            self.shards[i].verify_blocks(pend[i])  # checked before the answer is used
        if used == 0:
            return DraftTree.empty()
        # counts as scores, +1 smoothing: one occurrence is weaker evidence than fifty
        return continuation_trie(rows[:used], None, root_conf=best / (best + 1.0), decay=0.95, smoothing=1.0, max_nodes=max_nodes)

    def start_request(self, prompt: np.ndarray, documents: Sequence[str] = ()) -> SuffixIndexSession:
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


def _open_shard(root: Path, entry: dict, id_bound: int, config: SuffixConfig, pread: bool = False) -> tuple[Shard, list]:
    """Map one validated shard entry (with ``pread``, also open its arrays' files for queries
    to read); read and check its small files."""
    files, name = entry["files"], entry["name"]
    check_files(root, files)
    vocab = read_small_array(root, f"{name}/vocab.bin", files[f"{name}/vocab.bin"])
    if vocab.shape[0] > 1 and not bool(np.all(vocab[1:] > vocab[:-1])):
        raise IndexFormatError(f"{root / name / 'vocab.bin'}: token ids are not strictly increasing (corrupted)")
    if int(vocab[-1]) >= id_bound:
        raise IndexFormatError(f"{root / name / 'vocab.bin'}: holds token id {int(vocab[-1])}, beyond the tokenizer's {id_bound} ids")
    crcs = {k: read_small_array(root, f"{name}/{k}", files[f"{name}/{k}"]) for k in ("tokens.crc", "sa.crc")}
    mapped = {k: open_array(root, f"{name}/{k}", files[f"{name}/{k}"]) for k in ("tokens.bin", "sa.bin")}
    arrays = {k: getattr(m, "array", m) for k, m in mapped.items()}
    n = entry["positions"]
    levels = min(config.cached_levels, max(n.bit_length() - 1, 0))
    shard = Shard(name, n, arrays["tokens.bin"], entry["token_bits"], arrays["sa.bin"], entry["sa_bits"], vocab, entry["sep"],
                  TopLevels.empty(levels, config.max_ngram), confined(root, name), entry["block_bytes"].bit_length() - 1,
                  crcs["tokens.crc"], crcs["sa.crc"], np.zeros(crcs["tokens.crc"].shape[0], np.uint32),
                  np.zeros(crcs["sa.crc"].shape[0], np.uint32))
    if pread:
        shard.fds = _open_fds(root, name)
    try:
        _spot_check(shard.path, shard)
    except BaseException:
        _close_shards([shard])
        raise
    maps = [m for m in mapped.values() if hasattr(m, "release")]
    if pread:  # the spot check's pages: a pread index keeps nothing mapped (a fault maps up to a 2 MB folio)
        for m in maps:
            m.release()
    return shard, maps


def _index_bytes(manifest: dict) -> int:
    """Bytes of every shard file a validated manifest lists."""
    return sum(f["bytes"] for shard in manifest["shards"] for f in shard["files"].values())


def _open_fds(root: Path, name: str) -> tuple[int, int]:
    tokens = _open_for_reads(confined(root, f"{name}/tokens.bin"))
    try:
        return tokens, _open_for_reads(confined(root, f"{name}/sa.bin"))
    except BaseException:
        os.close(tokens)
        raise


def _open_for_reads(path: Path) -> int:
    """A read-only descriptor; without access-time updates where the OS lets this process skip
    them (``O_NOATIME``: the file's owner; a pread costs ~15% less)."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if hasattr(os, "O_NOATIME"):
        with contextlib.suppress(PermissionError):
            return os.open(path, flags | os.O_NOATIME)
    return os.open(path, flags)


def _close_shards(shards: Sequence[Shard]) -> None:
    for shard in shards:
        fds, shard.fds = shard.fds, (-1, -1)
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _spot_check(path: Path, shard: Shard, samples: int = 16) -> None:
    """O(1) structural checks: suffix-array entries in range and locally sorted."""
    n = shard.n
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


def check_docs_db(root: Path, manifest: dict) -> int:
    """Full check of an index's ``docs.sqlite``: its sha256, SQLite's own integrity check,
    and one row per document; return the rows."""
    check_files(root, manifest["files"], full=True)
    return sqlite_rows(confined(root, DOCS_DB), "documents", manifest["documents"])


def sqlite_rows(path: Path, table: str, expected: int | None = None) -> int:
    """Rows of ``table`` in the SQLite file ``path`` (opened read-only) after
    ``PRAGMA integrity_check``; ``IndexFormatError`` for anything SQLite cannot read."""
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            verdict = con.execute("PRAGMA integrity_check").fetchone()
            if not verdict or verdict[0] != "ok":
                raise IndexFormatError(f"{path}: SQLite integrity check failed ({verdict and str(verdict[0])[:120]})")
            rows = con.execute(f"SELECT count(*) FROM [{table}]").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error as err:
        raise IndexFormatError(f"{path}: not a readable SQLite database ({err})") from None
    if expected is not None and rows != expected:
        raise IndexFormatError(f"{path}: {rows} rows in table {table}, the manifest says {expected}")
    return rows


def _sa_check_py(tok, tw, sa, sw, n):
    """``_sa_check`` for interpreted kernels: the same test, vectorised a chunk at a time."""
    if n == 0:
        return 0
    pos = _unpack_py(sa, sw, 0, n)
    if (pos.max() >= n or np.count_nonzero(np.bincount(pos, minlength=n)) != n):
        seen = np.zeros(n, np.bool_)
        for row, p in enumerate(pos.tolist()):
            if p >= n or seen[p]:
                return row + 1
            seen[p] = True
    rank = np.full(n + 1, -1, np.int64)
    rank[pos] = np.arange(n)
    ids = _unpack_py(tok, tw, 0, n)
    chunk = 1 << 20
    for lo in range(1, n, chunk):
        hi = min(lo + chunk, n)
        a, b = pos[lo - 1 : hi - 1], pos[lo:hi]
        ta, tb = ids[a], ids[b]
        bad = (ta > tb) | ((ta == tb) & (rank[a + 1] >= rank[b + 1]))
        if bad.any():
            return lo + int(np.argmax(bad)) + 1
    return 0


@njit(py=_sa_check_py)
def _sa_check(tok, tw, sa, sw, n):
    """0 when ``sa`` is the sorted suffix array of ``tok[:n]``, else 1 + the first bad row.

    The linear-time test of Burkhardt and Kärkkäinen (2003): ``sa`` is correct iff it is a
    permutation of ``0..n-1`` and, for every row ``r``, with ``a, b = sa[r-1], sa[r]``:
    ``tok[a] < tok[b]``, or ``tok[a] == tok[b]`` and the suffix after ``a`` ranks below the
    one after ``b`` (``rank[n] = -1``: the empty suffix sorts first). By induction on the
    suffix length every adjacent pair is then in order, with O(1) work per row — no
    character-by-character comparison, so repeated text costs nothing extra.
    """
    rank = np.full(n + 1, -1, np.int32)
    for row in range(n):
        p = bits_get(sa, row, sw)
        if p >= n or rank[p] >= 0:
            return row + 1
        rank[p] = row
    for row in range(1, n):
        a = bits_get(sa, row - 1, sw)
        b = bits_get(sa, row, sw)
        ta = bits_get(tok, a, tw)
        tb = bits_get(tok, b, tw)
        if ta > tb or (ta == tb and rank[a + 1] >= rank[b + 1]):
            return row + 1
    return 0


def verify_index(root: str | Path, tokenizer=None) -> dict:
    """Full check: every byte against its sha256 and block crc32s, every token id, the
    separators, ``docs.sqlite``, and the whole suffix order (O(n), see ``_sa_check``)."""
    manifest = read_index_manifest(root)
    checked = 0
    for entry in manifest.data["shards"]:
        check_files(manifest.root, entry["files"], full=True)
    check_docs_db(manifest.root, manifest.data)
    index = SuffixIndex.open(root, tokenizer=tokenizer)
    for shard, entry in zip(index.shards, manifest.data["shards"]):
        for file, data, crcs in (("tokens.bin", shard.tokens, shard.tokens_crc), ("sa.bin", shard.sa, shard.sa_crc)):
            bad = np.flatnonzero(block_crcs(data, 1 << shard.block_shift) != crcs)
            if bad.size:
                raise IndexFormatError(f"{shard.path / file}: block {int(bad[0])} does not match its checksum (corrupted)")
        row = int(_sa_check(shard.tokens, shard.token_bits, shard.sa, shard.sa_bits, shard.n))
        if row:
            raise IndexFormatError(f"{shard.path}: suffix array is not the sorted permutation at row {row - 1} (corrupted)")
        ids = shard.token_ids()
        if int(ids.max()) > shard.sep:
            raise IndexFormatError(f"{shard.path}: token ids beyond the shard vocabulary")
        if int(ids[-1]) != shard.sep or int(np.count_nonzero(ids == shard.sep)) != entry["documents"]:
            raise IndexFormatError(f"{shard.path}: document separators do not match the manifest's {entry['documents']} documents")
        checked += shard.n
    return {"tokens_checked": checked, "shards": len(index.shards)}
