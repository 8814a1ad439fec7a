"""What every draft source implements: the whole contract of a source, in one place.

A source answers one question — "given this context, which continuations are likely, and
how likely?" — with a :class:`~retrospec.tree.DraftTree`. It knows nothing of the target
model, its KV cache or the other sources. State shared across requests (a corpus index,
the Token Recycling matrix) lives on the source; state of one request lives on the session
that ``start_request`` returns, so one source can serve several requests at once (threads,
rows of a batch).

The required part is two small protocols, :class:`Source` and :class:`Session`. A session
may also define ``finish(context)``: called once when its request ends, with the whole
sequence (prompt + output), for sources that learn across requests
(:class:`~retrospec.HistorySource`). Two optional capabilities are declared on the session
*class*, as transformers' ``CandidateGenerator`` declares its own, and the speculator only
calls them where declared:

* ``rescores_others = True``: the session also implements ``propose_with(context, others,
  max_nodes, max_depth) -> (own tree, others rescored)`` — it scores the other sources'
  trees with its own probabilities (RASD, :class:`~retrospec.ModelDrafter`);
* ``adjusts_logits = True``: the session implements ``adjust_logits(context, slot_tokens,
  parent_slots, logits) -> logits`` and changes the target's distribution before
  acceptance (RAPID's knowledge transfer) — **lossy**, so only opt-in configurations
  declare it.

A new source is its own module under ``retrospec/sources/`` (or ``retrospec/datastores/``
for one that is also an on-disk format), its tests, and one line in
:mod:`retrospec.sources.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from retrospec.tree import DraftTree


class Verified(NamedTuple):
    """What one verification step showed, handed to every session after the step.

    Attributes:
        slot_tokens: ``int64 [N+1]`` the verified tokens: the root, then the tree nodes.
        parent_slots: ``int64 [N+1]`` each slot's parent slot (``-1`` for the root).
        accepted_slots: ``int64 [A]`` slots of the accepted path, starting with the root (0).
        committed: ``int64 [C]`` tokens appended to the context this step (accepted + bonus,
            cut at a stop).
        topk: ``int64 [N+1, k]`` the model's top-k next tokens after each slot, best first,
            or ``None`` when no source asked for them.
    """

    slot_tokens: np.ndarray
    parent_slots: np.ndarray
    accepted_slots: np.ndarray
    committed: np.ndarray
    topk: np.ndarray | None


@runtime_checkable
class Session(Protocol):
    """One request's view of a source."""

    def propose(self, context: np.ndarray, max_nodes: int, max_depth: int) -> DraftTree:
        """A draft tree for the tokens after ``context`` (prompt + generated so far, ``int64 [L]``).

        At most ``max_nodes`` nodes, none deeper than ``max_depth``; scores are the source's
        own estimates of each path's acceptance probability. No draft: an empty tree.
        """
        ...

    def observe(self, step: Verified) -> None:
        """Learn from a verification step (most sources need nothing here)."""
        ...


def finishes(session) -> bool:
    """Whether ``session`` wants ``finish(context)`` when its request ends."""
    return callable(getattr(type(session), "finish", None))


def rescores_others(session) -> bool:
    """Whether ``session`` declares ``propose_with`` (see the module docstring)."""
    return bool(getattr(type(session), "rescores_others", False))


def adjusts_logits(session) -> bool:
    """Whether ``session`` declares ``adjust_logits`` (see the module docstring)."""
    return bool(getattr(type(session), "adjusts_logits", False))


@runtime_checkable
class Source(Protocol):
    """A draft source: shared state plus a factory for per-request sessions."""

    name: str
    """Short name used in statistics and on the command line."""

    topk_wanted: int
    """How many of the model's top next tokens per verified slot it wants in ``Verified.topk``."""

    def start_request(self, prompt: np.ndarray, documents: Sequence[str] = ()) -> Session:
        """A session for one request: its prompt (``int64 [L]``) and any documents that came
        with it (e.g. a RAG pipeline's retrieved passages; most sources ignore them)."""
        ...
