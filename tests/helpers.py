"""Test-only draft sources."""

from __future__ import annotations

import numpy as np

from retrospec.tree import DraftTree


class OracleSource:
    """Knows the true continuation and hides it among distractors.

    Each proposal is a tree where the correct next tokens (up to ``depth``) form one path,
    placed at a random position among ``width`` siblings per level, and a few levels are
    deliberately wrong (``error_rate``), so acceptance stops at random depths and the
    accepted path is rarely the first child: a hard test of tree masks and KV compaction.
    """

    name = "oracle"
    topk_wanted = 0

    def __init__(self, reference: list[int], vocab: int, prompt_len: int, depth: int = 5, width: int = 3,
                 error_rate: float = 0.2, seed: int = 0):
        self.reference, self.vocab, self.prompt_len = reference, vocab, prompt_len
        self.depth, self.width, self.error_rate = depth, width, error_rate
        self.rng = np.random.default_rng(seed)

    def start_request(self, prompt, documents=()):
        return self

    def propose(self, context, max_nodes, max_depth):
        done = len(context) - self.prompt_len
        truth = self.reference[done : done + min(self.depth, max_depth)]
        paths, scores = [], []
        prefix: list[int] = []
        for token in truth:
            if self.rng.random() < self.error_rate:
                token = (token + 1 + int(self.rng.integers(self.vocab - 1))) % self.vocab
            decoys = [int(t) for t in self.rng.integers(0, self.vocab, self.width - 1) if t != token]
            order = decoys + [token]
            self.rng.shuffle(order)
            for t in order:
                paths.append(prefix + [t])
                scores.append([0.9 ** (i + 1) for i in range(len(prefix) + 1)])
            prefix = prefix + [token]
        if not paths:
            return DraftTree.empty()
        return DraftTree.from_paths(paths, scores)

    def observe(self, step):
        pass


class FixedTreeSource:
    """Always proposes the same tree (for statistical tests)."""

    name = "fixed"
    topk_wanted = 0

    def __init__(self, tree: DraftTree):
        self.tree = tree

    def start_request(self, prompt, documents=()):
        return self

    def propose(self, context, max_nodes, max_depth):
        return self.tree

    def observe(self, step):
        pass


def plain(model, ids, **kw):
    """Plain greedy ``generate()`` of an unpadded batch."""
    import torch

    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kw)


def spec(model, ids, speculator, **kw):
    """``retrospec.generate`` with the arguments of :func:`plain`."""
    import torch

    import retrospec

    return retrospec.generate(model, ids, speculator=speculator, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kw)
