"""The decoding loop: every live request of a batch verified in one forward per step.

One step, for all live rows at once::

    1) draft     every row's sources propose; calibrated and fused per row
    2) budget    one tree size for the batch: the most expected tokens per second
    3) prune     each row's tree to that size
    4) verify    one forward of [rows, 1 + nodes] tokens (the verifier)
    5) accept    per row: greedy walk on the host, or sampling / processors node by node
    6) commit    per row: tokens appended, stopping checked after every token
    7) keep      per row: the accepted slots' KV moved behind the committed tokens
    8) update    the sources learn; the step's measured time corrects the cost model
    9) refill    finished rows leave; queued requests take their place (or the batch shrinks)

Each request is a :class:`Row` — its one token buffer, its drafting session, its stopping
rule and statistics; the verifier owns the KV cache (see :mod:`retrospec.verify`). A batch
of one is the same loop with one row.

A step is :meth:`Decoder.launch` (1-4: the forward is queued, not waited for) and
:meth:`Decoder.land` (5-9). With ``VerifierConfig.pipeline`` (on CUDA from 16 rows) the
batch is two decoders over one queue, each with its own cache, whose launches and landings
interleave: the host drafts one half while the device verifies the other.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from retrospec.drafting.budget import LiveCost, choose_nodes, finish_weights
from retrospec.drafting.speculator import AUTO, Proposal, Speculator
from retrospec.sources.base import Verified
from retrospec.stats import SpecStats
from retrospec.tree import DraftTree
from retrospec.verify.acceptance import accept_greedy, accept_walk, pick_token, predictions
from retrospec.verify.step_cost import dynamic_cost
from retrospec.verify.verifiers import StaticVerifier, VerifierConfig, batch_bucket, make_verifier, release_verifier

log = logging.getLogger(__name__)

MAX_PLAIN_STREAK = 16
"""After the budget chooses plain decoding, drafting pauses for 1, 2, 4 ... up to this many
steps before the next look (drafting costs host time a plain step does not)..."""
EXPLORE_EVERY = 8
"""While the plain step's own cost is stale, every this many steps that would speculate runs
plain instead, so that the budget compares trees with a measured plain step, not with the
prior's shape (a prior that overrates the plain step keeps small trees that do not pay)."""
PAUSE_SHARE = 0.05
"""...but only where drafting costs more than this share of a plain step: on a CPU it costs
~1% of one (0.5 ms against 46 ms on SmolLM2), and a pause only forgoes the steps that pay."""
DRAFT_SAMPLES = 5
"""The drafting cost a pause compares is the median of this many latest looks, never one look:
a kernel's first call (numba loads or compiles it) or a garbage collection makes one look
cost 10-100x the next, and pausing for it forgoes the steps that would have paid."""


class Request(NamedTuple):
    """One prompt to continue.

    Attributes:
        shown: ``int64 [P]`` the row as plain ``generate()`` shows it to logits processors
            and stopping criteria (left padding included).
        start: index of its first real token (the model reads ``shown[start:]``).
        documents: texts that came with it, for document sources.
    """

    shown: np.ndarray
    start: int = 0
    documents: tuple[str, ...] = ()


@dataclass
class DecodeSettings:
    """What the loop needs from the generation config, resolved once per call."""

    logits_processor: object | None
    """A ``LogitsProcessorList`` (``None`` when empty: plain argmax)."""
    stopping_criteria: object | None
    """Criteria beyond length and EOS (a ``StoppingCriteriaList`` or ``None``), called on a
    row's sequence after each of its committed tokens."""
    eos: frozenset[int]
    """Tokens that end a row (committed, then the row stops)."""
    do_sample: bool
    max_new_tokens: int | None
    """Tokens after its shown length at which a row stops (``None``: no limit)."""
    windows: dict[str, int | None]
    """Attention layer types and their sliding windows."""
    max_positions: int | None
    """Largest position + 1 the model's embeddings cover."""
    streamer: object | None = None
    """Gets each committed block of a batch of one."""


TRUST_PRIOR = 2.0
"""Drafts of pseudo-evidence that a row's calibration is right, before its own steps count."""
TRUST_DECAY = 0.9
"""Per speculating step, how much of a row's earlier evidence is kept (recent steps count most)."""


@dataclass
class RowTrust:
    """How far one request's accepted drafts follow what its calibrated scores promised.

    The calibrator learns across requests, so a request whose drafts are worse (or better)
    than the others' gets its scores scaled by ``accepted / expected`` over its own recent
    steps before the budget sizes its tree: a chat that rarely matches its sources stops
    paying for trees that earlier, more repetitive requests earned.

    >>> t = RowTrust()
    >>> for _ in range(10): t.update(expected=2.0, accepted=0.5)
    >>> round(t.factor, 2)
    0.35
    """

    accepted: float = 0.0
    expected: float = 0.0

    def update(self, expected: float, accepted: float) -> None:
        self.accepted = TRUST_DECAY * self.accepted + accepted
        self.expected = TRUST_DECAY * self.expected + expected

    @property
    def factor(self) -> float:
        return (self.accepted + TRUST_PRIOR) / (self.expected + TRUST_PRIOR)


@dataclass(eq=False)
class Row:
    """One request being decoded: its token buffer, drafting session, stop rule and stats."""

    index: int
    """Position of the request in the call's list."""
    request: Request
    session: object
    tokens: np.ndarray
    """``shown`` then the new tokens; ``tokens[:cur]`` is the row's sequence."""
    cur: int
    limit: int | None
    """Sequence length at which the row stops."""
    stats: SpecStats = field(default_factory=lambda: SpecStats(prefills=1))
    past: int = 0
    """Tokens of the row in the KV cache (its sequence minus the padding and the root)."""
    done: bool = False
    trust: RowTrust = field(default_factory=RowTrust)
    expected: float = 0.0
    """Drafts the budget expected the row to accept in the step under way."""

    @classmethod
    def open(cls, index: int, request: Request, session, max_new_tokens: int | None) -> Row:
        shown = request.shown.shape[0]
        limit = None if max_new_tokens is None else shown + max_new_tokens
        tokens = np.empty(shown + (max_new_tokens if max_new_tokens is not None else 4096) + 1, np.int64)
        tokens[:shown] = request.shown
        return cls(index, request, session, tokens, shown, limit)

    def context(self) -> np.ndarray:
        """What the sources see: the real tokens, prompt and output so far."""
        return self.tokens[self.request.start : self.cur]

    def prefix(self, device) -> torch.Tensor:
        """``[1, cur]`` the sequence as processors and stopping criteria see it."""
        return torch.from_numpy(self.tokens[: self.cur].copy())[None].to(device)

    @property
    def root(self) -> int:
        return int(self.tokens[self.cur - 1])

    @property
    def new_tokens(self) -> list[int]:
        return self.tokens[self.request.shown.shape[0] : self.cur].tolist()

    def room(self) -> int:
        """Tokens the row may still commit."""
        return (self.limit - self.cur) if self.limit is not None else 1 << 30

    def steps_left(self) -> float:
        """Steps the row would take to its limit at the tokens per step it has committed so far."""
        per_step = self.stats.new_tokens / self.stats.steps if self.stats.steps else 1.0
        return self.room() / max(per_step, 1.0)

    def commit(self, tokens: list[int], settings: DecodeSettings, device) -> int:
        """Append ``tokens``, stopping right after the first one a stopping rule fires on;
        return how many were kept."""
        if self.cur + len(tokens) > self.tokens.shape[0]:  # only without a length limit: grow
            self.tokens = np.concatenate([self.tokens, np.empty(max(self.tokens.shape[0], len(tokens)), np.int64)])
        for kept, token in enumerate(tokens, 1):
            self.tokens[self.cur] = token
            self.cur += 1
            if (
                token in settings.eos
                or (self.limit is not None and self.cur >= self.limit)
                or (settings.stopping_criteria is not None and bool(settings.stopping_criteria(self.prefix(device), None).any()))
            ):
                self.done = True
            if self.done:
                return kept
        return len(tokens)


class _Clock:
    """Wall time per phase into ``stats.seconds``; when profiling, each step's total and its
    (synchronised) forward time."""

    def __init__(self, stats: SpecStats, device: torch.device, profile: bool):
        self.stats, self.profile = stats, profile
        self.sync = profile and device.type == "cuda"
        self.last = self.step_start = time.perf_counter()
        self.forward = 0.0

    def lap(self, phase: str) -> float:
        """End ``phase``; its seconds."""
        if phase == "forward" and self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.stats.add_time(phase, now - self.last)
        seconds = now - self.last
        if phase == "forward":
            self.forward = seconds
        self.last = now
        return seconds

    def resume(self) -> None:
        """Start timing this clock's next phase now (what ran since its last lap was not its own)."""
        self.last = time.perf_counter()

    def end_step(self) -> float:
        seconds = self.last - self.step_start
        if self.profile:
            self.stats.step_seconds.append(seconds)
            self.stats.step_device_seconds.append(self.forward)
        self.step_start = self.last
        return seconds


class Result(NamedTuple):
    """One request's new tokens and statistics."""

    tokens: list[int]
    stats: SpecStats


class Work:
    """The requests of one call, shared by the decoders that serve it: the queue they refill
    their rows from, the results, the progress bar."""

    def __init__(self, requests: Sequence[Request], settings: DecodeSettings, progress=None):
        self.queue = deque(enumerate(requests))
        self.results: list[Result | None] = [None] * len(requests)
        self.progress = progress
        longest = max(r.shown.shape[0] - r.start for r in requests)
        self.length = longest + (settings.max_new_tokens if settings.max_new_tokens is not None else 4096)
        """Longest sequence a row may reach (its real tokens)."""


class Decoder:
    """Decodes requests from a :class:`Work`, at most ``batch`` at once (see the module docstring).

    Use :func:`decode`; this class only holds the state one call shares between its steps.
    A step is :meth:`launch` (draft, then queue the verification) and :meth:`land` (wait for
    it, accept, commit): two decoders over one work interleave them (:func:`decode`'s pipeline).
    """

    def __init__(self, model, speculator: Speculator, settings: DecodeSettings, config: VerifierConfig,
                 work: Work, batch: int, refresh_cost: bool = False, verifier=None, cost=None, pipelined: bool = False):
        self.model, self.spec, self.settings, self.config = model, speculator, settings, config
        self.device = next(model.parameters()).device
        self.work, self.queue = work, work.queue
        self.greedy = settings.logits_processor is None and not settings.do_sample
        self.topk = speculator.topk_wanted
        self.cap = speculator.max_nodes
        self.batch_stats = SpecStats()
        self.clock = _Clock(self.batch_stats, self.device, config.profile)
        self.pipelined = pipelined
        self.verifier = verifier if verifier is not None else make_verifier(
            model, config, settings.windows, min(batch, len(work.results)), work.length, self.cap, self.topk)
        self.cost = cost if cost is not None else self._cost_model(refresh_cost)
        self.rows: list[Row | None] = [None] * self.verifier.batch
        self.plain_streak, self.plain_left = 0, 0
        self.explore = 0  # speculating steps, modulo EXPLORE_EVERY (0: look at the plain step's cost)
        self.draft_costs: deque[float] = deque(maxlen=DRAFT_SAMPLES)  # host seconds of the latest looks
        # on an asynchronous device the sources' updates run while it computes the next
        # forward (their drafts lag one step); not when profiling, which times them apart
        self.overlap = (self.device.type == "cuda" or pipelined) and not config.profile
        self.observing: list[tuple[object, list, Verified]] = []
        self.inflight: tuple | None = None  # a launched step: (out, past) until it lands

    def _cost_model(self, refresh: bool) -> LiveCost | None:
        if self.spec.budget != AUTO:
            return None
        if isinstance(self.verifier, StaticVerifier):  # its own steps, timed when it was built
            return self.verifier.live_cost
        return dynamic_cost(self.model, refresh=refresh, max_size=self.cap + 1)

    def _cost_batch(self) -> int:
        return self.verifier.batch if isinstance(self.verifier, StaticVerifier) else batch_bucket(self.verifier.batch)

    # -- rows in and out -------------------------------------------------------------
    def admit(self) -> None:
        """Fill the free cache rows from the queue: one prefill forward for all of them."""
        free = [i for i, r in enumerate(self.rows) if r is None or r.done]
        new: list[Row] = []
        while free and self.queue:
            index, request = self.queue.popleft()
            real = request.shown[request.start :]
            if real.shape[0] == 0:
                raise ValueError(f"request {index} has no tokens")
            if self.settings.max_positions is not None and real.shape[0] >= self.settings.max_positions:
                raise ValueError(f"request {index} has {real.shape[0]} tokens but the model's positions end at "
                                 f"{self.settings.max_positions}; shorten it")
            cost = (lambda slots: self.cost(slots, 1)) if self.cost is not None else None
            session = self.spec.start_request(real, self.model, request.documents, cost)
            row = Row.open(index, request, session, self.settings.max_new_tokens)
            self.rows[free.pop(0)] = row
            new.append(row)
        if not new:
            return
        slots = [self.rows.index(r) for r in new]
        alone = all(r is None or r.done or r in new for r in self.rows)  # no live row beside the new ones
        logits = self.verifier.prefill([r.context() for r in new], slots, alone=alone)
        for i, row in enumerate(new):
            context = row.context()
            last = logits[i : i + 1]
            if row.session.adjusts_logits:
                last = row.session.adjust_logits(context, context[-1:], np.array([-1]), last)
            first = pick_token(last, row.prefix(self.device), self.settings.logits_processor, self.settings.do_sample)
            row.past = context.shape[0]
            kept = row.commit([first], self.settings, self.device)
            row.stats.new_tokens += kept
            self._stream(row, [first])
        self.clock.lap("prefill")

    def _collect(self) -> bool:
        """Record the results of rows that finished; whether there were any."""
        found = False
        results = self.work.results
        for row in self.rows:
            if row is not None and row.done and results[row.index] is None:
                results[row.index] = Result(row.new_tokens, row.stats)
                row.session.finish(row.context())  # sources that learn across requests take it whole
                found = True
                if self.work.progress is not None:
                    self.work.progress.update(1)
        return found

    def finish(self) -> None:
        """Collect finished rows; refill their cache rows, or shrink the batch."""
        self._collect()
        while self.queue and any(r is None or r.done for r in self.rows):
            self.admit()
            self._collect()  # a request may end with its first token
        if self.queue:
            return
        live = [i for i, r in enumerate(self.rows) if r is not None and not r.done]
        if not live or len(live) == len(self.rows):
            return
        if self.verifier.rows_only(live):  # dynamic: drop the finished rows from the cache
            self.rows = [self.rows[i] for i in live]
        elif batch_bucket(len(live), self.verifier.least_batch) < self.verifier.batch:  # static: move to a smaller bucket
            self._migrate(live)

    def _migrate(self, live: list[int]) -> None:
        old = self.verifier
        new = make_verifier(self.model, self.config, self.settings.windows, len(live), self.work.length, self.cap, self.topk)
        if new.capacity != old.capacity:  # a different cache bucket: keep the old verifier
            release_verifier(self.model, new)
            return
        old._flush()
        length = max(self.rows[i].past for i in live) + 1
        new.cache.copy_rows(old.cache, torch.as_tensor(live, device=self.device), length)
        release_verifier(self.model, old)
        self.verifier = new
        self.cost = self._cost_model(False)
        self.rows = [self.rows[i] for i in live] + [None] * (new.batch - len(live))

    def _stream(self, row: Row, tokens: list[int]) -> None:
        if self.settings.streamer is not None and tokens:
            self.settings.streamer.put(torch.tensor(tokens, dtype=torch.long))

    # -- one step ----------------------------------------------------------------------
    def _nodes(self, live: list[Row], proposals: list[Proposal | None], caps: list[int], draft_seconds: float) -> int:
        """2) the batch's tree size (``draft_seconds``: what drafting this step cost the host)."""
        options = self.verifier.node_options
        top = max(caps, default=0)
        if self.spec.budget != AUTO:
            nodes = min(int(self.spec.budget), top)
        elif self.plain_left > 0:
            return 0
        else:
            promised = [p.best_first[:c] if p is not None else np.zeros(0) for p, c in zip(proposals, caps)]
            scores = [np.minimum(s * row.trust.factor, 1.0) for row, s in zip(live, promised)]
            allowed = options if options is not None else range(top + 1)  # rows cap their own trees
            batch = self._cost_batch()
            # with requests queued, every token counts (finished rows are refilled); without,
            # the batch ends with its slowest row: the rows whose remaining tokens, at the
            # tokens per step they have committed so far, take the most steps count most
            weights = None if self.queue else finish_weights([row.steps_left() for row in live])
            nodes = choose_nodes(scores, allowed, lambda slots: self.cost(slots, batch), weights)
            self.explore = (self.explore + 1) % EXPLORE_EVERY if nodes > 0 else self.explore
            if nodes > 0 and self.explore == 0 and 0 in allowed and self.cost.stale(1, batch):
                return 0  # measure a plain step now and then
            for row, row_scores in zip(live, promised):
                row.expected = float(row_scores[:nodes].sum())
            self.draft_costs.append(draft_seconds)
            if nodes == 0 and self._drafting_dear(self.cost(1, batch)):  # plain decoding pays: pause drafting
                self.plain_streak = min(max(2 * self.plain_streak, 1), MAX_PLAIN_STREAK)
                self.plain_left = self.plain_streak
            else:
                self.plain_streak = 0
        if options is not None and nodes > 0:
            nodes = min((n for n in options if n >= nodes), default=options[-1])
        return nodes

    def _drafting_dear(self, plain_step: float) -> bool:
        """Whether looking at drafts costs more than ``PAUSE_SHARE`` of a plain step, judged on
        the median of the latest looks once there are enough of them."""
        costs = self.draft_costs
        return len(costs) > DRAFT_SAMPLES // 2 and float(np.median(costs)) > PAUSE_SHARE * plain_step

    def live(self) -> bool:
        return any(r is not None and not r.done for r in self.rows)

    def step(self) -> None:
        self.launch()
        self.land()

    def launch(self) -> None:
        """Steps 1-4: draft, budget, prune, and queue the verification of every row."""
        if self.pipelined:
            self.clock.resume()  # the other decoder's work since this one's last lap is not ours
        settings, rows = self.settings, self.rows
        live = [r for r in rows if r is not None and not r.done]
        # 1) draft, no deeper than each row's remaining length and the model's positions
        depths = []
        for row in live:
            depth = row.room() - 1  # the bonus token takes the last place
            if settings.max_positions is not None:
                depth = min(depth, settings.max_positions - row.past - 1)
            depths.append(max(depth, 0))
        caps = [self.cap if depth > 0 else 0 for depth in depths]
        drafting = self.plain_left == 0 and self.cap > 0
        proposals = [row.session.propose(row.context(), max_depth=depth) if drafting and depth > 0 else None
                     for row, depth in zip(live, depths)]
        draft_seconds = self.clock.lap("draft")
        # 2) budget, 3) prune
        nodes = self._nodes(live, proposals, caps, draft_seconds)
        if self.plain_left > 0 and not drafting:
            self.plain_left -= 1
        trees: dict[int, DraftTree] = {}
        for row, proposal, cap in zip(live, proposals, caps):
            if proposal is None or nodes == 0:
                row.session.skip()
                trees[id(row)] = DraftTree.empty()
            else:
                trees[id(row)] = row.session.prune(proposal, min(nodes, cap))
        # 4) verify: every cache row (finished and free ones as padding); while the device
        #    works, the sources learn from the previous step (8, deferred)
        empty = DraftTree.empty()
        batch_trees = [trees.get(id(r), empty) if r is not None else empty for r in rows]
        roots = [r.root if r is not None else 0 for r in rows]
        past = np.asarray([r.past if r is not None else 0 for r in rows], np.int64)
        width = max(len(t) for t in batch_trees)
        out = self.verifier.verify(batch_trees, roots, past, width, predict=self.greedy, topk=self.topk)
        if self.overlap:
            self._observe()
        self.inflight = (out, past)
        if self.pipelined:
            self.clock.lap("launch")

    def land(self) -> None:
        """Steps 5-9 of the launched step: wait for it, accept, commit, keep, update, refill."""
        settings, rows = self.settings, self.rows
        (out, past), self.inflight = self.inflight, None
        if self.pipelined:
            self.clock.resume()
        preds, top = out.host()  # the one device-to-host copy of the step
        self.clock.lap("forward")
        # 5) accept: the greedy walk of every plain row in one kernel call, the rest row by row
        layout = out.layout
        live_idx = [b for b, r in enumerate(rows) if r is not None and not r.done]
        outcomes: dict[int, tuple] = {}
        walk = [b for b in live_idx if self.greedy and not rows[b].session.adjusts_logits]
        if walk:
            for b, acc in zip(walk, accept_greedy(layout.input_ids[walk], layout.parent_slots[walk], preds[walk], layout.sizes[walk])):
                outcomes[b] = acc
        for b in live_idx:
            if b in outcomes:
                continue
            row, size = rows[b], int(layout.sizes[b])
            slot_tokens, parent_slots = layout.input_ids[b, :size], layout.parent_slots[b, :size]
            logits = out.logits[b, :size]
            if row.session.adjusts_logits:
                logits = row.session.adjust_logits(row.context(), slot_tokens, parent_slots, logits)
            if self.greedy:
                outcomes[b] = accept_greedy(slot_tokens[None], parent_slots[None], predictions(logits[None])[0])[0]
            else:
                outcomes[b] = accept_walk(
                    slot_tokens, parent_slots, logits, row.prefix(self.device), settings.logits_processor, settings.do_sample
                )
        self.clock.lap("accept")
        # 6) commit (a stop may cut the block), stream, 7) keep the accepted slots
        accepted: list[np.ndarray | None] = [None] * len(rows)
        for b in live_idx:
            acc, row, size = outcomes[b], rows[b], int(layout.sizes[b])
            before = row.cur
            kept = row.commit(acc.tokens, settings, self.device)
            self._stream(row, acc.tokens[:kept])
            drafts = min(kept, acc.slots.shape[0] - 1)  # a stop may cut before the bonus
            row.stats.count_step(kept, size - 1, drafts, *row.session.attribution(acc.slots[: 1 + drafts]))
            if row.expected > 0 and size > 1:
                row.trust.update(row.expected, acc.slots.shape[0] - 1)
            row.expected = 0.0
            if not row.done:
                accepted[b] = acc.slots
            self.observing.append((row.session, row.session.last_draft(), Verified(
                slot_tokens=layout.input_ids[b, :size].copy(), parent_slots=layout.parent_slots[b, :size].copy(),
                accepted_slots=acc.slots, committed=row.tokens[before : row.cur].copy(),
                topk=top[b, :size].copy() if top is not None else None)))
        self.verifier.keep(past, accepted)
        for b, slots in enumerate(accepted):
            if slots is not None:
                rows[b].past += slots.shape[0]
        self.clock.lap("commit")
        # 8) update: the sources learn from what verification showed (now, or while the
        #    device runs the next forward); the cost model learns from the clock
        if not self.overlap:
            self._observe()
        self.clock.lap("update")
        seconds = self.clock.end_step()
        self.batch_stats.forwards += 1
        if self.cost is not None:
            self.cost.observe(int(layout.input_ids.shape[1]), self._cost_batch(), seconds)
        # 9) refill or shrink
        if any(r is not None and r.done for r in rows):
            self.finish()

    def _observe(self) -> None:
        """8) every row's sources and the calibrator learn from the last verification."""
        for session, draft, step in self.observing:
            session.observe(step, draft)
        self.observing.clear()

    def start(self) -> None:
        """Fill the rows from the queue (one prefill forward)."""
        if self.pipelined:
            self.clock.resume()  # not the other decoder's start
        self.admit()
        self.clock.step_start = self.clock.last
        self.finish()

    def run(self) -> None:
        self.start()
        while self.live():
            self.step()
        self._observe()


def _pipeline(decoders: list[Decoder]) -> None:
    """Steps of two decoders interleaved: while the device verifies one's batch, the host
    lands the other's last step and drafts its next one (their forwards queue back to back,
    each waited for by its own event). Rows refill from the shared queue; a decoder whose
    rows are all done leaves, and the other goes on alone."""
    for d in decoders:
        d.start()
    active = [d for d in decoders if d.live()]
    for d in active:
        d.launch()
    while active:
        for d in list(active):
            d.land()
            if d.live():
                d.launch()
            else:
                d._observe()
                active.remove(d)


@torch.no_grad()
def decode(model, requests: Sequence[Request], speculator: Speculator, settings: DecodeSettings, config: VerifierConfig,
           *, batch_size: int | None = None, refresh_cost: bool = False, progress=None, verifier=None,
           cost: LiveCost | None = None) -> tuple[list[Result], SpecStats]:
    """Decode every request, at most ``batch_size`` at once (default: all), refilling rows
    as requests finish; return each request's new tokens and statistics, and the sum.
    ``verifier`` replaces the one :func:`~retrospec.verify.verifiers.make_verifier` would
    choose, ``cost`` the measured step cost of ``budget="auto"`` (tests pass scripted ones)."""
    if not requests:
        return [], SpecStats()
    batch = len(requests) if batch_size is None else int(batch_size)
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if settings.streamer is not None and batch > 1:
        raise ValueError(f"streaming needs batch size 1, got {batch}")
    work = Work(requests, settings, progress)
    rows = min(batch, len(requests))
    # two pipelined halves hide drafting behind the forwards; without drafting (no tree
    # nodes) they would only double the forwards
    pipelined = verifier is None and speculator.max_nodes > 0 and config.pipelined(model, rows)
    halves = [(rows + 1) // 2, rows // 2] if pipelined else [rows]
    decoders: list[Decoder] = []
    try:
        for half in halves:
            decoders.append(Decoder(model, speculator, settings, config, work, half, refresh_cost, verifier, cost,
                                    pipelined=len(halves) > 1))
        if len(decoders) > 1:
            _pipeline(decoders)
        else:
            decoders[0].run()
    finally:
        for d in decoders:
            release_verifier(model, d.verifier)
    total = SpecStats()
    for d in decoders:
        total = total.merge(d.batch_stats)
    for result in work.results:
        total = total.merge(result.stats)
    return list(work.results), total
