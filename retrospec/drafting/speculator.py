"""The speculator: asks every source for a tree, calibrates, fuses and prunes.

One step of drafting for one request, as a :class:`SpecSession` does it::

    source trees ──► calibrate (per source) ──► fuse (longest prefix) ──► calibrate (fused) ──► budget ──► prune
    └──────────────────────────────── propose() ──────────────────────────────────────┘            prune()

``propose`` and ``prune`` are separate so that a batch can choose one tree size for all of
its rows between them (see :mod:`retrospec.drafting.budget`); ``draft`` does both for one
row. After verification, ``observe`` hands the outcome to every source session and teaches
the calibrator which of each source's tested nodes were accepted.

The fused tree is calibrated once more, against what verification accepts of *its* nodes:
fusion combines the scores of a token that several sources propose as if they were
independent (noisy-or), and they are not (the context and Token Recycling both read the
request's own text), so on chat the fused scores promised ~30% more tokens than were
accepted, and the budget bought trees that did not pay. The budget weighs these scores.

Nothing here runs the target model: the step cost that ``budget="auto"`` needs is measured
where the model is (:mod:`retrospec.verify.step_cost`) and handed in.

Fault isolation: a draft never changes the output, so no source may take generation down.
A source whose session raises (in ``start_request``, ``propose``, ``propose_with``,
``observe`` or ``finish``), or proposes a tree that breaks the invariants (token ids outside the model's
vocabulary, NaN, infinite or negative scores, more nodes than asked for, parents that do
not come first), is switched off for the rest of the request with one logged warning, and
drafting goes on with the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from retrospec.drafting.budget import choose_nodes
from retrospec.drafting.calibration import Calibrator
from retrospec.jit import njit
from retrospec.sources.base import Source, Verified, adjusts_logits, finishes, rescores_others
from retrospec.tree import DraftTree, cap_depth, fuse_with_index, prune_with_index

log = logging.getLogger(__name__)

AUTO = "auto"
MAX_SOURCES = 32  # sources are bits of a uint32 mask
UNMEASURED_BUDGET = 32
"""Tree size of ``budget="auto"`` when no step cost was handed in (no model to measure)."""


@dataclass(frozen=True)
class SpeculatorConfig:
    """Drafting settings of :class:`Speculator` beyond its sources and budget (the
    verifier's own settings are :class:`~retrospec.VerifierConfig`)."""

    max_depth: int = 16
    """Deepest draft node."""
    source_nodes: int = 96
    """Most nodes one source may propose per step (before fusion)."""
    max_budget: int = 128
    """Largest tree ``budget="auto"`` may choose."""
    combine: str = "noisy_or"
    """How fusion combines the scores of a node proposed by several sources (``noisy_or`` or ``max``)."""
    calibrate: bool = True
    """Learn each source's acceptance rates online and rescale its scores with them (and
    the fused tree's, with its own table)."""

    def __post_init__(self) -> None:
        if self.max_depth < 1 or self.source_nodes < 1 or self.max_budget < 1:
            raise ValueError(
                f"max_depth, source_nodes and max_budget must be >= 1; got {self.max_depth}, {self.source_nodes}, {self.max_budget}"
            )
        if self.combine not in ("noisy_or", "max"):
            raise ValueError(f"combine must be 'noisy_or' or 'max', got {self.combine!r}")


class Speculator:
    """Holds the draft sources and turns their guesses into one verified-size tree per step.

    Args:
        sources: the draft sources; default one :class:`~retrospec.ContextSource`.
        budget: nodes verified per step: an ``int``, or ``"auto"`` to pick, every step, the
            size that maximises expected tokens per second under this model's measured
            step cost (see :mod:`retrospec.drafting.budget`).
        config: the remaining drafting knobs.

    One Speculator may serve several requests at once (threads, rows of a batch): each
    gets its own :class:`SpecSession`; what the sources learn and the calibration are shared.

    >>> from retrospec import ContextSource
    >>> spec = Speculator([ContextSource()], budget=8)
    >>> session = spec.start_request(np.array([1, 2, 3, 1, 2]))
    >>> session.draft(np.array([1, 2, 3, 1, 2]), max_depth=4).tokens.tolist()
    [3, 1, 2]
    """

    def __init__(self, sources: Sequence[Source] | None = None, budget: int | str = AUTO, config: SpeculatorConfig | None = None):
        if sources is None:
            from retrospec.sources.context import ContextSource

            sources = [ContextSource()]
        sources = list(sources)
        if not 1 <= len(sources) <= MAX_SOURCES:
            raise ValueError(f"a Speculator needs 1 to {MAX_SOURCES} sources, got {len(sources)}")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if budget != AUTO and not (isinstance(budget, int) and budget >= 0):
            raise ValueError(f"budget must be a non-negative int or 'auto', got {budget!r}")
        self.sources = sources
        self.budget = budget
        self.config = config or SpeculatorConfig()
        self.calibrator = Calibrator(len(sources) + 1)  # one table per source, then the fused tree's (FUSED)
        self.last_stats = None  # SpecStats of the latest generate() call, set by the API

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def topk_wanted(self) -> int:
        return max((s.topk_wanted for s in self.sources), default=0)

    @property
    def max_nodes(self) -> int:
        """The largest tree this speculator ever proposes."""
        return min(int(self.budget), self.config.max_budget) if self.budget != AUTO else self.config.max_budget

    def start_request(
        self, prompt: np.ndarray, model=None, documents: Sequence[str] = (), cost: Callable[[int], float] | None = None
    ) -> SpecSession:
        """Open a session for one request (``prompt``: ``int64 [L]``; ``documents``: texts that
        came with it, for document sources). ``cost(slots)`` is the step's seconds with
        ``slots`` per row, for ``budget="auto"`` in :meth:`SpecSession.draft`."""
        prompt = np.asarray(prompt, np.int64)
        sessions, failed = [], []
        for k, source in enumerate(self.sources):
            try:
                sessions.append(source.start_request(prompt, documents))
            except Exception as err:  # a datastore fault must not fail the request: the source sits it out
                sessions.append(None)
                failed.append((k, _raised("start_request", err)))
        session = SpecSession(self, sessions, cost, vocab_size(model))
        for k, why in failed:
            session.switch_off(k, why)
        return session


def vocab_size(model) -> int | None:
    """Rows of ``model``'s output embeddings (the ids a draft may hold), or None without a model."""
    head = model.get_output_embeddings() if model is not None and hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _raised(method: str, err: Exception) -> str:
    return f"{method} raised {type(err).__name__}: {err}"


def tree_fault(tree, max_nodes: int, vocab: int | None) -> str | None:
    """What is wrong with a source's proposal, or None if it keeps the invariants the
    speculator relies on (see the module docstring)."""
    if not isinstance(tree, DraftTree):
        return f"proposed a {type(tree).__name__}, not a DraftTree"
    arrays = (tree.tokens, tree.parents, tree.scores, tree.sources)
    if not all(isinstance(a, np.ndarray) and a.ndim == 1 for a in arrays) or len({a.shape[0] for a in arrays}) != 1:
        return "proposed a tree whose arrays are not 1-D of one length"
    n = tree.tokens.shape[0]
    if n > max_nodes:
        return f"proposed {n} nodes, more than the {max_nodes} asked for"
    if n == 0:
        return None
    if not (np.issubdtype(tree.tokens.dtype, np.integer) and np.issubdtype(tree.parents.dtype, np.integer)):
        return f"proposed token ids or parents that are not integers ({tree.tokens.dtype}, {tree.parents.dtype})"
    if not np.issubdtype(tree.scores.dtype, np.floating):
        return "proposed NaN, infinite or negative scores"
    fault, value = _numeric_fault(tree.tokens, tree.parents, tree.scores, -1 if vocab is None else int(vocab))
    if fault == 1:
        return f"proposed token id {value}, outside the model's vocabulary [0, {vocab})"
    if fault == 2:
        return "proposed a tree whose parents do not come before their children"
    if fault == 3:
        return "proposed NaN, infinite or negative scores"
    return None


@njit()
def _numeric_fault(tokens, parents, scores, vocab):
    """``(code, value)``: 0 fine, 1 a token id outside ``[0, vocab)`` (``vocab < 0``: no upper
    bound), 2 a parent that does not come first, 3 a NaN, infinite or negative score — one
    pass, for every source of every row each step."""
    for i in range(tokens.shape[0]):
        t = tokens[i]
        if t < 0 or (vocab >= 0 and t >= vocab):
            return 1, t
        if parents[i] < -1 or parents[i] >= i:
            return 2, 0
        s = scores[i]
        if not (s >= 0.0) or s == np.inf:  # NaN fails every comparison
            return 3, 0
    return 0, 0


_NO_SCORES, _NO_DEPTHS = np.zeros(0, np.float32), np.zeros(0, np.int32)
_NO_SCORES.flags.writeable = _NO_DEPTHS.flags.writeable = False


class Proposal(NamedTuple):
    """The fused, calibrated tree of one step before pruning.

    Attributes:
        tree: every source's nodes, merged by longest prefix.
        best_first: the tree's path scores, sorted descending (what the budget weighs).
    """

    tree: DraftTree
    best_first: np.ndarray


class SpecSession:
    """One request's drafting state: the source sessions and the last step's bookkeeping."""

    def __init__(self, speculator: Speculator, sessions: list, cost: Callable[[int], float] | None, vocab: int | None = None):
        self.speculator = speculator
        self.sessions = sessions
        self.cost = cost
        self.vocab = vocab  # the model's vocabulary size (None: token ids are not checked)
        self.off = [False] * len(sessions)  # sources switched off for this request
        # per source: (raw conditional scores, depths, fused index) of the proposal; after
        # prune: the verified slot of each source node (-1: not verified)
        self._proposed: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._last: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._last_sources = np.zeros(0, np.uint32)

    # -- one step ------------------------------------------------------------------
    def propose(self, context: np.ndarray, max_depth: int) -> Proposal:
        """Every source's tree for the tokens after ``context``, calibrated and fused."""
        spec, cfg = self.speculator, self.speculator.config
        depth_cap = min(max_depth, cfg.max_depth)
        # 1) every source proposes; a scorer (a draft model) then rescores the others' trees.
        #    A source that fails or breaks the tree invariants is switched off (see the module docstring).
        proposals: list[DraftTree | None] = [None] * len(self.sessions)
        scorer = [rescores_others(session) for session in self.sessions]
        for k, session in enumerate(self.sessions):
            if not self.off[k] and not scorer[k]:
                try:
                    tree = session.propose(context, cfg.source_nodes, depth_cap)
                except Exception as err:
                    self.switch_off(k, _raised("propose", err))
                    continue
                if self._accept(k, tree):
                    proposals[k] = cap_depth(tree, depth_cap)
        for k, session in enumerate(self.sessions):
            if not self.off[k] and scorer[k]:
                others = [j for j, t in enumerate(proposals) if t is not None and not scorer[j]]
                try:
                    own, rescored = session.propose_with(context, [proposals[j] for j in others], cfg.source_nodes, depth_cap)
                    rescored = list(rescored)
                except Exception as err:
                    self.switch_off(k, _raised("propose_with", err))
                    continue
                if not self._accept(k, own) or not self._accept_rescored(k, [proposals[j] for j in others], rescored):
                    continue
                proposals[k] = cap_depth(own, depth_cap)
                for j, tree in zip(others, rescored):
                    proposals[j] = tree
        proposals = [DraftTree.empty() if tree is None else tree for tree in proposals]
        # 2) calibrate each source's scores, 3) fuse
        trees, raws, depths = [], [], []
        for k, tree in enumerate(proposals):
            if len(tree) == 0:  # a source with nothing to say this step (often: no documents, no history yet)
                trees.append(tree)
                raws.append(_NO_SCORES)
                depths.append(_NO_DEPTHS)
                continue
            raw, depth, scores = spec.calibrator.calibrated(k, tree, cfg.calibrate)
            trees.append(DraftTree(tree.tokens, tree.parents, scores, np.full(len(tree), 1 << k, np.uint32)))
            raws.append(raw)
            depths.append(depth)
        fused, mappings = fuse_with_index(trees, cfg.combine)
        # 4) calibrate the fused scores: what several sources agreeing on a token is worth
        fused_k = len(self.sessions)
        raw, depth, scores = spec.calibrator.calibrated(fused_k, fused, cfg.calibrate)
        fused = DraftTree(fused.tokens, fused.parents, scores, fused.sources)
        self._proposed = list(zip(raws, depths, mappings)) + [(raw, depth, np.arange(len(fused), dtype=np.int64))]
        return Proposal(fused, np.sort(fused.scores)[::-1])

    def prune(self, proposal: Proposal, nodes: int) -> DraftTree:
        """The ``nodes`` best nodes of ``proposal`` (prefix-closed), the tree to verify."""
        fused = proposal.tree
        pruned, keep = prune_with_index(fused, max(int(nodes), 0))
        # fused node -> verified slot (node i of the pruned tree sits in slot i + 1)
        slot_of = np.full(len(fused), -1, np.int64)
        slot_of[keep] = np.arange(1, keep.shape[0] + 1)
        self._last = [(raw, depth, slot_of[mapping]) for raw, depth, mapping in self._proposed]
        self._last_sources = pruned.sources
        return pruned

    def skip(self) -> None:
        """This step verifies no draft (plain decoding): nothing to calibrate after it."""
        self._last, self._last_sources = [], np.zeros(0, np.uint32)

    def draft(self, context: np.ndarray, max_depth: int, max_nodes: int | None = None, flat_cost: bool = False) -> DraftTree:
        """:meth:`propose` then :meth:`prune` to this row's budget: at most ``max_nodes``
        nodes (``flat_cost``: the verifier's cost does not grow with the tree, so fill it)."""
        proposal = self.propose(context, max_depth)
        return self.prune(proposal, self.budget_for(proposal, max_nodes, flat_cost))

    def budget_for(self, proposal: Proposal, max_nodes: int | None = None, flat_cost: bool = False) -> int:
        """One row's tree size: the int budget, or under ``budget="auto"`` the size that
        maximises expected tokens per second at this session's step cost."""
        spec = self.speculator
        cap = spec.max_nodes if max_nodes is None else min(max_nodes, spec.max_nodes)
        if spec.budget != AUTO or flat_cost:
            return cap
        if self.cost is None:  # no model to measure: a middle-of-the-road default
            return min(UNMEASURED_BUDGET, cap)
        scores = proposal.best_first[:cap]
        return choose_nodes([scores], range(scores.shape[0] + 1), self.cost)

    def switch_off(self, k: int, why: str) -> None:
        """Switch source ``k`` off for the rest of the request, with one warning naming it
        (and the file, for a datastore)."""
        if self.off[k]:
            return
        self.off[k] = True
        source = self.speculator.sources[k]
        where = getattr(source, "root", None) or getattr(getattr(source, "store", None), "root", None) or getattr(source, "path", None)
        log.warning("draft source %r%s is off for the rest of this request (the output is unaffected): %s",
                    source.name, f" ({where})" if where else "", why)

    def _accept(self, k: int, tree) -> bool:
        fault = tree_fault(tree, self.speculator.config.source_nodes, self.vocab)
        if fault is not None:
            self.switch_off(k, fault)
        return fault is None

    def _accept_rescored(self, k: int, originals: list[DraftTree], rescored: list) -> bool:
        """A scorer may change the scores of the others' trees, nothing else."""
        same = len(rescored) == len(originals) and all(
            isinstance(r, DraftTree) and r.tokens.shape == o.tokens.shape and np.array_equal(r.tokens, o.tokens)
            and np.array_equal(r.parents, o.parents) for r, o in zip(rescored, originals))
        fault = None if same else "rescored the other sources' trees into different trees"
        for tree in rescored if same else ():
            fault = fault or tree_fault(tree, max(len(tree), 1), self.vocab)
        if fault is not None:
            self.switch_off(k, fault)
        return fault is None

    def last_draft(self) -> list:
        """What the calibrator needs of the last pruned tree, to pass to :meth:`observe` later
        (after the next step has been drafted)."""
        return self._last

    def observe(self, step: Verified, draft: list | None = None) -> None:
        """Pass the verification outcome to the sources and to the calibrator; ``draft``:
        the :meth:`last_draft` of the step verified (default: the last one pruned)."""
        for k, session in enumerate(self.sessions):
            if self.off[k]:
                continue
            try:
                session.observe(step)
            except Exception as err:
                self.switch_off(k, _raised("observe", err))
        last = self._last if draft is None else draft
        if not self.speculator.config.calibrate or not last:
            return
        on_path = np.zeros(step.slot_tokens.shape[0], bool)
        on_path[step.accepted_slots] = True
        for k, (raw, depth, slots) in enumerate(last):
            verified = slots >= 0
            if not verified.any():
                continue
            slot = slots[verified]
            tested = on_path[step.parent_slots[slot]]  # the parent was accepted: this node was tested
            self.speculator.calibrator.learn(k, raw[verified][tested], depth[verified][tested], on_path[slot[tested]])

    def finish(self, context: np.ndarray) -> None:
        """The request ended with ``context`` (its real tokens, prompt + output): tell the
        sources that learn across requests (see :mod:`retrospec.sources.base`)."""
        for k, session in enumerate(self.sessions):
            if self.off[k] or not finishes(session):
                continue
            try:
                session.finish(context)
            except Exception as err:
                self.switch_off(k, _raised("finish", err))

    @property
    def adjusts_logits(self) -> bool:
        """Whether a source changes the target's distribution (lossy, opt-in)."""
        return any(not off and adjusts_logits(s) for s, off in zip(self.sessions, self.off))

    def adjust_logits(self, context: np.ndarray, slot_tokens: np.ndarray, parent_slots: np.ndarray, logits):
        """Let sources that change the target's distribution do so (RAPID's knowledge
        transfer: lossy, opt-in; every other source leaves the logits untouched).
        ``context`` ends with the root token (slot 0)."""
        for k, session in enumerate(self.sessions):
            if not self.off[k] and adjusts_logits(session):
                logits = session.adjust_logits(context, slot_tokens, parent_slots, logits)
        return logits

    def attribution(self, accepted_slots: np.ndarray) -> tuple[dict[str, int], int]:
        """Accepted draft tokens per source name, and how many several sources proposed."""
        names = self.speculator.source_names
        nodes = accepted_slots[accepted_slots > 0] - 1
        if nodes.size == 0:  # a plain step, or no draft token accepted
            return dict.fromkeys(names, 0), 0
        bits = (self._last_sources[nodes][:, None] >> np.arange(len(names), dtype=np.uint32)) & np.uint32(1)
        per_source = bits.sum(axis=0).tolist()
        return dict(zip(names, per_source)), int((bits.sum(axis=1) > 1).sum())
