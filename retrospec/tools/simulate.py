"""A model-free simulator: replay known continuations against a speculator.

Given prompts and the model's own greedy continuations (``retrospec bench`` saves them in
``outputs.jsonl``), the accepted length of every step is known without running the model:
the longest tree path that agrees with the continuation, plus the bonus token. This gives
the MAT a speculator would reach, in milliseconds per prompt — a regression check for
sources, cheap enough for CI. Sources that learn from the model's logits (Token Recycling)
get nothing to learn from here, so their simulated MAT is a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retrospec.drafting.speculator import Speculator
from retrospec.sources.base import Verified
from retrospec.tools.prompts import read_jsonl
from retrospec.tree import DraftTree


@dataclass
class SimResult:
    new_tokens: int = 0
    steps: int = 0
    by_category: dict[str, tuple[int, int]] = field(default_factory=dict)
    by_record: list[tuple[int, int]] = field(default_factory=list)
    """(new tokens, steps) of each record, in the order replayed."""

    @property
    def mat(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    def add(self, category: str, tokens: int, steps: int) -> None:
        self.new_tokens += tokens
        self.steps += steps
        t, s = self.by_category.get(category, (0, 0))
        self.by_category[category] = (t + tokens, s + steps)

    def category_mat(self) -> dict[str, float]:
        return {c: (t / s if s else 0.0) for c, (t, s) in self.by_category.items()}


def accepted_path(tree: DraftTree, reference: np.ndarray) -> list[int]:
    """Node indices of the longest tree path that spells a prefix of ``reference``.

    >>> t = DraftTree.from_paths([[5, 6], [5, 7, 8]])
    >>> accepted_path(t, np.array([5, 7, 9]))
    [0, 2]
    """
    children: dict[tuple[int, int], int] = {}
    for i, (token, parent) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
        children[(parent, token)] = i
    path, node = [], -1
    for token in reference.tolist():
        nxt = children.get((node, token))
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return path


def replay(speculator: Speculator, prompt: np.ndarray, reference: np.ndarray, documents=()) -> int:
    """Steps a speculator needs to produce ``reference`` after ``prompt`` (first token from the prefill)."""
    session = speculator.start_request(prompt, None, documents)
    if reference.shape[0] <= 1:
        session.finish(np.concatenate([prompt, reference]).astype(np.int64))
        return 0
    context = np.concatenate([prompt, reference]).astype(np.int64)
    pos, steps = 1, 0
    while pos < reference.shape[0]:
        end = prompt.shape[0] + pos
        tree = session.draft(context[:end], max_depth=reference.shape[0] - pos - 1)
        path = accepted_path(tree, reference[pos:])
        commit = min(len(path) + 1, reference.shape[0] - pos)
        slots = np.asarray([0] + [i + 1 for i in path], np.int64)
        session.observe(
            Verified(
                slot_tokens=np.concatenate([[context[end - 1]], tree.tokens]).astype(np.int64),
                parent_slots=np.concatenate([[-1], tree.parents.astype(np.int64) + 1]),
                accepted_slots=slots,
                committed=reference[pos : pos + commit],
                topk=None,
            )
        )
        pos += commit
        steps += 1
    session.finish(context)
    return steps


def simulate(outputs_path: str, speculator: Speculator, categories: list[str] | None = None) -> SimResult:
    """Replay every turn of a ``bench`` ``outputs.jsonl`` against ``speculator``."""
    result = SimResult()
    for line, row in read_jsonl(outputs_path):
        if "prompt_ids" not in row or "outputs" not in row:
            raise ValueError(f"{outputs_path}:{line}: needs 'prompt_ids' and 'outputs' (written by retrospec bench)")
        if categories and row["category"] not in categories:
            continue
        tokens = steps = 0
        for prompt, reference in zip(row["prompt_ids"], row["outputs"]):
            ref = np.asarray(reference, np.int64)
            done = replay(speculator, np.asarray(prompt, np.int64), ref, row.get("passages", ()))
            result.add(row["category"], max(ref.shape[0], 0), done)
            tokens, steps = tokens + ref.shape[0], steps + done
        result.by_record.append((tokens, steps))
    return result
