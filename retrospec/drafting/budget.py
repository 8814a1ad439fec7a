"""How many draft nodes each row verifies per step, from what a step costs right now.

Verifying ``B`` rows of ``n`` tokens each in one forward costs ``t(B, n)``: on a GPU ``t``
is nearly flat in ``n`` at small ``B`` and grows with ``B × n``; on a CPU it grows with the
tokens from the start (MODELS.md: ×1.9 at 16 tokens, ×3.6 at 64 for SmolLM2 fp32). A node's
score is the probability that its whole path is accepted, so a row that keeps its ``k``
best nodes commits ``1 + sum(scores[:k])`` tokens on average (the ``1`` is the bonus token).
Rows of a batch are padded to one slot count, so each step picks the ``k`` that maximises
the batch's expected tokens per second — smaller trees as the batch grows, down to ``0``
(plain decoding) when speculating would not pay.

The cost comes from a prior (:class:`StepCost`, measured on this model and device by
:mod:`retrospec.verify.step_cost`, or by timing a static verifier's graphs) corrected by
the step times measured while decoding (:class:`LiveCost`): a machine that gets busier,
or a GPU shared with another process, shrinks the trees.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepCost:
    """Measured seconds of one forward of ``n`` new tokens per row (``batch`` rows),
    interpolated linearly in ``n`` (and extrapolated past the largest size); not forced to
    grow with ``n``, because on some kernels it does not.

    >>> cost = StepCost(sizes=(1, 9), seconds=(0.01, 0.02))
    >>> round(cost(5), 4), round(cost(17), 4)
    (0.015, 0.03)
    """

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    context: int = 0
    device: str = ""
    batch: int = 1
    """Rows of the measured forwards."""
    measured_at: float = 0.0
    """Unix time of the measurement (cached costs expire)."""
    loaded: bool = False
    """The machine was busy while measuring: use it, but never cache it."""

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.seconds) or len(self.sizes) < 2:
            raise ValueError(f"need >= 2 matching sizes and seconds, got {self.sizes}, {self.seconds}")
        if list(self.sizes) != sorted(self.sizes):
            raise ValueError(f"sizes must ascend, got {self.sizes}")
        if not all(np.isfinite(s) and s > 0 for s in self.seconds):
            raise ValueError(f"seconds must be positive, got {self.seconds}")

    def __call__(self, n: float | np.ndarray) -> np.ndarray | float:
        sizes = np.asarray(self.sizes, np.float64)
        # as measured, not made monotone: on a CPU a forward of 4 tokens can beat one of 2
        # (torch 2.13, SmolLM2 fp32, 2 cores: 52, 87, 94, 70 ms for 1-4 tokens, GEMM kernel
        # choice), and a monotone envelope priced every tree up to 16 nodes like the 2-token one
        secs = np.asarray(self.seconds, np.float64)
        x = np.asarray(n, np.float64)
        inside = np.interp(x, sizes, secs)
        slope = (secs[-1] - secs[-2]) / max(sizes[-1] - sizes[-2], 1e-9)
        out = np.where(x > sizes[-1], secs[-1] + slope * (x - sizes[-1]), inside)
        return float(out) if out.ndim == 0 else out


class LiveCost:
    """Step seconds ``cost(slots, batch)``: the priors, corrected by measured steps.

    * A ``(batch, slots)`` cell observed within the last ``fresh`` steps of that batch
      size answers with its own moving average (half-life ``half_life`` observations).
    * Any other cell answers with its prior times the batch size's recent ratio of
      measured to prior time — the machine's current speed, host work included.

    Thread-safe; one per model and verifier kind, shared by every request.

    >>> live = LiveCost({1: StepCost(sizes=(1, 9), seconds=(0.01, 0.02))})
    >>> live(5, 1)
    0.015
    >>> for _ in range(20): live.observe(9, 1, 0.04)    # the machine got twice as slow
    >>> round(live(9, 1), 3), round(live(1, 1), 3)       # observed cell; prior x ratio
    (0.04, 0.02)
    """

    def __init__(self, priors: dict[int, StepCost] | None = None, *, half_life: float = 8.0, fresh: int = 64,
                 prior_for: Callable[[int], StepCost] | None = None):
        self.priors = dict(priors or {})
        self.prior_for = prior_for
        self.alpha = 1.0 - 0.5 ** (1.0 / half_life)
        self.fresh = fresh
        self._cells: dict[tuple[int, int], tuple[float, int]] = {}  # (batch, slots) -> (seconds, step seen)
        self._ratio: dict[int, float] = {}
        self._steps: dict[int, int] = {}
        self._lock = threading.Lock()

    def prior(self, batch: int) -> StepCost:
        """The prior of ``batch`` rows: its own, else measured now (``prior_for``), else the
        nearest larger one measured (or the largest, scaled by rows)."""
        with self._lock:
            found = self.priors.get(batch)
        if found is not None:
            return found
        if self.prior_for is not None:
            found = self.prior_for(batch)
            with self._lock:
                self.priors[batch] = found
            return found
        if not self.priors:
            raise ValueError("LiveCost has no prior step cost")
        larger = [b for b in self.priors if b >= batch]
        if larger:
            return self.priors[min(larger)]
        top = max(self.priors)
        base = self.priors[top]
        return StepCost(base.sizes, tuple(s * batch / top for s in base.seconds), base.context, base.device, batch)

    def __call__(self, slots: float | np.ndarray, batch: int = 1) -> float | np.ndarray:
        """Seconds of a step of ``slots`` per row (a number, or an array of them at once)."""
        x = np.asarray(slots)
        with self._lock:
            step = self._steps.get(batch, 0)
            ratio = self._ratio.get(batch, 1.0)
            if x.ndim == 0:  # one size (the loop's hot path): one lookup, not a scan of the cells
                cell = self._cells.get((batch, int(x)))
                fresh = {int(x): cell[0]} if cell is not None and step - cell[1] <= self.fresh else {}
            else:
                fresh = {s: sec for (b, s), (sec, seen) in self._cells.items() if b == batch and step - seen <= self.fresh}
        if x.ndim == 0:
            found = fresh.get(int(x))
            return found if found is not None else float(self.prior(batch)(x)) * ratio
        out = np.asarray(self.prior(batch)(x.astype(np.float64)), np.float64) * ratio
        for s, sec in fresh.items():
            out[x == s] = sec
        return out

    def stale(self, slots: int, batch: int) -> bool:
        """Whether the ``(batch, slots)`` cell has no observation within the last ``fresh``
        steps of that batch size (its cost is then the prior's shape, scaled)."""
        with self._lock:
            cell = self._cells.get((batch, int(slots)))
            return cell is None or self._steps.get(batch, 0) - cell[1] > self.fresh

    def observe(self, slots: int, batch: int, seconds: float) -> None:
        """Record the measured wall time of one step (host work included)."""
        if not (np.isfinite(seconds) and seconds > 0):
            return
        expected = float(self.prior(batch)(slots))
        with self._lock:
            step = self._steps[batch] = self._steps.get(batch, 0) + 1
            key = (batch, int(slots))
            old = self._cells.get(key)
            avg = seconds if old is None or step - old[1] > self.fresh else old[0] + self.alpha * (seconds - old[0])
            self._cells[key] = (avg, step)
            r = seconds / expected
            old_r = self._ratio.get(batch)
            self._ratio[batch] = r if old_r is None else old_r + self.alpha * (r - old_r)


def expected_tokens(row_scores: Sequence[np.ndarray], nodes: int | np.ndarray,
                    weights: Sequence[float] | None = None) -> float | np.ndarray:
    """Tokens the rows commit on average when each verifies its ``nodes`` best nodes
    (``row_scores``: each row's path scores, best first); ``nodes`` may be an array of sizes;
    ``weights``: what a token of each row is worth (default 1).

    >>> round(expected_tokens([np.array([0.9, 0.5]), np.array([0.2])], 2), 6)   # (1 + 1.4) + (1 + 0.2)
    3.6
    """
    n = np.asarray(nodes, np.int64)
    tokens = np.zeros(n.shape)
    for r, scores in enumerate(row_scores):  # 1 + (the row's n best scores), every n at once
        sums = np.concatenate([[0.0], np.cumsum(scores, dtype=np.float64)])
        tokens = tokens + (1.0 if weights is None else float(weights[r])) * (1.0 + sums[np.minimum(n, scores.shape[0])])
    return float(tokens) if tokens.ndim == 0 else tokens


LAGGARD_POWER = 4.0
"""How steeply :func:`finish_weights` discounts rows that are ahead of the slowest one."""


def finish_weights(remaining: Sequence[float]) -> np.ndarray:
    """What a token of each row is worth when the batch cannot take new requests: the batch
    ends with its slowest row, so a token of a row that is far ahead shortens nothing (on a
    GPU a forward costs about the same for 3 live rows as for 64). ``remaining``: the steps
    (or tokens) each row still needs; weights ``(remaining / max) ** LAGGARD_POWER``.

    >>> finish_weights([100, 100, 50]).tolist()
    [1.0, 1.0, 0.0625]
    """
    rest = np.asarray(remaining, np.float64)
    top = rest.max(initial=0.0)
    return (rest / top) ** LAGGARD_POWER if top > 0 else np.ones(rest.shape)


def choose_nodes(row_scores: Sequence[np.ndarray], options: Sequence[int], cost: Callable[[np.ndarray], np.ndarray],
                 weights: Sequence[float] | None = None) -> int:
    """The tree size (nodes per row, one of ``options``) that maximises the batch's expected
    committed tokens per second (each row's tokens times its ``weights``, default 1);
    ``cost(slots)`` gives the step's seconds for an array of slot counts (root + nodes per
    row), all options in one call. Ties go to the smaller tree.

    >>> flat = lambda slots: np.where(slots <= 2, 1.0, 2.0)   # the 2nd node is free, the 3rd not
    >>> choose_nodes([np.array([0.9, 0.5])], range(3), flat)
    1
    """
    nodes = np.unique(np.asarray(list(options), np.int64))
    if nodes.shape[0] == 0:
        return 0
    rate = expected_tokens(row_scores, nodes, weights) / np.broadcast_to(np.asarray(cost(nodes + 1), np.float64), nodes.shape)
    return int(nodes[np.argmax(rate >= rate.max() / (1.0 + 1e-9))])


def choose_budget(scores: np.ndarray, cost: StepCost, max_budget: int) -> int:
    """One row: the number of top-scored nodes that maximises expected tokens per second.

    ``scores`` are path scores in any order; the verified forward holds the root plus ``B``
    nodes.

    >>> cost = StepCost(sizes=(1, 2, 3), seconds=(1.0, 1.0, 2.0))   # the 2nd node is free, the 3rd not
    >>> choose_budget(np.array([0.9, 0.5]), cost, 8)
    1
    """
    if scores.shape[0] == 0 or max_budget <= 0:
        return 0
    best_first = np.sort(scores)[::-1][:max_budget].astype(np.float64)
    return choose_nodes([best_first], range(best_first.shape[0] + 1), cost)
