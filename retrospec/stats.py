"""Statistics of a speculative generation, returned as data."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """What one ``generate`` call did.

    ``steps`` counts target forwards after the prefill (one per verified tree), so plain
    greedy decoding of ``n`` tokens has ``n`` new tokens in ``n - 1`` steps.
    """

    new_tokens: int = 0
    """Tokens appended to the prompt(s), over all rows."""
    steps: int = 0
    """Verification steps after the prefill, per row: a batch of ``B`` live rows adds ``B``
    steps per forward (so ``new_tokens / steps`` is the mean accepted per row and step)."""
    forwards: int = 0
    """Verification forwards (one per step of the whole batch)."""
    prefills: int = 0
    """Prompt forwards (one per row)."""
    accepted_hist: list[int] = field(default_factory=list)
    """``accepted_hist[k]`` = number of steps that committed ``k`` tokens (accepted drafts + bonus)."""
    drafted_nodes: int = 0
    """Tree nodes verified, over all steps."""
    accepted_by_source: dict[str, int] = field(default_factory=dict)
    """Accepted draft tokens that each source proposed (a token proposed by two counts for both)."""
    accepted_by_several: int = 0
    """Accepted draft tokens proposed by more than one source."""
    accepted_drafts: int = 0
    """Accepted draft tokens (excluding bonus tokens)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time by phase: ``prefill``, ``draft``, ``forward``, ``accept``, ``commit``, ``update``."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of each step (filled when profiling, see ``SpeculatorConfig.profile``)."""
    step_device_seconds: list[float] = field(default_factory=list)
    """Time of each step spent in the verification forward, the device synchronised
    (profiling only); the rest of the step is host time."""

    @property
    def mean_accepted(self) -> float:
        """Mean tokens committed per step after the prefill (MAT): ``new_tokens / steps``."""
        return self.new_tokens / self.steps if self.steps else float(self.new_tokens)

    @property
    def mean_tree_size(self) -> float:
        return self.drafted_nodes / self.steps if self.steps else 0.0

    def count_step(self, committed: int, drafted: int, accepted: int, by_source: dict[str, int], several: int) -> None:
        """One verification step of one row: ``committed`` tokens, ``drafted`` nodes
        verified, ``accepted`` of them kept, by source (``several``: proposed by more than one)."""
        self.steps += 1
        self.new_tokens += committed
        self.drafted_nodes += drafted
        self.record_step(committed)
        self.accepted_drafts += accepted
        self.accepted_by_several += several
        for name, count in by_source.items():
            self.accepted_by_source[name] = self.accepted_by_source.get(name, 0) + count

    def record_step(self, committed: int) -> None:
        while len(self.accepted_hist) <= committed:
            self.accepted_hist.append(0)
        self.accepted_hist[committed] += 1

    def add_time(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def merge(self, other: SpecStats) -> SpecStats:
        """Sum of two stats (e.g. rows of a batch); returns a new object."""
        out = SpecStats(
            new_tokens=self.new_tokens + other.new_tokens,
            steps=self.steps + other.steps,
            forwards=self.forwards + other.forwards,
            prefills=self.prefills + other.prefills,
            drafted_nodes=self.drafted_nodes + other.drafted_nodes,
            accepted_by_several=self.accepted_by_several + other.accepted_by_several,
            accepted_drafts=self.accepted_drafts + other.accepted_drafts,
        )
        width = max(len(self.accepted_hist), len(other.accepted_hist))
        out.accepted_hist = [
            (self.accepted_hist[k] if k < len(self.accepted_hist) else 0)
            + (other.accepted_hist[k] if k < len(other.accepted_hist) else 0)
            for k in range(width)
        ]
        out.step_seconds = self.step_seconds + other.step_seconds
        out.step_device_seconds = self.step_device_seconds + other.step_device_seconds
        for part in (self, other):
            for key, value in part.accepted_by_source.items():
                out.accepted_by_source[key] = out.accepted_by_source.get(key, 0) + value
            for key, value in part.seconds.items():
                out.add_time(key, value)
        return out

    def as_dict(self) -> dict:
        """A JSON-ready summary."""
        return {
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "forwards": self.forwards,
            "mean_accepted": round(self.mean_accepted, 4),
            "mean_tree_size": round(self.mean_tree_size, 2),
            "accepted_hist": list(self.accepted_hist),
            "accepted_drafts": self.accepted_drafts,
            "accepted_by_source": dict(self.accepted_by_source),
            "accepted_by_several": self.accepted_by_several,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            **({"median_host_ms_per_step": round(1e3 * self.median_host_seconds, 3)} if self.step_seconds else {}),
        }

    @property
    def median_host_seconds(self) -> float:
        """Median per-step host time (step wall time minus the synchronised forward)."""
        if not self.step_seconds:
            return 0.0
        host = sorted(t - d for t, d in zip(self.step_seconds, self.step_device_seconds))
        return host[len(host) // 2]
