"""Measuring what a verification step costs on this model, device and machine.

:func:`measure_step_cost` times the forwards a :class:`~retrospec.verify.verifiers.DynamicVerifier`
runs — ``batch`` rows of ``n`` tree tokens behind a cached context, built by
:func:`retrospec.buffers.tree_buffers` — for a range of ``n``. :func:`step_cost_for` keeps
the result as a JSON file under the retrospec cache, keyed by model, dtype, device, thread
count and batch size, with three safeguards, because a wrong cost makes the budget slower
than plain decoding:

* a measurement taken while the machine was busy (other processes on the cores, or
  repeats that disagree) is used by this process but never written, so it cannot outlive
  the load;
* a cached measurement expires after ``MAX_AGE_DAYS`` and can be refreshed on request
  (``retrospec generate/bench/demo --remeasure``);
* it is only a prior: :class:`~retrospec.drafting.budget.LiveCost` corrects it with the
  step times measured while decoding.

Static verifiers measure themselves instead (:func:`time_static_steps`: replays of their
captured steps).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import asdict
from pathlib import Path

import torch

from retrospec.buffers import layer_windows, tree_buffers
from retrospec.compat import accepts, cache_kwarg
from retrospec.datastores.files import write_atomic
from retrospec.drafting.budget import LiveCost, StepCost
from retrospec.paths import cache_dir
from retrospec.tree import DraftTree
from retrospec.verify.attention import tree_attention, tree_attention_name
from retrospec.verify.cache import RowCache

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
MAX_AGE_DAYS = 7
BUSY_SPREAD = 1.6
"""Repeats whose median exceeds their minimum by this factor mean another process interfered."""


def fingerprint(model, batch: int = 1) -> str:
    """A short id of what a step's cost depends on."""
    param = next(model.parameters())
    key = json.dumps(
        {
            "class": type(model).__name__,
            "name": str(getattr(model.config, "name_or_path", "")),
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(param.dtype),
            "device": str(param.device),
            "device_name": torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "attn": str(tree_attention_name(getattr(model.config, "_attn_implementation", ""))),  # what steps run with
            "torch": torch.__version__,
            "batch": batch,
            "layout": 2,  # the RowCache verifier's forwards
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_busy() -> bool:
    """Whether other processes are keeping this machine's cores busy (1-minute load)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return False
    return load > (os.cpu_count() or 1) + 0.5


@torch.no_grad()
def measure_step_cost(model, *, batch: int = 1, sizes: tuple[int, ...] = DEFAULT_SIZES, context: int = 256, repeats: int = 5) -> StepCost:
    """Time one verification forward of ``batch`` rows with each tree size in ``sizes``
    (chains: the mask's shape does not change the cost) behind ``context`` cached tokens.

    Takes the fastest of ``repeats`` runs: interference from other processes only ever
    adds time. The result says whether the machine looked busy meanwhile. The forwards run
    with the attention tree steps run with (:func:`~retrospec.verify.attention.tree_attention`).
    """
    with tree_attention(model):
        return _measure(model, batch, sizes, context, repeats)


def _measure(model, batch: int, sizes: tuple[int, ...], context: int, repeats: int) -> StepCost:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    vocab = model.config.get_text_config(decoder=True).vocab_size
    windows = layer_windows(model.config)
    gen = torch.Generator().manual_seed(0)
    cache = RowCache(model.config, batch, context + max(sizes) + 2)
    ckw = cache_kwarg(model)
    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    cache.prepare(torch.arange(context, device=device).expand(batch, -1), view=context)
    mask = torch.zeros(batch, 1, context, context, dtype=dtype, device=device)
    mask.masked_fill_(torch.ones(context, context, dtype=torch.bool, device=device).triu(1), torch.finfo(dtype).min)
    model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(context, device=device).expand(batch, -1),
          use_cache=True, **{ckw: cache}, **({"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}))
    busy = machine_busy() and device.type == "cpu"
    seconds = []
    for n in sizes:
        chain = DraftTree.from_paths([torch.randint(0, vocab, (n - 1,), generator=gen).tolist()]) if n > 1 else DraftTree.empty()
        buffers = tree_buffers([chain] * batch, [1] * batch, [context] * batch, windows=windows, dtype=dtype, device=device)
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            cache.prepare(buffers.cache_index, view=context + n)
            _sync(device)
            start = time.perf_counter()
            model(input_ids=buffers.input_ids, attention_mask=buffers.attention_mask, position_ids=buffers.position_ids,
                  use_cache=True, **{ckw: cache})
            _sync(device)
            times.append(time.perf_counter() - start)
        timed = sorted(times[1:])
        busy = busy or timed[len(timed) // 2] > BUSY_SPREAD * timed[0]
        seconds.append(timed[0])
    busy = busy or (machine_busy() and device.type == "cpu")
    return StepCost(sizes=tuple(sizes), seconds=tuple(seconds), context=context, device=str(device), batch=batch,
                    measured_at=time.time(), loaded=busy)


def cache_path(model, batch: int = 1) -> Path:
    """Where the step-cost prior of ``model`` for ``batch`` rows is kept."""
    return cache_dir("step_cost") / f"{fingerprint(model, batch)}.json"


def store(path: Path, cost: StepCost) -> None:
    """Write a step-cost prior (atomically) where :func:`step_cost_for` reads it."""
    write_atomic(path, json.dumps(asdict(cost)).encode())


def step_cost_for(model, *, batch: int = 1, refresh: bool = False, max_size: int = max(DEFAULT_SIZES)) -> StepCost:
    """The cached step-cost prior of ``model`` for ``batch`` rows, measured when missing,
    expired, unreadable or ``refresh`` is asked (see the module docstring)."""
    path = cache_path(model, batch)
    if path.exists() and not refresh:
        try:
            data = json.loads(path.read_text())
            cost = StepCost(sizes=tuple(data["sizes"]), seconds=tuple(data["seconds"]), context=int(data["context"]),
                            device=str(data["device"]), batch=int(data.get("batch", batch)), measured_at=float(data.get("measured_at", 0)))
            if time.time() - cost.measured_at < MAX_AGE_DAYS * 86400:
                return cost
            log.info("step cost cache %s is older than %d days; measuring again", path, MAX_AGE_DAYS)
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError, MemoryError) as err:  # what a damaged file can raise
            log.warning("ignoring unreadable step-cost cache %s (%s); measuring again", path, f"{type(err).__name__}: {str(err)[:120]}")
    log.info("measuring the step cost of %s on %s, %d row(s)", type(model).__name__, next(model.parameters()).device, batch)
    # a batch's large trees never pay on a CPU and take long to time: measure the sizes a
    # batch of this many rows may choose (up to ~256 tokens a forward); the cost model
    # extrapolates beyond them
    top = max(min(max_size, 256 // batch), 8) if batch > 1 else max(max_size, 2)
    sizes = tuple(n for n in DEFAULT_SIZES if n <= top)
    cost = measure_step_cost(model, batch=batch, sizes=sizes)
    summary = ", ".join(f"{n}:{s * 1e3:.1f}ms" for n, s in zip(cost.sizes, cost.seconds))
    if cost.loaded:
        log.warning("the machine was busy while measuring the step cost (%s): using it for this process only", summary)
    else:
        store(path, cost)
        log.info("step cost: %s", summary)
    return cost


def time_static_steps(verifier, repeats: int = 5) -> StepCost:
    """A static verifier's prior: the fastest of ``repeats`` runs of each captured step,
    on its own (empty) cache, outside any request."""
    device = verifier.device
    sizes, seconds = [], []
    for nodes, step in sorted(verifier.steps.items()):
        verifier.past.zero_()
        times = []
        for _ in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            step.run()
            _sync(device)
            times.append(time.perf_counter() - start)
        sizes.append(nodes + 1)
        seconds.append(min(times[1:]))
    if len(sizes) == 1:  # one slot count: flat by construction
        sizes, seconds = [1, sizes[0]] if sizes[0] > 1 else [1, 2], [seconds[0], seconds[0]]
    return StepCost(sizes=tuple(sizes), seconds=tuple(seconds), device=str(device), batch=verifier.batch, measured_at=time.time())


_live: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()
_live_lock = threading.Lock()


def live_cost(model, kind: str, prior_for, refresh: bool = False) -> LiveCost:
    """The :class:`LiveCost` of ``model`` for one verifier ``kind`` (shared by every request
    of this process); ``prior_for(batch)`` measures a prior on first use."""
    with _live_lock:
        costs = _live.setdefault(model, {})
        if refresh or kind not in costs:
            costs[kind] = LiveCost(prior_for=prior_for)
        return costs[kind]


def dynamic_cost(model, refresh: bool = False, max_size: int = max(DEFAULT_SIZES)) -> LiveCost:
    """The live cost of ``model``'s dynamic verifier (priors measured per batch size)."""
    return live_cost(model, "dynamic", lambda batch: step_cost_for(model, batch=batch, refresh=refresh, max_size=max_size), refresh)


def cached_costs() -> list[Path]:
    """The step-cost files of this machine (for ``--remeasure`` and tests)."""
    return sorted(cache_dir("step_cost").glob("*.json"))


def forget_costs(model) -> None:
    """Drop what this process and the cache know of ``model``'s step cost (``--remeasure``):
    the next request measures again."""
    from retrospec.verify.verifiers import BATCH_BUCKETS

    with _live_lock:
        _live.pop(model, None)
    for batch in BATCH_BUCKETS:
        cache_path(model, batch).unlink(missing_ok=True)


def reset_live_costs() -> None:
    """Forget every live cost of this process (the next request starts from the priors on
    disk again); for tests and tools that change those files."""
    with _live_lock:
        _live.clear()
