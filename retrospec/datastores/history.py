"""The history store: the token streams of past requests, one bounded ring per namespace.

A request leaves one *segment* behind: its prompt then its output, closed by ``SEP``,
every position tagged ``PROMPT`` or ``OUTPUT`` (so a draft knows which it came from; the
two are not cut apart, because the first tokens of an answer follow the prompt's last). One namespace
(a :class:`HistoryIndex`) keeps them in a ring of at most ``max_tokens`` positions and
finds the places where a suffix occurred with hash chains, as LZ77 compressors do::

    ring   int32 [cap]      the token at global position p is ring[p % cap]; SEP after each request
    kinds  uint8 [cap]      PROMPT or OUTPUT, per position
    heads  int64 [O, H]     per order n of ORDERS: the newest position that ends an n-gram of that hash
    back   int32 [O, cap]   how far back the previous position with that n-gram hash is (0: none)

Positions ``[floor, end)`` are live. Adding a request that would pass the budget first
evicts the oldest requests, whole; the arrays grow (doubling) until they hold the budget
and never after, so memory is flat once the budget is full.

Concurrency. ``add`` takes the namespace's lock; lookups take none. A lookup reads one
:class:`View` (arrays, floor, end), which ``add`` replaces whole; ``add`` publishes the new
floor *before* it overwrites evicted slots, and a lookup drops every match that lies below
the floor read *after* its rows were copied, so a torn read can only lose a draft. A racy
draft could at worst be a wrong guess, which verification rejects: the output never changes.

Files (``save``/``load``): an index directory in the project's format
(:mod:`retrospec.datastores.files`): ``manifest.json`` (format, version, the tokenizer's
identity, per namespace its name and counts, and the size and sha256 of every array) and
raw little-endian arrays — no pickle. Loading checks the manifest's own checksum, every
field, every array's sha256 and every value, and the tokenizer, before anything is used.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from retrospec.datastores.files import (
    IndexFormatError,
    array_entry,
    building,
    check_tokenizer,
    read_manifest,
    read_small_array,
    save_array,
    tokenizer_fields,
    tokenizer_identity,
    write_manifest,
)
from retrospec.jit import njit

FORMAT = "retrospec-history"
FORMAT_VERSION = 1
SEP = -1
"""Closes every segment: no n-gram and no continuation crosses it (``PAD`` of the tries)."""
PROMPT, OUTPUT = 0, 1
ORDERS = (2, 3, 4, 6, 8, 12, 16)
"""n-gram lengths with a hash chain each; a match is then extended backwards token by token."""
MIN_CAPACITY = 1 << 12
MAX_NAMESPACES = 1 << 16
MAX_NAME = 256
_MIX = 8388593  # a prime below 2**23: h < 2**40, so h * _MIX + t < 2**63 (no overflow, jit or not)
_MASK40 = (1 << 40) - 1


class View(NamedTuple):
    """One consistent state of a namespace, as a lookup reads it (never mutated in a way
    that a reader of live positions could see, see the module docstring)."""

    ring: np.ndarray
    kinds: np.ndarray
    heads: np.ndarray
    back: np.ndarray
    floor: int
    end: int


@njit()
def _bucket(tokens, stop, n, cap, hmask):
    """Hash bucket of the ``n`` ring tokens ending at position ``stop - 1``, or -1 if one is SEP."""
    h = 0
    for q in range(stop - n, stop):
        t = int(tokens[q % cap])  # a Python int without jit: int32 arithmetic would overflow
        if t < 0:
            return -1
        h = ((h * _MIX) + t + 1) & _MASK40
    return (h ^ (h >> 17)) & hmask


@njit()
def _link(ring, heads, back, orders, floor, start, stop, cap, hmask):
    """Chain positions ``start .. stop-1`` (already written to ``ring``) into every order.

    Invariant: ``back[o, p % cap] > 0`` points to an earlier position, so every chain
    strictly decreases and a walk ends (a lookup also stops below ``floor``).
    """
    for p in range(start, stop):
        slot = p % cap
        for o in range(orders.shape[0]):
            back[o, slot] = 0
            n = orders[o]
            if p - n + 1 < floor:
                continue
            b = _bucket(ring, p + 1, n, cap, hmask)
            if b < 0:
                continue
            prev = heads[o, b]
            if prev >= floor and prev < p and p - prev < 2147483647:
                back[o, slot] = p - prev
            heads[o, b] = p


@njit()
def _matches(ring, heads, back, orders, floor, end, cap, hmask, tail, min_match, max_match, max_matches, max_chain):
    """``(ends, lengths)``: up to ``max_matches`` live positions where the tokens ending there
    equal the last ``lengths`` tokens of ``tail`` (``lengths >= min_match``), each with a
    continuation; the longest order's chain first, newest first within a chain."""
    ends = np.empty(max_matches, np.int64)
    lengths = np.empty(max_matches, np.int64)
    k = 0
    size = tail.shape[0]
    for o in range(orders.shape[0] - 1, -1, -1):
        n = orders[o]
        if n > size or (n < min_match and o + 1 < orders.shape[0] and orders[o + 1] <= min_match):
            continue
        h = 0
        for q in range(size - n, size):
            h = ((h * _MIX) + int(tail[q]) + 1) & _MASK40
        p = heads[o, (h ^ (h >> 17)) & hmask]
        steps = 0
        while floor <= p < end - 1 and steps < max_chain:
            steps += 1
            m = 0
            while m < max_match and m < size and p - m >= floor:
                t = ring[(p - m) % cap]
                if t < 0 or t != tail[size - 1 - m]:
                    break
                m += 1
            if m >= n and m >= min_match and ring[(p + 1) % cap] >= 0:
                seen = False
                for j in range(k):
                    if ends[j] == p:
                        seen = True
                        break
                if not seen:
                    ends[k], lengths[k] = p, m
                    k += 1
                    if k == max_matches:
                        return ends, lengths
            d = back[o, p % cap]
            if d <= 0:
                break
            p -= d
    return ends[:k], lengths[:k]


@njit()
def _rows(ring, kinds, ends, depth, end, cap):
    """``(rows, kinds)``: the ``depth`` tokens after each end (``SEP``-padded at a segment's
    end), and the kind (prompt or output) of the first of them."""
    rows = np.full((ends.shape[0], depth), SEP, np.int64)
    kind = np.zeros(ends.shape[0], np.int64)
    for i in range(ends.shape[0]):
        kind[i] = kinds[(ends[i] + 1) % cap]
        for d in range(depth):
            q = ends[i] + 1 + d
            if q >= end:
                break
            t = ring[q % cap]
            if t < 0:
                break
            rows[i, d] = t
    return rows, kind


def _hash_size(cap: int) -> int:
    return 1 << max(10, (cap - 1).bit_length() - 1)


class HistoryIndex:
    """The past requests of one namespace (see the module docstring).

    >>> index = HistoryIndex(max_tokens=4096)
    >>> index.add([7, 7], [1, 2, 3, 4]); index.add([8], [1, 2, 5])   # 7 7 1 2 3 4 | 8 1 2 5 |
    >>> ends, lengths = index.matches(np.array([9, 1, 2]), min_match=2)
    >>> index.continuations(ends, 2)[0].tolist()     # newest first: "1 2" was followed by 5, then by 3 4
    [[5, -1], [3, 4]]
    """

    def __init__(self, max_tokens: int = 1 << 19, orders: Sequence[int] = ORDERS):
        if max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {max_tokens}")
        orders = tuple(int(n) for n in orders)
        if not orders or list(orders) != sorted(set(orders)) or orders[0] < 1:
            raise ValueError(f"orders must be increasing positive lengths, got {orders}")
        self.max_tokens = int(max_tokens)
        self.orders = np.asarray(orders, np.int64)
        self._lock = threading.Lock()
        self._requests: deque[int] = deque()  # end position of each live request, oldest first
        self.added = 0  # requests ever added
        self.evicted = 0  # requests ever evicted
        self._view = self._allocate(min(self.max_tokens, MIN_CAPACITY))

    def _allocate(self, cap: int) -> View:
        h = _hash_size(cap)
        return View(np.full(cap, SEP, np.int32), np.zeros(cap, np.uint8), np.full((len(self.orders), h), -1, np.int64),
                    np.zeros((len(self.orders), cap), np.int32), 0, 0)

    # -- reading (no lock) -------------------------------------------------------------
    @property
    def view(self) -> View:
        return self._view

    def __len__(self) -> int:
        """Live tokens (separators included)."""
        v = self._view
        return v.end - v.floor

    @property
    def requests(self) -> int:
        """Live requests."""
        return len(self._requests)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what grows until the budget is full)."""
        v = self._view
        return v.ring.nbytes + v.kinds.nbytes + v.heads.nbytes + v.back.nbytes

    def matches(self, tail: np.ndarray, min_match: int = 2, max_match: int = 32, max_matches: int = 32,
                max_chain: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """``(ends, lengths)`` of earlier occurrences of ``tail``'s suffixes (see ``_matches``)."""
        v = self._view
        if v.end - v.floor < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        tail = np.ascontiguousarray(np.asarray(tail, np.int64)[-max_match:])
        cap, hmask = v.ring.shape[0], v.heads.shape[1] - 1
        return _matches(v.ring, v.heads, v.back, self.orders, v.floor, v.end, cap, hmask, tail,
                        int(min_match), int(max_match), int(max_matches), int(max_chain))

    def continuations(self, ends: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows int64 [K, depth], kinds int64 [K], live bool [len(ends)])``: the tokens
        after each of ``ends`` (from :meth:`matches`) that was not evicted meanwhile."""
        ends = np.asarray(ends, np.int64)
        v = self._view
        rows, kinds = _rows(v.ring, v.kinds, ends, int(depth), v.end, v.ring.shape[0])
        live = ends >= self._view.floor  # read after the copy: a slot overwritten meanwhile lies below it
        if not live.all():
            rows, kinds = rows[live], kinds[live]
        return rows, kinds, live

    # -- writing (one writer at a time per namespace) -----------------------------------
    def add(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Append one finished request, evicting the oldest ones to stay within budget."""
        prompt = np.asarray(prompt, np.int64).ravel()
        output = np.asarray(output, np.int64).ravel()
        if (prompt.size and prompt.min() < 0) or (output.size and output.min() < 0):
            raise ValueError("token ids must be >= 0")
        with self._lock:
            self._append(_block(prompt, output, self.max_tokens))

    def _append(self, block: tuple[np.ndarray, np.ndarray]) -> None:
        tokens, kinds = block
        size = tokens.shape[0]
        if size == 0:
            return
        v = self._view
        floor, end = v.floor, v.end
        # 1) grow (only before the ring first wraps: positions are then their own slots)
        if end + size > v.ring.shape[0] and v.ring.shape[0] < self.max_tokens:
            v = self._grow(max(2 * v.ring.shape[0], end + size - floor))
        # 2) evict the oldest requests whole; publish the new floor before overwriting slots
        while end + size - floor > self.max_tokens:
            floor = self._requests.popleft()
            self.evicted += 1
        if floor != v.floor:
            v = v._replace(floor=floor)
            self._view = v
        # 3) write, link, publish the new end
        cap = v.ring.shape[0]
        slots = np.arange(end, end + size) % cap
        v.ring[slots] = tokens
        v.kinds[slots] = kinds
        _link(v.ring, v.heads, v.back, self.orders, floor, end, end + size, cap, v.heads.shape[1] - 1)
        self._requests.append(end + size)
        self.added += 1
        self._view = v._replace(end=end + size)

    def _grow(self, want: int) -> View:
        old = self._view
        assert old.floor == 0 and old.end <= old.ring.shape[0], "the ring grows only before it wraps"
        cap = min(self.max_tokens, max(want, MIN_CAPACITY))
        new = self._allocate(cap)
        new.ring[: old.end] = old.ring[: old.end]
        new.kinds[: old.end] = old.kinds[: old.end]
        _link(new.ring, new.heads, new.back, self.orders, 0, 0, old.end, cap, new.heads.shape[1] - 1)
        new = new._replace(end=old.end)
        self._view = new  # old arrays stay as they were for readers still holding them
        return new

    # -- persistence helpers ------------------------------------------------------------
    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens int32, kinds uint8, request ends int64)`` of the live requests, oldest
        first (ends relative to the first token)."""
        with self._lock:
            v = self._view
            slots = np.arange(v.floor, v.end) % v.ring.shape[0]
            return v.ring[slots].copy(), v.kinds[slots].copy(), np.asarray(self._requests, np.int64) - v.floor

    def restore(self, tokens: np.ndarray, kinds: np.ndarray, ends: np.ndarray) -> None:
        """Append the requests of a :meth:`snapshot` (validated), oldest first."""
        with self._lock:
            start = 0
            for stop in ends.tolist():
                self._append(_fit(tokens[start:stop].astype(np.int64), kinds[start:stop].astype(np.uint8), self.max_tokens))
                start = stop


def _block(prompt: np.ndarray, output: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """A request's tokens as stored: ``prompt output SEP``, with kinds."""
    tokens = np.concatenate([prompt, output, [SEP]]).astype(np.int64)
    kinds = np.concatenate([np.full(prompt.size, PROMPT, np.uint8), np.full(output.size + 1, OUTPUT, np.uint8)])
    return _fit(tokens, kinds, budget)


def _fit(tokens: np.ndarray, kinds: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """A block larger than the whole budget keeps only its last ``budget`` positions."""
    if tokens.shape[0] <= budget:
        return tokens, kinds
    tokens, kinds = tokens[-budget:].copy(), kinds[-budget:].copy()
    tokens[0] = SEP  # the cut segment starts after a separator like every other
    return tokens, kinds


class HistoryStore:
    """Every namespace's :class:`HistoryIndex`, with ``save``/``load``.

    Args:
        max_tokens: the token budget of each namespace.
        tokenizer: the model's tokenizer (its identity is written by ``save`` and checked by ``load``).
    """

    def __init__(self, max_tokens: int = 1 << 19, tokenizer=None, *, identity: dict | None = None):
        self.max_tokens = int(max_tokens)
        HistoryIndex(self.max_tokens)  # validates max_tokens
        self.identity = identity if identity is not None else (tokenizer_identity(tokenizer) if tokenizer is not None else None)
        self._indexes: dict[str, HistoryIndex] = {}
        self._lock = threading.Lock()  # only when a namespace is created
        self.path: Path | None = None

    def index(self, namespace: str = "") -> HistoryIndex:
        """The namespace's index (created on first use)."""
        found = self._indexes.get(namespace)
        if found is not None:
            return found
        if not isinstance(namespace, str) or len(namespace) > MAX_NAME:
            raise ValueError(f"a namespace is a string of at most {MAX_NAME} characters, got {str(namespace)[:40]!r}")
        with self._lock:
            if namespace not in self._indexes:
                if len(self._indexes) >= MAX_NAMESPACES:
                    raise ValueError(f"at most {MAX_NAMESPACES} namespaces")
                self._indexes[namespace] = HistoryIndex(self.max_tokens)
            return self._indexes[namespace]

    def reset(self, namespace: str = "") -> HistoryIndex:
        """Replace the namespace's index with an empty one (sessions still drafting from the
        old one finish on it; what they add afterwards is lost with it)."""
        self.index(namespace)
        with self._lock:
            self._indexes[namespace] = HistoryIndex(self.max_tokens)
            return self._indexes[namespace]

    @property
    def namespaces(self) -> list[str]:
        return list(self._indexes)

    @property
    def nbytes(self) -> int:
        return sum(ix.nbytes for ix in list(self._indexes.values()))

    def save(self, path: str | Path, *, force: bool = False) -> None:
        """Write every namespace to the index directory ``path``, atomically (see
        :func:`~retrospec.datastores.files.building`): a reader sees the old history or the
        new one. ``path`` may be absent, empty or a history; anything else is refused."""
        names = list(self._indexes)
        with building(Path(path), FORMAT, force=force) as tmp:
            spaces = []
            for i, name in enumerate(names):
                tokens, kinds, ends = self._indexes[name].snapshot()
                files = {f"ns{i}.tokens": save_array(tmp, f"ns{i}.tokens", tokens.astype("<i4")),
                         f"ns{i}.kinds": save_array(tmp, f"ns{i}.kinds", kinds),
                         f"ns{i}.ends": save_array(tmp, f"ns{i}.ends", ends.astype("<i8"))}
                spaces.append({"name": name, "tokens": int(tokens.shape[0]), "requests": int(ends.shape[0]), "files": files})
            write_manifest(tmp, {"format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": self.identity,
                                 "max_tokens": self.max_tokens, "namespaces": spaces})

    @classmethod
    def load(cls, path: str | Path, tokenizer=None, max_tokens: int | None = None) -> HistoryStore:
        """Read a history written by :meth:`save`, every byte and value checked.

        With ``tokenizer``, refuse one written for another tokenizer (or without one). A
        refused file raises :class:`~retrospec.datastores.files.IndexFormatError` and
        changes nothing: no store is half loaded, the file is left where it is.
        """
        manifest = read_manifest(path, FORMAT, FORMAT_VERSION)
        fields = manifest.fields()
        identity = None
        if fields.get("tokenizer") is not None:
            identity = tokenizer_fields(fields)
        if tokenizer is not None:
            if identity is None:
                raise IndexFormatError(f"{manifest.root}: saved without a tokenizer identity, so it cannot be checked "
                                       "against this model's tokenizer; start an empty history instead")
            check_tokenizer(manifest, tokenizer)
        saved_max = fields.integer("max_tokens", 16, 1 << 40)
        vocab = identity["vocab_size"] if identity else (1 << 31) - 1
        loaded = []
        seen = set()
        for i, _ in enumerate(fields.items("namespaces", 0, MAX_NAMESPACES)):
            ns = fields.item("namespaces", i)
            name = ns.text("name", max_len=MAX_NAME)
            if name in seen:
                ns.fail("name", "repeats another namespace's", name)
            seen.add(name)
            n = ns.integer("tokens", 0, saved_max)
            r = ns.integer("requests", 0, n)
            files = ns.obj("files")
            expect = {f"ns{i}.tokens": ("<i4", (n,)), f"ns{i}.kinds": ("|u1", (n,)), f"ns{i}.ends": ("<i8", (r,))}
            if set(files.data) != set(expect):
                files.fail("", f"must name exactly {sorted(expect)}", sorted(files.data))
            arrays = [read_small_array(manifest.root, name_, array_entry(files, name_, *spec)) for name_, spec in expect.items()]
            tokens, kinds, ends = arrays
            _check_values(manifest.root / f"ns{i}.tokens", tokens, kinds, ends, vocab)
            loaded.append((name, tokens, kinds, ends))
        store = cls(max_tokens or saved_max, identity=identity)
        for name, tokens, kinds, ends in loaded:
            store.index(name).restore(tokens, kinds, ends)
        store.path = Path(path)
        return store


def _check_values(where: Path, tokens: np.ndarray, kinds: np.ndarray, ends: np.ndarray, vocab: int) -> None:
    """Values a kernel relies on: token ids in ``[SEP, vocab)``, kinds PROMPT or OUTPUT,
    request ends increasing up to the last token, each request closed by SEP."""
    def fail(why: str):
        raise IndexFormatError(f"{where}: {why} (corrupted)")

    if tokens.size and (tokens.min() < SEP or tokens.max() >= vocab):
        fail(f"holds values outside the token ids [-1, {vocab})")
    if kinds.size and kinds.max() > OUTPUT:
        fail("holds kinds other than prompt (0) and output (1)")
    if ends.size:
        if ends[0] < 1 or (np.diff(ends) < 1).any() or ends[-1] != tokens.size:
            fail("request ends must increase from 1 to the number of tokens")
        if (tokens[ends - 1] != SEP).any():
            fail("a request does not end with the separator")
    elif tokens.size:
        fail("holds tokens but no request")


def replay(index: HistoryIndex, requests: Iterable[tuple[Sequence[int], Sequence[int]]]) -> None:
    """Add many ``(prompt, output)`` pairs in order (tests and benchmarks)."""
    for prompt, output in requests:
        index.add(prompt, output)
