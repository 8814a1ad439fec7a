"""How many draft nodes to verify per step, from what a step costs on this hardware.

Verifying ``n`` tokens in one forward costs ``t(n)``: on a GPU ``t`` is flat up to some
``n``, on a CPU it grows (see MODELS.md: ×1.9 at 16 tokens, ×3.6 at 64 for SmolLM2 fp32).
Given the scores of a fused tree, sorted best first, keeping the top ``B`` nodes yields
``1 + sum(scores[:B])`` expected tokens per step (a node's score is the probability that its
whole path is accepted; the ``1`` is the bonus token). ``choose_budget`` picks the ``B``
that maximises expected tokens per second, every step.

``t(n)`` is measured once per model, device, dtype and thread count by
:func:`measure_step_cost` and cached as JSON under the retrospec cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from retrospec.compat import accepts, cache_kwarg
from retrospec.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


@dataclass(frozen=True)
class StepCost:
    """Measured seconds of one forward of ``n`` new tokens, interpolated linearly in ``n``.

    >>> cost = StepCost(sizes=(1, 9), seconds=(0.01, 0.02))
    >>> round(cost(5), 4), round(cost(17), 4)
    (0.015, 0.03)
    """

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    context: int = 0
    device: str = ""

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.seconds) or len(self.sizes) < 2:
            raise ValueError(f"need >= 2 matching sizes and seconds, got {self.sizes}, {self.seconds}")
        if list(self.sizes) != sorted(self.sizes):
            raise ValueError(f"sizes must ascend, got {self.sizes}")

    def __call__(self, n: float | np.ndarray) -> np.ndarray | float:
        sizes = np.asarray(self.sizes, np.float64)
        secs = np.asarray(self.seconds, np.float64)
        # monotone: a larger forward never counts as cheaper than a smaller one
        secs = np.maximum.accumulate(secs)
        x = np.asarray(n, np.float64)
        inside = np.interp(x, sizes, secs)
        slope = (secs[-1] - secs[-2]) / max(sizes[-1] - sizes[-2], 1e-9)
        out = np.where(x > sizes[-1], secs[-1] + slope * (x - sizes[-1]), inside)
        return float(out) if out.ndim == 0 else out


def choose_budget(scores: np.ndarray, cost: StepCost, max_budget: int) -> int:
    """The number of top-scored nodes that maximises expected tokens per second.

    ``scores`` are path scores in any order; the verified forward holds the root plus ``B``
    nodes.

    >>> cost = StepCost(sizes=(1, 2, 3), seconds=(1.0, 1.0, 2.0))   # the 2nd node is free, the 3rd not
    >>> choose_budget(np.array([0.9, 0.5]), cost, 8)
    1
    """
    if scores.shape[0] == 0 or max_budget <= 0:
        return 0
    best_first = np.sort(scores)[::-1][:max_budget].astype(np.float64)
    budgets = np.arange(best_first.shape[0] + 1)
    expected = 1.0 + np.concatenate([[0.0], np.cumsum(best_first)])
    rate = expected / cost(budgets + 1.0)
    return int(np.argmax(rate))


def _fingerprint(model) -> str:
    param = next(model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    key = json.dumps(
        {
            "class": type(model).__name__,
            "name": str(getattr(model.config, "name_or_path", "")),
            "params": n_params,
            "dtype": str(param.dtype),
            "device": str(param.device),
            "device_name": torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "attn": str(getattr(model.config, "_attn_implementation", "")),
            "torch": torch.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_step_cost(
    model, *, sizes: tuple[int, ...] = DEFAULT_SIZES, context: int = 256, repeats: int = 5
) -> StepCost:
    """Time one forward of each size in ``sizes`` behind ``context`` cached tokens.

    Takes the fastest of ``repeats`` runs: interference from other processes only ever
    adds time, so the minimum is the most repeatable estimate of the model's own cost.
    """
    from retrospec.verify.cache import new_cache  # local: kvcache imports heavy transformers bits

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    vocab = model.config.get_text_config(decoder=True).vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, context + max(sizes)), generator=gen).to(device)
    cache = new_cache()
    ckw = cache_kwarg(model)
    model(input_ids=ids[:, :context], **{ckw: cache}, use_cache=True, **({"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}))
    seconds = []
    for n in sizes:
        mask = torch.zeros(1, 1, n, context + n, dtype=dtype, device=device)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
        mask[0, 0, :, context:].masked_fill_(causal, torch.finfo(dtype).min)
        pos = torch.arange(context, context + n, device=device)[None]
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            _sync(device)
            start = time.perf_counter()
            model(input_ids=ids[:, context : context + n], attention_mask=mask, position_ids=pos, **{ckw: cache}, use_cache=True)
            _sync(device)
            times.append(time.perf_counter() - start)
            cache.crop(-n)
        seconds.append(min(times[1:]))
    return StepCost(sizes=tuple(sizes), seconds=tuple(seconds), context=context, device=str(device))


def step_cost_for(model, *, refresh: bool = False) -> StepCost:
    """The cached step-cost profile of ``model`` on its device, measured on first use."""
    path = cache_dir("step_cost") / f"{_fingerprint(model)}.json"
    if path.exists() and not refresh:
        try:
            data = json.loads(path.read_text())
            return StepCost(sizes=tuple(data["sizes"]), seconds=tuple(data["seconds"]), context=data["context"], device=data["device"])
        except (ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable step-cost cache %s (%s); measuring again", path, err)
    log.info("measuring step cost of %s on %s (once per model and device)", type(model).__name__, next(model.parameters()).device)
    cost = measure_step_cost(model)
    write_atomic(path, json.dumps(asdict(cost)).encode())
    log.info("step cost: %s", ", ".join(f"{n}:{s * 1e3:.1f}ms" for n, s in zip(cost.sizes, cost.seconds)))
    return cost


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing (see :func:`retrospec.datastores.files.write_atomic`)."""
    from retrospec.datastores.files import write_atomic as write

    write(path, data)
