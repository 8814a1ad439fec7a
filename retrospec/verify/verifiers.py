"""Verifiers: where the tree forward runs and how the KV cache follows the accepted path.

* :class:`DynamicVerifier` (the default on CPU): a ``DynamicCache`` whose layers keep every
  token, trees of exactly the drafted size, masks built per step. Handles sliding-window
  models (windows applied in the mask).
* :class:`StaticVerifier` (the default on CUDA): a ``StaticCache`` of fixed length and a
  fixed number of tree slots (smaller trees are padded), all buffers preallocated on the
  device, so that one verification — moving the previous step's accepted slots into place,
  then the forward — is a fixed-shape computation, captured once as a CUDA graph and
  replayed every step (``graph``), optionally compiled first (``compile``). That removes
  the per-kernel launch cost that otherwise bounds a small model's step on a GPU.

Both expose the same three calls to the loop: ``start`` (prefill), ``verify`` (one tree
forward) and ``keep`` (compact the cache to the accepted path). Static verifiers are costly
to build (a CUDA graph capture, a compile), so a :class:`VerifierPool` keeps them across
requests and lends each to one request at a time.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol

import numpy as np
import torch

from retrospec.compat import accepts, cache_kwarg
from retrospec.jit import njit
from retrospec.verify.cache import keep_path, new_cache
from retrospec.tree import DraftTree, TreeBuffers, to_buffers
from retrospec.verify.acceptance import forward_tree

log = logging.getLogger(__name__)

VERIFY_MODES = ("auto", "dynamic", "static", "graph", "compile")


class Verifier(Protocol):
    def start(self, ids: torch.Tensor) -> torch.Tensor:
        """Prefill the prompt ``[1, L]``; return the logits ``[1, V]`` after its last token."""
        ...

    def verify(self, tree: DraftTree, root_token: int, past_len: int) -> tuple[TreeBuffers, torch.Tensor]:
        """One forward of root + tree behind ``past_len`` cached tokens: buffers and logits ``[N+1, V]``."""
        ...

    def keep(self, past_len: int, slots: np.ndarray) -> None:
        """Keep the cache entries of the accepted ``slots``."""
        ...


def _prefill(model, ids: torch.Tensor, cache) -> torch.Tensor:
    extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=ids,
        position_ids=torch.arange(ids.shape[1], device=ids.device)[None],
        use_cache=True,
        **{cache_kwarg(model): cache},
        **extra,
    )
    return out.logits[0, -1:]


class DynamicVerifier:
    """Exact-size trees over a ``DynamicCache`` (see the module docstring)."""

    def __init__(self, model, windows: dict[str, int | None]):
        self.model, self.windows = model, windows
        self.device = next(model.parameters()).device
        self.cache = new_cache()

    def start(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache = new_cache()
        return _prefill(self.model, ids, self.cache)

    def verify(self, tree: DraftTree, root_token: int, past_len: int) -> tuple[TreeBuffers, torch.Tensor]:
        buffers = to_buffers(tree, root_token, past_len, dtype=self.model.dtype, device=self.device, windows=self.windows)
        return buffers, forward_tree(self.model, self.cache, buffers)

    def keep(self, past_len: int, slots: np.ndarray) -> None:
        keep_path(self.cache, past_len, slots)


class StaticVerifier:
    """Fixed-shape trees over a ``StaticCache``, optionally replayed as a CUDA graph.

    Args:
        model: a full-attention decoder (sliding-window models use :class:`DynamicVerifier`).
        max_len: the cache length (prompt + new tokens + ``slots`` must fit).
        slots: tree slots per step, root included; smaller trees are padded.
        graph: capture the verification forward as a CUDA graph on first use.
        compile: compile the verification step with ``torch.compile`` first (fused kernels;
            compilation takes a while on first use).
    """

    def __init__(self, model, max_len: int, slots: int, graph: bool, compile: bool = False):
        from transformers import StaticCache

        if graph and next(model.parameters()).device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model, self.max_len, self.slots, self.use_graph = model, max_len, slots, graph
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.ckw = cache_kwarg(model)
        self.min = torch.finfo(self.dtype).min
        # the static inputs the graph reads, refilled every step
        self.ids = torch.zeros(1, slots, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, slots, dtype=torch.long, device=self.device)
        self.mask = torch.full((1, 1, slots, max_len), self.min, dtype=self.dtype, device=self.device)
        self.block = torch.zeros(slots, slots, dtype=torch.float32, device=self.device)
        pin = self.device.type == "cuda"
        self.host_ids = torch.zeros(1, slots, dtype=torch.long).pin_memory() if pin else torch.zeros(1, slots, dtype=torch.long)
        self.host_pos = torch.zeros_like(self.host_ids).pin_memory() if pin else torch.zeros_like(self.host_ids)
        self.host_block = torch.zeros(slots, slots, dtype=torch.float32).pin_memory() if pin else torch.zeros(slots, slots, dtype=torch.float32)
        self.host_block_np = self.host_block.numpy()  # the same memory, written by numba
        # the previous step's accepted slots, moved into place at the start of the next forward
        self.move_src = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.move_dst = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.host_moves = torch.zeros(2, slots, dtype=torch.long).pin_memory() if pin else torch.zeros(2, slots, dtype=torch.long)
        self.moves: tuple[int, np.ndarray] | None = None
        self.graph = None
        self.logits: torch.Tensor | None = None
        self.compiled = None
        if compile:
            self.compiled = torch.compile(self._step, dynamic=False)

    def _set_length(self, length: int) -> None:
        # StaticCache layers write at their `cumulative_length` (a device tensor, updated in place)
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(length)

    def start(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] + self.slots > self.max_len:
            raise ValueError(f"a {ids.shape[1]}-token prompt does not fit a {self.max_len}-token static cache")
        self._set_length(0)
        self.moves = None
        return _prefill(self.model, ids, self.cache)

    def _step(self) -> torch.Tensor:
        """One fixed-shape step: move last step's accepted slots into place, then the forward."""
        for layer in self.cache.layers:
            layer.keys.index_copy_(2, self.move_dst, layer.keys.index_select(2, self.move_src))
            layer.values.index_copy_(2, self.move_dst, layer.values.index_select(2, self.move_src))
        out = self.model(input_ids=self.ids, position_ids=self.pos, attention_mask=self.mask, use_cache=True, **{self.ckw: self.cache})
        return out.logits[0]

    def _forward(self) -> torch.Tensor:
        return self.compiled() if self.compiled is not None else self._step()

    def _capture(self, past_len: int) -> None:
        """Warm up on a side stream, then capture one verification as a CUDA graph."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._set_length(past_len)
                self._forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self._set_length(past_len)
        with torch.cuda.graph(graph):
            self.logits = self._forward()
        self.graph = graph
        log.info("retrospec: captured the %d-slot verification as a CUDA graph (cache %d)", self.slots, self.max_len)

    def verify(self, tree: DraftTree, root_token: int, past_len: int) -> tuple[TreeBuffers, torch.Tensor]:
        n = len(tree) + 1
        if n > self.slots:
            raise ValueError(f"a tree of {n - 1} nodes does not fit {self.slots} slots")
        if past_len + self.slots > self.max_len:
            raise ValueError(f"the static cache ({self.max_len}) is full at {past_len} tokens")
        # 1) host side: padded ids and positions, the tree block of the mask
        parents = tree.parents
        depth = np.concatenate([[0], tree.depths()]).astype(np.int64)
        self.host_ids.fill_(root_token)
        self.host_ids[0, 1:n] = torch.from_numpy(tree.tokens)
        self.host_pos.fill_(past_len)
        self.host_pos[0, :n] = torch.from_numpy(past_len + depth)
        _fill_block(self.host_block_np, parents, float(self.min))  # padding slots see only themselves
        # the slot moves of the previous step (identity moves on a scratch position pad them)
        scratch = self.max_len - 1
        self.host_moves.fill_(scratch)
        if self.moves is not None:
            prev_len, slots = self.moves
            self.host_moves[0, : slots.shape[0]] = torch.from_numpy(prev_len + slots)
            self.host_moves[1, : slots.shape[0]] = torch.from_numpy(prev_len + np.arange(slots.shape[0]))
            self.moves = None
        # 2) device side: upload (asynchronously from pinned memory) and lay out the mask
        self.move_src.copy_(self.host_moves[0], non_blocking=True)
        self.move_dst.copy_(self.host_moves[1], non_blocking=True)
        self.ids.copy_(self.host_ids, non_blocking=True)
        self.pos.copy_(self.host_pos, non_blocking=True)
        self.block.copy_(self.host_block, non_blocking=True)  # float32 -> model dtype on the device
        self.mask.fill_(self.min)
        self.mask[0, 0, :, :past_len] = 0
        self.mask[0, 0, :, past_len : past_len + self.slots] = self.block
        # 3) the forward: replay the graph, or run eagerly
        self._set_length(past_len)
        if self.use_graph:
            if self.graph is None:
                self._capture(past_len)
                self._set_length(past_len)
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
        buffers = TreeBuffers(
            input_ids=self.ids[:, :n],
            position_ids=self.pos[:, :n],
            attention_mask=self.mask,
            retrieve=None,  # acceptance walks the tree on the host (see verify.accept_greedy_host)
            parent_slots=np.concatenate([[-1], parents.astype(np.int64) + 1]),
        )
        return buffers, logits[:n]

    def keep(self, past_len: int, slots: np.ndarray) -> None:
        # deferred: the next step moves them, inside its (graphed) forward; a contiguous
        # accepted prefix is already in place
        if not np.array_equal(slots, np.arange(slots.shape[0])):
            self.moves = (past_len, slots.copy())


@njit()
def _fill_block(block, parents, masked):
    """The tree part of the mask in place: slot i sees itself and its ancestors (slot 0 is
    the root; node j sits in slot j + 1); padding slots see only themselves."""
    block[:, :] = masked
    for i in range(block.shape[0]):
        block[i, i] = 0.0
    for j in range(parents.shape[0]):
        row = j + 1
        block[row, 0] = 0.0
        p = parents[j]
        while p >= 0:
            block[row, p + 1] = 0.0
            p = parents[p]


def cache_bucket(length: int) -> int:
    """The static cache length serving a request of ``length`` tokens (prompt + new tokens +
    tree slots): the next power of two, at least 1,024 — a few sizes serve all requests.

    >>> cache_bucket(300), cache_bucket(1024), cache_bucket(1025)
    (1024, 1024, 2048)
    """
    return 1 << max(int(length - 1).bit_length(), 10)


class VerifierPool:
    """Static verifiers kept across requests (their CUDA graphs stay captured), each lent to
    one request at a time: a verifier holds its request's KV cache, so two requests running
    at once (two threads sharing a :class:`~retrospec.Speculator`) get two verifiers.

    >>> pool = VerifierPool()
    >>> a = pool.acquire("k", object); b = pool.acquire("k", object)   # both in use: two
    >>> a is not b, len(pool)
    (True, 2)
    >>> pool.release(a); pool.acquire("k", object) is a                 # returned: reused
    True
    """

    def __init__(self) -> None:
        self._free: dict = {}
        self._keys: dict[int, tuple] = {}  # id(verifier) -> (key, verifier)
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()  # one capture or compile at a time

    def acquire(self, key, build: Callable[[], object]):
        """A free verifier for ``key``, or a new one from ``build()``."""
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        with self._build_lock:  # not under _lock: a capture or compile takes a while
            verifier = build()
        with self._lock:
            self._keys[id(verifier)] = (key, verifier)
        return verifier

    def release(self, verifier) -> None:
        """Give ``verifier`` back once its request is done (anything else is ignored)."""
        with self._lock:
            entry = self._keys.get(id(verifier))
            if entry is not None and entry[1] is verifier:
                self._free.setdefault(entry[0], []).append(verifier)

    def __len__(self) -> int:
        """Verifiers built so far."""
        return len(self._keys)


def make_verifier(
    model, mode: str, windows: dict[str, int | None], max_len: int, slots: int, pool: VerifierPool | None = None
) -> Verifier:
    """The verifier for ``mode`` (see ``VERIFY_MODES``); static verifiers come from ``pool``
    (to be given back with ``pool.release`` after the request) for the same model, cache
    length and slots."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {VERIFY_MODES}, got {mode!r}")
    device = next(model.parameters()).device
    full_attention = all(w is None for w in windows.values())
    if mode == "auto":
        mode = "graph" if device.type == "cuda" and full_attention else "dynamic"
    if mode in ("static", "graph", "compile") and not full_attention:
        log.info("retrospec: sliding-window layers are verified with the dynamic cache (static mode asked)")
        mode = "dynamic"
    if mode == "dynamic":
        return DynamicVerifier(model, windows)
    bucket = cache_bucket(max_len)
    cuda = device.type == "cuda"

    def build() -> StaticVerifier:
        return StaticVerifier(model, bucket, slots, graph=mode == "graph" or (mode == "compile" and cuda), compile=mode == "compile")

    return pool.acquire((id(model), mode, bucket, slots), build) if pool is not None else build()
