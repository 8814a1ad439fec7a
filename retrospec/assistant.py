"""A linear-chain compatibility object for code that can only pass ``assistant_model=``.

Some code forwards ``assistant_model`` to ``model.generate`` and nothing else. For it,
:class:`AssistantChain` looks like an assistant model to transformers' assisted decoding:
each round it asks a :class:`~retrospec.Speculator` for a tree and proposes the tree's
best chain (follow the highest-scored child from the root). transformers then verifies the
chain itself — lossless, as assisted decoding always is — but without tree attention, so
prefer ``retrospec.generate`` or ``custom_generate`` where you can.

    model.generate(**inputs, assistant_model=retrospec.AssistantChain(model))
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from transformers import GenerationConfig

from retrospec.drafting.speculator import Speculator
from retrospec.tree import ROOT, DraftTree

DRAFT_LOGIT = 1e4
"""Logit given to each proposed token in the candidate scores (a one-hot draft distribution)."""


def best_chain(tree: DraftTree) -> list[int]:
    """Tokens of the path that takes the highest-scored child at every level.

    >>> best_chain(DraftTree.from_paths([[1, 2], [3, 4, 5]], [[0.9, 0.2], [0.5, 0.4, 0.3]]))
    [1, 2]
    """
    chain, node = [], ROOT
    parents, scores = tree.parents, tree.scores
    while True:
        children = np.flatnonzero(parents == node)
        if children.size == 0:
            return chain
        node = int(children[np.argmax(scores[children])])
        chain.append(int(tree.tokens[node]))


class AssistantChain:
    """Duck-types the few members of an assistant model that assisted decoding uses.

    Args:
        model: the target model (its config and device are mirrored).
        speculator: the draft sources; default a Speculator with the context source.
        num_tokens: most tokens proposed per round.
    """

    def __init__(self, model, speculator: Speculator | None = None, num_tokens: int = 16):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.config = model.config
        self.device = model.device
        self.speculator = speculator or Speculator(budget=64)
        self.generation_config = GenerationConfig(num_assistant_tokens=num_tokens, num_assistant_tokens_schedule="constant")
        self._prompt: np.ndarray | None = None
        self._session = None
        self._context: np.ndarray | None = None  # the latest context seen (finishes the request when the next begins)

    def _supports_logits_to_keep(self) -> bool:  # queried by transformers' AssistedCandidateGenerator
        return False

    def _session_for(self, context: np.ndarray):
        # a new request unless the context extends the one we started from
        prompt = self._prompt
        if prompt is None or context.shape[0] < prompt.shape[0] or not np.array_equal(context[: prompt.shape[0]], prompt):
            if self._session is not None:  # transformers never says a request ended: the next one says it
                self._session.finish(self._context)
            self._prompt = context.copy()
            self._session = self.speculator.start_request(context)
        self._context = context
        return self._session

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int = 16, **_ignored):
        """Propose up to ``max_new_tokens`` tokens after ``input_ids`` (batch size 1)."""
        if input_ids.shape[0] != 1:
            raise ValueError(f"AssistantChain supports batch size 1, got {input_ids.shape[0]}")
        context = input_ids[0].cpu().numpy().astype(np.int64)
        limit = max(1, min(int(max_new_tokens), self.generation_config.num_assistant_tokens))
        chain = best_chain(self._session_for(context).draft(context, max_depth=limit))[:limit]
        if not chain:  # assisted decoding needs at least one candidate; this one costs nothing extra
            chain = [int(context[-1])]
        proposed = torch.tensor([chain], dtype=input_ids.dtype, device=input_ids.device)
        vocab = self.config.get_text_config(decoder=True).vocab_size
        scores = []
        for token in chain:
            row = torch.zeros(1, vocab, device=input_ids.device)
            row[0, token] = DRAFT_LOGIT
            scores.append(row)
        # transformers 5.24 reads the assistant's cache as `.cache`, 5.17 as `.past_key_values`
        return SimpleNamespace(sequences=torch.cat([input_ids, proposed], dim=1), scores=tuple(scores),
                               cache=None, past_key_values=None)
