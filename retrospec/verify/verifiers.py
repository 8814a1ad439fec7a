"""Verifiers: where the tree forwards of a batch run, over one :class:`RowCache`.

* :class:`DynamicVerifier` (the default on CPU): exact-size inputs every step — as many
  slots as the largest tree of the step, keys up to the longest row — eager forwards.
* :class:`StaticVerifier` (the default on CUDA): fixed shapes — a batch bucket of rows, a
  few slot counts, a fixed cache capacity — so that one verification (moving the last
  step's accepted slots into place, laying out the mask, the forward, argmax and top-k)
  is captured once per slot count as a CUDA graph and replayed every step (``graph``),
  optionally compiled first (``compile``). That removes the per-kernel launch cost that
  otherwise bounds a small model's step on a GPU. Rows beyond the live ones are padding.

Both take their inputs from :mod:`retrospec.buffers` (the one tree layout and mask) and
expose the same calls to the loop: ``prefill`` (prompts into cache rows), ``verify`` (one
tree forward of every row) and ``keep`` (the accepted slots of each row, moved into place
at the start of the next forward). Static verifiers are costly to build, so a
:class:`VerifierPool` per model keeps them across requests and lends each to one request
at a time.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch

from retrospec.buffers import TreeLayout, attention_mask, prefill_buffers, tree_layout
from retrospec.compat import accepts, cache_kwarg
from retrospec.drafting.budget import LiveCost
from retrospec.tree import DraftTree
from retrospec.verify.acceptance import predictions
from retrospec.verify.cache import RowCache

log = logging.getLogger(__name__)

VERIFY_MODES = ("auto", "dynamic", "static", "graph", "compile")
COMPILED_ROWS, COMPILED_SLOTS = 2, 2
"""The fewest rows and slots of a compiled step: dynamo specialises sizes 0 and 1, so a
batch of one or a plain (1-slot) step would each be a compile of its own (minutes on a
GPU) instead of sharing the one dynamic compile. The extra row or slot is padding."""
PIPELINE_ROWS = 16
"""The smallest batch that ``pipeline=None`` splits in two (on CUDA): below it drafting
costs the host less than a forward costs the device, so a second, half-sized forward per
step costs about what the overlap saves (H200, SmolLM2-135M: +30% at 16 rows, +41% at 64,
nothing at 4; ``benchmarks/gpu/README.md``)."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SLOT_OPTIONS = ((2, (None,)), (8, (32,)), (32, (0, 16)), (1 << 30, (0, 8)))
"""Tree sizes a static verifier captures by batch size: ``(most rows, sizes)``, ``None`` =
the configured ``slots``. Small batches barely pay for a bigger tree, big ones do."""


@dataclass(frozen=True)
class VerifierConfig:
    """How verification runs (the verifier's own settings; drafting never sees them)."""

    mode: str = "auto"
    """``dynamic`` (exact sizes, eager), ``static`` (fixed shapes), ``graph`` (static + CUDA
    graphs), ``compile`` (graphs of a ``torch.compile``'d step), or ``auto`` (graph on CUDA
    for full-attention models, else dynamic)."""
    slots: int = 64
    """Most tree nodes per row and step of the static verifiers (an int budget lowers it)."""
    slot_options: tuple[int, ...] | None = None
    """Smaller tree sizes the static verifiers also capture (0: a plain decoding step), so
    the budget can shrink trees as the batch grows; ``slots`` is always one of them.
    ``None``: by batch size (:data:`SLOT_OPTIONS`) — each size is one more captured (and
    compiled) step, so a batch of one, whose step costs the same for any tree, gets one."""
    capacity: int | None = None
    """Cache indices per row of the static verifiers (default: the power of two that fits each
    request); one fixed capacity means one captured (and compiled) step per tree size."""
    profile: bool = False
    """Synchronise the device around each verification and record per-step host and device
    times in ``SpecStats`` (for measurements; it costs a little speed on GPUs)."""
    pipeline: bool | None = None
    """Split the batch in two halves with a cache each and verify them in turn, drafting one
    half while the device verifies the other, so that the host's drafting hides behind the
    device's forwards. ``None``: on CUDA for batches of at least :data:`PIPELINE_ROWS` rows,
    never when profiling (a synchronised step cannot overlap)."""

    def __post_init__(self) -> None:
        if self.mode not in VERIFY_MODES:
            raise ValueError(f"verify mode must be one of {VERIFY_MODES}, got {self.mode!r}")
        if self.slots < 0 or any(s < 0 for s in self.slot_options or ()):
            raise ValueError(f"slots and slot_options must be >= 0, got {self.slots}, {self.slot_options}")

    def pipelined(self, model, rows: int) -> bool:
        """Whether a batch of ``rows`` live rows runs as two pipelined halves (see ``pipeline``)."""
        if rows < 2:
            return False
        if self.pipeline is not None:
            return self.pipeline
        return not self.profile and _device(model).type == "cuda" and rows >= PIPELINE_ROWS

    def resolved(self, model, windows: dict[str, int | None]) -> str:
        """The concrete mode for ``model``: ``auto`` resolved, static kinds only where every
        layer has full attention (sliding windows are masked on the dynamic path)."""
        full_attention = all(w is None for w in windows.values())
        mode = self.mode
        if mode == "auto":
            mode = "graph" if _device(model).type == "cuda" and full_attention else "dynamic"
        if mode != "dynamic" and not full_attention:
            log.info("retrospec: sliding-window layers are verified with the dynamic verifier (%s asked)", mode)
            mode = "dynamic"
        if mode in ("graph", "compile") and _device(model).type != "cuda":
            raise ValueError(f"verify mode {mode!r} needs the model on a CUDA device")
        return mode

    def node_options(self, cap: int, batch: int = 1) -> tuple[int, ...]:
        """Tree sizes (nodes per row) a static verifier of ``batch`` rows captures, none above ``cap``.

        >>> VerifierConfig(slots=64).node_options(128, batch=1), VerifierConfig(slots=64).node_options(128, batch=64)
        ((64,), (0, 8))
        """
        top = min(self.slots, cap)
        if self.slot_options is not None:
            return tuple(sorted({min(s, top) for s in self.slot_options} | {top}))
        options = next(o for rows, o in SLOT_OPTIONS if batch <= rows)
        return tuple(sorted({min(s, top) if s is not None else top for s in options}))


class StepOutput:
    """One verification forward: the layout that went in and what came out.

    Attributes:
        layout: the host tables of the step (:class:`~retrospec.buffers.TreeLayout`).
        logits: ``[B, S, V]`` on the device.

    :meth:`host` waits for the forward and copies each slot's argmax ``int64 [B, S]`` (when
    the step asked for them, else ``None``) and top-k ``int64 [B, S, k]`` (or ``None``) to the
    host in one copy; until then the device may still be computing.
    """

    def __init__(self, layout: TreeLayout, logits: torch.Tensor, preds: np.ndarray | None = None,
                 topk: np.ndarray | None = None, fetch: Callable[[], tuple] | None = None):
        self.layout, self.logits = layout, logits
        self._fetch = fetch
        self._host = None if fetch is not None else (preds, topk)

    def host(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self._host is None:
            self._host = self._fetch()
        return self._host


class Verifier(Protocol):
    batch: int
    """Cache rows."""
    capacity: int
    """Cache indices per row (the last is scratch)."""
    flat: bool
    """Fixed-shape: a step costs the same for any tree that fits its slot count."""
    node_options: tuple[int, ...] | None
    """Tree sizes it can verify (``None``: any)."""

    def prefill(self, prompts: Sequence[np.ndarray], rows: Sequence[int], alone: bool = False) -> torch.Tensor:
        """Read ``prompts`` into cache ``rows``; the logits ``[len(rows), V]`` after each.
        ``alone``: no other cache row holds a live request (their caches may be overwritten)."""
        ...

    def verify(self, trees: Sequence[DraftTree], roots: Sequence[int], past: np.ndarray, nodes: int, predict: bool = True,
               topk: int = 0) -> StepOutput:
        """One forward of every row's root + tree (``nodes`` per row at most, padded);
        ``predict``: also each slot's argmax on the host, ``topk``: its top-k."""
        ...

    def keep(self, past: np.ndarray, accepted: Sequence[np.ndarray | None]) -> None:
        """Each row keeps the cache entries of its ``accepted`` slots (``None``: nothing)."""
        ...

    def rows_only(self, keep: Sequence[int]) -> bool:
        """Drop every row but ``keep`` (renumbered in order); ``False`` if it cannot."""
        ...


def _device(model) -> torch.device:
    return next(model.parameters()).device


def cache_bucket(length: int) -> int:
    """The static cache length serving requests of ``length`` tokens (prompt + new tokens +
    tree slots + scratch): the next power of two, at least 1,024 — a few sizes serve all.

    >>> cache_bucket(300), cache_bucket(1024), cache_bucket(1025)
    (1024, 1024, 2048)
    """
    return 1 << max(int(length - 1).bit_length(), 10)


def batch_bucket(rows: int, least: int = 1) -> int:
    """The static batch size serving ``rows`` live rows, at least ``least``.

    >>> batch_bucket(1), batch_bucket(3), batch_bucket(64), batch_bucket(1, least=2)
    (1, 4, 64, 2)
    """
    for size in BATCH_BUCKETS:
        if max(rows, least) <= size:
            return size
    raise ValueError(f"at most {BATCH_BUCKETS[-1]} rows per batch, got {rows}")


def move_tables(past: np.ndarray, accepted: Sequence[np.ndarray | None], width: int, scratch: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``src, dst [B, width]``: per row, the cache indices of its accepted slots and where
    they go (right behind its committed tokens); identity moves on ``scratch`` pad. ``None``
    when every row's accepted slots are already in place (a prefix of the tree).

    >>> move_tables(np.array([10, 4]), [np.array([0, 2, 3]), np.array([0, 1])], 4, 99)
    (array([[10, 12, 13, 99],
           [99, 99, 99, 99]]), array([[10, 11, 12, 99],
           [99, 99, 99, 99]]))
    """
    src = np.full((len(accepted), width), scratch, np.int64)
    dst = src.copy()
    moved = False
    for b, slots in enumerate(accepted):
        if slots is None or np.array_equal(slots, np.arange(slots.shape[0])):
            continue
        n = slots.shape[0]
        src[b, :n] = past[b] + slots
        dst[b, :n] = past[b] + np.arange(n)
        moved = True
    return (src, dst) if moved else None


PREFILL_OVERHEAD = {"cpu": 64, "cuda": 8192}
"""The fixed cost of one prefill forward, in padded prompt tokens, by device type: on a
CPU a forward costs about its tokens; on a GPU a small forward costs its launches, about
as much as thousands of tokens."""


def prefill_groups(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """The prompts (by index) of each prefill forward: a partition of the prompts sorted by
    length into runs that minimises the padded tokens read plus ``overhead`` per forward.

    >>> prefill_groups([769, 40, 611, 44], 64)
    [[1, 3], [2], [0]]
    >>> prefill_groups([769, 40, 611, 44], 8192)
    [[1, 3, 2, 0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted prompts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[order[j - 1]]  # the longest of a run ending at j
        for i in range(j):
            cost = best[i] + overhead + (j - i) * width
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _pad_prompts(prompts: Sequence[np.ndarray], device) -> tuple[torch.Tensor, list[int]]:
    lengths = [int(p.shape[0]) for p in prompts]
    width = max(lengths)
    ids = np.zeros((len(prompts), width), np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - p.shape[0] :] = p
    return torch.from_numpy(ids).to(device), lengths


class _Base:
    """What both verifiers share: the model, its cache and prefill."""

    flat = False
    node_options: tuple[int, ...] | None = None
    least_batch = 1
    """The smallest batch bucket it is built for (see :data:`COMPILED_ROWS`)."""

    def __init__(self, model, windows: dict[str, int | None], batch: int, capacity: int):
        self.model, self.windows = model, windows
        self.device, self.dtype = _device(model), next(model.parameters()).dtype
        self.batch, self.capacity = batch, capacity
        self.cache = RowCache(model.config, batch, capacity)
        self.ckw = cache_kwarg(model)
        self.keep_one = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
        self.pending: tuple[np.ndarray, np.ndarray] | None = None  # moves not applied yet

    def _flush(self) -> None:
        if self.pending is not None:
            src, dst = (torch.from_numpy(a).to(self.device) for a in self.pending)
            self.cache.move(src, dst)
            self.pending = None

    def prefill(self, prompts: Sequence[np.ndarray], rows: Sequence[int], alone: bool = False) -> torch.Tensor:
        """Read ``prompts`` into cache ``rows``; the logits ``[len(rows), V]`` after each.
        Prompts of very different lengths are read in groups of similar length
        (:func:`prefill_groups`), so that a short prompt does not pay for a long one's padding."""
        self._flush()
        groups = prefill_groups([int(p.shape[0]) for p in prompts], PREFILL_OVERHEAD.get(self.device.type, 64))
        if len(groups) == 1:
            return self._prefill(prompts, rows)
        out = [None] * len(prompts)
        for group in groups:
            logits = self._prefill([prompts[i] for i in group], [rows[i] for i in group])
            for j, i in enumerate(group):
                out[i] = logits[j]
        return torch.stack(out)

    def _prefill(self, prompts: Sequence[np.ndarray], rows: Sequence[int]) -> torch.Tensor:
        ids, lengths = _pad_prompts(prompts, self.device)
        if max(lengths) + 1 > self.capacity and not self.flat:
            self.cache.grow(2 * max(lengths) + 2)
            self.capacity = self.cache.capacity
        if max(lengths) + 1 > self.capacity:
            raise ValueError(f"a {max(lengths)}-token prompt does not fit a {self.capacity}-index cache")
        width = ids.shape[1]
        positions, index, mask = prefill_buffers(lengths, width, key_len=width, scratch=self.cache.scratch,
                                                 windows=self.windows, dtype=self.dtype, device=self.device)
        every = list(rows) == list(range(self.batch))
        self.cache.prepare(index, view=width, rows=None if every else torch.as_tensor(list(rows), device=self.device))
        out = self.model(
            input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **{self.ckw: self.cache}, **self.keep_one
        )
        return out.logits[:, -1]

    def keep(self, past: np.ndarray, accepted: Sequence[np.ndarray | None]) -> None:
        assert self.pending is None, "keep() twice without a forward in between"
        width = max((a.shape[0] for a in accepted if a is not None), default=1)
        self.pending = move_tables(past, accepted, self._move_width(width), self.cache.scratch)

    def _move_width(self, width: int) -> int:
        return width


class DynamicVerifier(_Base):
    """Exact-size inputs and eager forwards (see the module docstring)."""

    def verify(self, trees, roots, past, nodes, predict=True, topk=0) -> StepOutput:
        layout = tree_layout(trees, roots, past)
        width = layout.input_ids.shape[1]
        view = int(layout.past.max()) + width
        if view + 1 > self.capacity:  # only without a known max_length: grow
            self._flush()
            self.cache.grow(max(2 * self.capacity, view + 1))
            self.capacity = self.cache.capacity
        self._flush()
        to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        ids, positions, past_t = to(layout.input_ids), to(layout.positions), to(layout.past)
        mask = attention_mask(to(layout.sees), past_t, past_t, positions, positions, view, self.windows, self.dtype)
        self.cache.prepare(past_t[:, None] + torch.arange(width, device=self.device)[None], view)
        logits = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **{self.ckw: self.cache}).logits
        def fetch():
            if predict:
                return predictions(logits, topk)
            return None, logits.topk(topk, dim=-1).indices.cpu().numpy() if topk else None

        return StepOutput(layout, logits, fetch=fetch)

    def rows_only(self, keep: Sequence[int]) -> bool:
        self._flush()
        self.cache.select_rows(torch.as_tensor(list(keep), device=self.device))
        self.batch = self.cache.batch
        return True


def verify_step(v: StaticVerifier, ids: torch.Tensor, pos: torch.Tensor, sees: torch.Tensor, past: torch.Tensor,
                move_src: torch.Tensor, move_dst: torch.Tensor):
    """One fixed-shape verification of ``v``: last step's accepted slots moved into place,
    the mask laid out, the forward, argmax and top-k — ``(logits, preds, top)``. The
    per-step tensors are arguments, not attributes, so that a compile sees their sizes as
    dynamic from the first call."""
    v.cache.move(move_src, move_dst)
    mask = attention_mask(sees, past, past, pos, pos, v.capacity, v.windows, v.dtype)
    logits = v.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, **{v.ckw: v.cache}).logits
    preds = logits.argmax(dim=-1)
    top = logits.topk(v.topk, dim=-1).indices if v.topk else None
    return logits, preds, top


_compiled: list = []
_compiled_lock = threading.Lock()


def compiled_step():
    """:func:`verify_step` compiled once per process with dynamic shapes: every batch
    bucket (of at least :data:`COMPILED_ROWS`), slot count (at least
    :data:`COMPILED_SLOTS`) and cache capacity shares the compiled code instead of one
    compile of ~1-3 minutes per shape; each shape is then captured as its own CUDA graph."""
    with _compiled_lock:
        if not _compiled:
            import torch._dynamo  # its public config
            import torch.fx.experimental._config  # use_duck_shape, as dynamo names it

            # several models or cache layouts in one process are each a recompile
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compiled = torch.compile(verify_step, dynamic=True)

            def step(*args):
                # no duck sizing: it gives sizes that happen to be equal one symbol (a step's
                # slots and the move tables' width, say), and each coincidence that changes
                # is a recompile; only our step's traces see this setting
                with torch.fx.experimental._config.patch(use_duck_shape=False):
                    return compiled(*args)

            _compiled.append(step)
        return _compiled[0]


class _Graph:
    """The fixed-shape step of one slot count: static inputs, the step, its captured graph."""

    def __init__(self, verifier: StaticVerifier, slots: int):
        v, dev = verifier, verifier.device
        self.v, self.slots = v, slots
        self.ids = torch.zeros(v.batch, slots, dtype=torch.long, device=dev)
        self.pos = torch.zeros(v.batch, slots, dtype=torch.long, device=dev)
        self.sees = torch.zeros(v.batch, slots, slots, dtype=torch.bool, device=dev)
        self.index = torch.zeros(v.batch, slots, dtype=torch.long, device=dev)
        self.host = TreeLayout(*(torch.from_numpy(np.zeros(shape, dtype)).pin_memory().numpy() if v.pin else np.zeros(shape, dtype)
                                 for shape, dtype in [((v.batch, slots), np.int64), ((v.batch, slots), np.int64),
                                                      ((v.batch, slots), np.int64), ((v.batch, slots, slots), np.bool_),
                                                      ((v.batch,), np.int64), ((v.batch,), np.int64)]))
        self.host_t = [torch.from_numpy(a) for a in (self.host.input_ids, self.host.positions, self.host.sees)]
        self.out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.result: torch.Tensor | None = None  # pinned: the last step's argmax and top-k
        self.graph = None
        self.fn = compiled_step() if v.compile else verify_step
        self.args = (self.ids, self.pos, self.sees, v.past, v.move_src, v.move_dst)

    def copy_back(self, both: torch.Tensor) -> torch.cuda.Event:
        """Queue the copy of the step's argmax and top-k to pinned host memory (``result``,
        overwritten by this shape's next step); the event that marks it done."""
        if self.result is None or self.result.shape != both.shape:
            self.result = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
        self.result.copy_(both, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return event

    def upload(self, past) -> None:
        """Queue the copies of the host tables (``host``) and each row's cache length to the
        step's device inputs; the pinned tables must not change until the copies have run."""
        for dev, host in zip((self.ids, self.pos, self.sees), self.host_t):
            dev.copy_(host, non_blocking=True)
        self.v.past.copy_(torch.from_numpy(np.asarray(past, np.int64)), non_blocking=True)

    def prepare(self) -> None:
        """Each row's slots write right behind its committed tokens."""
        v = self.v
        torch.add(v.past[:, None], v.arange[: self.slots][None], out=self.index)
        v.cache.prepare(self.index, view=v.capacity)

    def run(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        v = self.v
        self.prepare()
        if not v.graph:
            return self.fn(v, *self.args)
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.out

    def capture(self) -> None:
        """Warm up on a side stream, then capture one verification (identity moves: a
        capture runs the step three times, and moves are not idempotent)."""
        v = self.v
        v.move_src.fill_(v.cache.scratch)
        v.move_dst.fill_(v.cache.scratch)
        stream = torch.cuda.Stream(v.device)
        stream.wait_stream(torch.cuda.current_stream(v.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(v, *self.args)
        torch.cuda.current_stream(v.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.fn(v, *self.args)
        self.graph = graph
        log.info("retrospec: captured the %d x %d-slot verification as a CUDA graph (cache %d)", v.batch, self.slots, v.capacity)


class StaticVerifier(_Base):
    """Fixed shapes, optionally captured as CUDA graphs (see the module docstring).

    Args:
        batch: cache rows (a bucket; rows past the live ones are padding).
        capacity: cache indices per row (prompt + new tokens + slots + scratch must fit).
        node_options: tree sizes (nodes per row) it can verify, one fixed-shape step each.
        graph: capture each step as a CUDA graph on first use; compile: ``torch.compile``
            each step first.
        topk: top-k next tokens computed inside the step (for Token Recycling; 0: none).
    """

    flat = True

    def __init__(self, model, windows, batch: int, capacity: int, node_options: Sequence[int], *, graph: bool = False,
                 compile: bool = False, topk: int = 0):
        super().__init__(model, windows, batch, capacity)
        if graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.graph, self.compile, self.topk = graph, compile, topk
        self.node_options = tuple(sorted({int(n) for n in node_options}))
        self.pin = self.device.type == "cuda"
        least = COMPILED_SLOTS if compile else 1
        if compile and batch < COMPILED_ROWS:
            raise ValueError(f"a compiled verifier takes at least {COMPILED_ROWS} rows, got {batch}")
        self.least_batch = COMPILED_ROWS if compile else 1
        self.smax = smax = max(self.node_options[-1] + 1, least)
        self.past = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.arange = torch.arange(smax, device=self.device)
        self.move_src = torch.full((batch, smax), capacity - 1, dtype=torch.long, device=self.device)
        self.move_dst = self.move_src.clone()
        self.steps = {n: _Graph(self, max(n + 1, least)) for n in self.node_options}

    def _move_width(self, width: int) -> int:
        return self.smax

    # -- prefill ---------------------------------------------------------------------
    prefill_mode = "auto"
    """``auto``: a prefill of rows that have the cache to themselves runs as chained steps of
    the widest captured graph where that costs less than the eager forward (as last measured;
    graphs only); ``chunked`` or ``eager``: always that way (tests)."""
    eager_prefill_s: float | None = None
    """Seconds of this verifier's last eager prefill, synchronised (its logits are read at once)."""

    def prefill(self, prompts: Sequence[np.ndarray], rows: Sequence[int], alone: bool = False) -> torch.Tensor:
        if alone and self._chunked(prompts):
            self._flush()
            return self._chunked_prefill(prompts, rows)
        start = time.perf_counter()
        out = super().prefill(prompts, rows)
        if self.pin:
            torch.cuda.synchronize(self.device)
        self.eager_prefill_s = time.perf_counter() - start
        return out

    def _chunked(self, prompts: Sequence[np.ndarray]) -> bool:
        """Whether to read ``prompts`` as chained graph steps (see ``prefill_mode``)."""
        slots = self.steps[self.node_options[-1]].slots
        longest = max(int(p.shape[0]) for p in prompts)
        if longest + slots + 1 > self.capacity:  # the null rows' writes would reach real tokens
            return False
        if self.prefill_mode != "auto":
            return self.prefill_mode == "chunked"
        cost = getattr(self, "step_cost", None)
        if not self.graph or cost is None or self.eager_prefill_s is None:
            return False
        return -(-longest // slots) * cost.seconds[-1] < self.eager_prefill_s

    def _chunked_prefill(self, prompts: Sequence[np.ndarray], rows: Sequence[int]) -> torch.Tensor:
        """Each prompt as a chain of tree steps of the widest captured graph: chunk ``c`` of a
        row holds its tokens ``c*S .. c*S + S - 1`` over its cache of the earlier chunks. A
        row with nothing left to read (its prompt done, or a free row) is a null row whose
        writes land in the last ``S`` indices before the scratch, which nothing live uses:
        the caller vouches that no other row holds a live request (``alone``)."""
        step = self.steps[self.node_options[-1]]
        slots, host = step.slots, step.host
        tail = self.capacity - slots - 1
        lengths = [int(p.shape[0]) for p in prompts]
        chain = np.tril(np.ones((slots, slots), np.bool_))
        alone_ = np.eye(slots, dtype=np.bool_)
        out: list[torch.Tensor | None] = [None] * len(prompts)
        copied = None
        for lo in range(0, max(lengths), slots):
            if copied is not None:
                copied.synchronize()  # the last chunk's uploads have left the pinned buffers
            past = np.full(self.batch, tail, np.int64)
            host.input_ids[:] = 0
            host.positions[:] = 0
            host.sees[:] = alone_
            ends = []
            for i, (prompt, row) in enumerate(zip(prompts, rows)):
                k = min(slots, lengths[i] - lo)
                if k <= 0:
                    continue
                host.input_ids[row, :k] = prompt[lo : lo + k]
                host.positions[row, :k] = lo + np.arange(k)
                host.positions[row, k:] = lo + k - 1
                host.sees[row, :k, :k] = chain[:k, :k]
                past[row] = lo
                if lo + k == lengths[i]:
                    ends.append((i, row, k - 1))
            step.upload(past)
            if self.pin:
                copied = torch.cuda.Event()
                copied.record()
            logits, _, _ = step.run()
            for i, row, slot in ends:
                out[i] = logits[row, slot].clone()
        return torch.stack(out)

    def warm(self) -> None:
        """Build every step now (capture its graph, compile it) and time each one — the
        prior of the budget's cost model — on the empty cache, before any request: a step
        run later outside a request would overwrite the rows' keys and values."""
        from retrospec.verify.step_cost import time_static_steps

        if self.compile:  # one eager step first: the cache allocates its tensors, and the
            first = next(iter(self.steps.values()))  # compile never sees them missing
            self.past.zero_()
            first.prepare()
            verify_step(self, *first.args)
        for step in self.steps.values():
            self.past.zero_()
            step.run()
        self.step_cost = time_static_steps(self)
        self.live_cost = LiveCost({self.batch: self.step_cost})  # corrected by the requests it serves

    def verify(self, trees, roots, past, nodes, predict=True, topk=0) -> StepOutput:
        if topk > self.topk:
            raise ValueError(f"this verifier computes the top-{self.topk}, {topk} asked")
        nodes = min(n for n in self.node_options if n >= nodes) if nodes <= self.node_options[-1] else None
        if nodes is None:
            raise ValueError(f"a tree of more than {self.node_options[-1]} nodes does not fit this verifier")
        step = self.steps[nodes]
        rows = len(trees)
        if rows != self.batch:
            raise ValueError(f"this verifier takes {self.batch} rows, got {rows}")
        width = step.slots
        if int(np.max(past)) + width + 1 > self.capacity:
            raise ValueError(f"the static cache ({self.capacity}) is full at {int(np.max(past))} tokens")
        # 1) host: lay the trees out in the pinned buffers; 2) upload; 3) replay or run
        layout = tree_layout(trees, roots, past, width, out=step.host)
        if self.pending is not None:
            self.move_src[:, : self.pending[0].shape[1]].copy_(torch.from_numpy(self.pending[0]), non_blocking=True)
            self.move_dst[:, : self.pending[1].shape[1]].copy_(torch.from_numpy(self.pending[1]), non_blocking=True)
            self.pending = None
            moved = True
        else:
            moved = False
        step.upload(past)
        logits, preds, top = step.run()
        if moved:
            self.move_src.fill_(self.cache.scratch)
            self.move_dst.fill_(self.cache.scratch)
        if not (predict or topk):
            return StepOutput(layout, logits, fetch=lambda: (None, None))
        both = torch.cat([preds[..., None], top], dim=-1) if top is not None else preds[..., None]
        if self.pin:  # queue the copy behind the forward; wait for this step's work only, not
            done = step.copy_back(both)  # for another verifier's forward queued after it
        else:
            result = both.cpu().numpy()
            done = None

        def fetch():
            if done is not None:
                done.synchronize()
            arr = step.result.numpy() if done is not None else result
            return arr[..., 0] if predict else None, arr[..., 1 : 1 + topk] if topk else None

        return StepOutput(layout, logits, fetch=fetch)

    def rows_only(self, keep: Sequence[int]) -> bool:
        return False  # fixed shapes: finished rows stay as padding (or the batch moves to a smaller bucket)


class VerifierPool:
    """Static verifiers of one model kept across requests (their CUDA graphs stay
    captured), each lent to one request at a time: a verifier holds its requests' KV cache,
    so two requests running at once get two verifiers.

    >>> pool = VerifierPool()
    >>> a = pool.acquire("k", object); b = pool.acquire("k", object)   # both in use: two
    >>> a is not b, len(pool)
    (True, 2)
    >>> pool.release(a); pool.acquire("k", object) is a                 # returned: reused
    True
    """

    _pools: ClassVar[weakref.WeakKeyDictionary[object, VerifierPool]] = weakref.WeakKeyDictionary()
    _pools_lock = threading.Lock()

    def __init__(self) -> None:
        self._free: dict = {}
        self._keys: dict[int, tuple] = {}  # id(verifier) -> (key, verifier)
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()  # one capture or compile at a time

    @classmethod
    def for_model(cls, model) -> VerifierPool:
        """The pool of ``model`` (one per model object, shared by every thread)."""
        with cls._pools_lock:
            pool = cls._pools.get(model)
            if pool is None:
                pool = cls._pools[model] = VerifierPool()
            return pool

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


def make_verifier(model, config: VerifierConfig, windows: dict[str, int | None], rows: int, length: int, cap: int, topk: int = 0):
    """The verifier of ``config`` for ``rows`` rows of up to ``length`` tokens (prompt + new
    tokens) and trees of up to ``cap`` nodes. Static verifiers come from the model's
    :class:`VerifierPool` (give them back with :func:`release_verifier`)."""
    mode = config.resolved(model, windows)
    if mode == "dynamic":
        return DynamicVerifier(model, windows, rows, length + cap + 2)
    batch = batch_bucket(rows, COMPILED_ROWS if mode == "compile" else 1)
    options = config.node_options(cap, batch)
    capacity = cache_bucket(length + options[-1] + 2)
    if config.capacity is not None:
        if config.capacity < length + options[-1] + 2:
            raise ValueError(f"VerifierConfig.capacity {config.capacity} is too small for {length} tokens + {options[-1] + 2} slots")
        capacity = int(config.capacity)
    graph = mode in ("graph", "compile")

    def build() -> StaticVerifier:
        start = time.perf_counter()
        verifier = StaticVerifier(model, windows, batch, capacity, options, graph=graph, compile=mode == "compile", topk=topk)
        verifier.warm()
        log.info("retrospec: built a %s verifier of %d rows x %s nodes (cache %d) in %.2f s",
                 mode, batch, options, capacity, time.perf_counter() - start)
        return verifier

    return VerifierPool.for_model(model).acquire((mode, batch, capacity, options, topk), build)


def release_verifier(model, verifier) -> None:
    """Give a verifier from :func:`make_verifier` back (dynamic ones are simply dropped)."""
    if isinstance(verifier, StaticVerifier):
        VerifierPool.for_model(model).release(verifier)
