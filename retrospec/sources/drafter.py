"""A small draft model as a source (EAGLE-2-style trees), RASD scoring and RAPID views.

**Own tree.** Each step the drafter first catches its KV cache up with the tokens committed
since its last step, which gives its next-token distribution after the context. It then
grows a tree by probability, EAGLE-2 style: the ``top_k`` likeliest children of the root;
then, ``depth - 1`` times, one forward over the ``frontier`` nodes with the highest path
probability (tree attention over its own cache) and their ``top_k`` children each. Node
scores are the drafter's path probabilities. The tree part of the cache is cropped away
after drafting, so the cache always holds exactly the committed context.

**RASD.** The same catch-up forward also carries the other sources' trees (retrieval
trees), flattened with a tree mask, so one forward gives the drafter's probability of every
retrieved node; those trees are rescored with them before the speculator fuses everything
by longest-prefix match (Retrieval-Augmented Speculative Decoding, Quan et al., 2025).

**RAPID.** For long prompts the drafter can read a *view* of the prompt: the chunks most
similar to its end (the question) plus the end itself, while the target reads everything
(RAPID, Chen et al., 2025). Drafts stay lossless: the target verifies them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from retrospec.buffers import attention_mask, layer_windows, tree_layout
from retrospec.compat import accepts, cache_kwarg
from retrospec.sources.base import Verified
from retrospec.tree import ROOT, DraftTree, fuse, prune

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrafterConfig:
    """Settings of :class:`ModelDrafter`."""

    depth: int = 3
    """Tree depth; each level beyond the first costs one drafter forward."""
    top_k: int = 4
    """Children proposed per expanded node."""
    frontier: int = 4
    """Nodes expanded per level (the likeliest by path probability)."""
    rescore: bool = True
    """Score the other sources' trees with the drafter (RASD)."""
    rapid_threshold: int = 0
    """Prompts longer than this many tokens are read by the drafter through a RAPID view (0: never)."""
    rapid_chunk: int = 256
    """Chunk size of the RAPID view, in tokens."""
    rapid_budget: int = 1536
    """Prompt tokens the drafter reads in RAPID mode (top chunks + the prompt's end)."""
    rapid_tail: int = 256
    """Tokens at the end of the prompt (the question) always in the RAPID view."""
    transfer: float = 0.0
    """RAPID's knowledge transfer, **lossy, off by default**: with ``transfer = w > 0`` the
    target's next-token logits at every verified node become ``(1 - w) * target + w *
    drafter`` before acceptance, which pulls the long-context target toward what the
    drafter read in the retrieved chunks. It CHANGES THE OUTPUT (``w = 1`` reproduces the
    drafter's own greedy text); it costs one more drafter forward per step."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.transfer <= 1.0:
            raise ValueError(f"transfer is a weight in [0, 1], got {self.transfer}")
        if self.depth < 1 or self.top_k < 1 or self.frontier < 1:
            raise ValueError(f"depth, top_k and frontier must be >= 1, got {self.depth}, {self.top_k}, {self.frontier}")
        if self.rapid_threshold and self.rapid_budget <= self.rapid_tail:
            raise ValueError(f"rapid_budget ({self.rapid_budget}) must exceed rapid_tail ({self.rapid_tail})")


class ModelDrafter:
    """A causal LM sharing the target's tokenizer, used as a draft source.

    Args:
        model: the draft model (same vocabulary as the target).
        config: expansion, RASD and RAPID settings.
    """

    name = "drafter"
    topk_wanted = 0

    def __init__(self, model, config: DrafterConfig | None = None):
        self.model = model.eval()
        self.config = config or DrafterConfig()
        self.windows = layer_windows(model.config)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]

    @classmethod
    def load(cls, name_or_path: str, like=None, config: DrafterConfig | None = None) -> ModelDrafter:
        """Load a draft model by short name/path/hub id, in the dtype and device of ``like``."""
        from retrospec.models import load_model

        dtype = next(like.parameters()).dtype if like is not None else torch.float32
        device = next(like.parameters()).device if like is not None else None
        model, _ = load_model(name_or_path, dtype, device=device)
        if like is not None:
            target_vocab = like.get_output_embeddings().weight.shape[0]
            draft_vocab = model.get_output_embeddings().weight.shape[0]
            if target_vocab != draft_vocab:
                raise ValueError(
                    f"draft model {name_or_path!r} has vocabulary {draft_vocab}, the target {target_vocab}: they must share a tokenizer"
                )
        return cls(model, config)

    @classmethod
    def from_stores(cls, model, tokenizer=None, store: str | None = None, **options) -> ModelDrafter:
        """The registry's constructor: the draft model ``store`` (short name, path or hub
        id), like ``model``; ``options`` are :class:`DrafterConfig` fields."""
        return cls.load(store, like=model, config=DrafterConfig(**options) if options else None)

    def start_request(self, prompt: np.ndarray, documents: Sequence[str] = ()) -> DrafterSession:
        session = TransferSession if self.config.transfer > 0 else DrafterSession
        return session(self, np.asarray(prompt, np.int64))


def _tree_sees(parents: np.ndarray) -> np.ndarray:
    """``bool [N+1, N+1]``: which slots (root + nodes) each slot sees (itself, its ancestors)."""
    return tree_layout([DraftTree(np.zeros(parents.shape[0], np.int64), parents.astype(np.int32),
                                  np.ones(parents.shape[0], np.float32), np.ones(parents.shape[0], np.uint32))], [0], [0]).sees[0]


def rapid_view(prompt: np.ndarray, config: DrafterConfig) -> np.ndarray:
    """The part of a long prompt a RAPID drafter reads: the chunks that share the most token
    n-grams with the prompt's end, in their original order, then the end itself.

    >>> cfg = DrafterConfig(rapid_threshold=8, rapid_chunk=4, rapid_budget=8, rapid_tail=4)
    >>> rapid_view(np.array([1, 2, 3, 4, 9, 9, 9, 9, 5, 6, 7, 8, 1, 2, 3, 0]), cfg).tolist()
    [1, 2, 3, 4, 1, 2, 3, 0]
    """
    n = prompt.shape[0]
    if not config.rapid_threshold or n <= config.rapid_threshold:
        return prompt
    tail = prompt[n - config.rapid_tail :]
    body = prompt[: n - config.rapid_tail]
    grams = {tuple(tail[i : i + 2].tolist()) for i in range(tail.shape[0] - 1)}
    chunks = [(s, body[s : s + config.rapid_chunk]) for s in range(0, body.shape[0], config.rapid_chunk)]
    scored = sorted(
        chunks,
        key=lambda sc: -sum(tuple(sc[1][i : i + 2].tolist()) in grams for i in range(sc[1].shape[0] - 1)),
    )
    room = (config.rapid_budget - config.rapid_tail) // config.rapid_chunk
    keep = sorted(s for s, _ in scored[: max(room, 1)])
    return np.concatenate([body[s : s + config.rapid_chunk] for s in keep] + [tail])


class DrafterSession:
    """The drafter's cache and view of one request."""

    rescores_others = True  # propose_with: RASD scores the other sources' trees

    def __init__(self, drafter: ModelDrafter, prompt: np.ndarray):
        self.drafter = drafter
        self.config = drafter.config
        self.model = drafter.model
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.cache = DynamicCache()  # full-length layers: a window is the mask's job
        self.step_positions = np.zeros(0, np.int64)  # positions of this step's tree slots in the cache
        self.prompt_len = prompt.shape[0]
        self.view = rapid_view(prompt, self.config)  # what the drafter reads instead of the prompt
        self.fed = 0  # tokens of the drafter's sequence in its cache

    def _sequence(self, context: np.ndarray) -> np.ndarray:
        """The drafter's own sequence: its view of the prompt, then the generated tokens."""
        return np.concatenate([self.view, context[self.prompt_len :]])

    def _mask(self, positions: np.ndarray, new_ancestors: np.ndarray) -> torch.Tensor | dict:
        """The tree mask (:func:`retrospec.buffers.attention_mask`) of new query rows at
        ``positions``: all committed tokens, plus the tree slots of this step (already
        cached or new) marked in ``new_ancestors``."""
        n_new = positions.shape[0]
        tree_positions = np.concatenate([self.step_positions[: self.fed_cache - self.fed], positions])
        self.step_positions = tree_positions
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None].to(self.device)  # noqa: E731
        fed = torch.tensor([self.fed], device=self.device)
        return attention_mask(to(new_ancestors.astype(bool)), fed, fed, to(positions), to(tree_positions),
                              self.fed_cache + n_new, self.drafter.windows, self.dtype)

    @torch.no_grad()
    def _forward(self, ids: np.ndarray, positions: np.ndarray, ancestors: np.ndarray | None, logits: bool = True) -> torch.Tensor | None:
        """Append ``ids`` at ``positions`` to the cache and return their log-probabilities.

        ``ancestors`` (``[n, tree slots of this step + n]``) says which of this step's slots
        each row sees besides the committed tokens; ``None`` means plain causal attention.
        ``logits=False`` only fills the cache and returns ``None``: a long prompt's logits
        would be ``n`` x vocabulary floats (16k tokens x 152k = 10 GB in fp32)."""
        n = ids.shape[0]
        keep = {} if logits or not accepts(self.model, "logits_to_keep") else {"logits_to_keep": 1}
        out = self.model(
            input_ids=torch.from_numpy(ids)[None].to(self.device),
            position_ids=torch.from_numpy(positions)[None].to(self.device),
            attention_mask=None if ancestors is None else self._mask(positions, ancestors),
            use_cache=True,
            **{cache_kwarg(self.model): self.cache},
            **keep,
        )
        self.fed_cache += n
        if not logits:
            return None
        return torch.log_softmax(out.logits[0].float(), dim=-1)

    def _catch_up(self, seq: np.ndarray) -> None:
        """Feed all committed tokens but the last (plain causal forward)."""
        end = seq.shape[0] - 1
        if end > self.fed:
            self._forward(seq[self.fed : end], np.arange(self.fed, end), None, logits=False)
            self.fed = end

    def propose_with(
        self, context: np.ndarray, others: list[DraftTree], max_nodes: int, max_depth: int
    ) -> tuple[DraftTree, list[DraftTree]]:
        """The drafter's own tree, and ``others`` rescored with its probabilities (RASD)."""
        cfg = self.config
        seq = self._sequence(np.asarray(context, np.int64))
        self.fed_cache = self.fed
        if self.fed >= seq.shape[0]:
            raise ValueError(f"the drafter has read {self.fed} tokens but the context has {seq.shape[0]}")
        # 1) catch up, then one forward of the last committed token + the union of the
        #    other trees: the root distribution and every retrieved node's probability
        self._catch_up(seq)
        union = (
            fuse([DraftTree(t.tokens, t.parents, t.scores, np.ones(len(t), np.uint32)) for t in others])
            if (cfg.rescore and others)
            else DraftTree.empty()
        )
        ids = np.concatenate([seq[-1:], union.tokens]).astype(np.int64)
        positions = (seq.shape[0] - 1 + np.concatenate([[0], union.depths()])).astype(np.int64)
        logp = self._forward(ids, positions, _tree_sees(union.parents))
        self.fed = seq.shape[0]
        root_logp = logp[0]
        rescored = others
        if len(union):
            parent_rows = np.where(union.parents == ROOT, 0, union.parents + 1)
            node_logp = logp[torch.from_numpy(parent_rows), torch.from_numpy(union.tokens)].cpu().numpy()
            path = np.zeros(len(union), np.float64)
            for i, p in enumerate(union.parents.tolist()):
                path[i] = node_logp[i] + (path[p] if p != ROOT else 0.0)
            prob = np.exp(path).astype(np.float32)
            rescored = [self._rescore(t, union, prob) for t in others]
        # the union's slots are not ancestors of anything the expansion feeds: drop them now
        if len(union):
            self.cache.crop(-len(union))
            self.fed_cache -= len(union)
        own = self._expand(root_logp, seq.shape[0], min(max_depth, cfg.depth), max_nodes)
        # 2) forget this step's tree slots: the cache must hold exactly the committed context
        drop = self.fed_cache - self.fed
        if drop > 0:
            self.cache.crop(-drop)
        self.fed_cache = self.fed
        return own, rescored

    @staticmethod
    def _rescore(tree: DraftTree, union: DraftTree, prob: np.ndarray) -> DraftTree:
        """``tree`` with each node's score replaced by the drafter's path probability."""
        index = {}
        for i, (t, p) in enumerate(zip(union.tokens.tolist(), union.parents.tolist())):
            index[(p, t)] = i
        mapped = np.empty(len(tree), np.int64)
        for i, (t, p) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
            mapped[i] = index[(ROOT if p == ROOT else int(mapped[p]), t)]
        return DraftTree(tree.tokens, tree.parents, prob[mapped], tree.sources).with_monotone_scores()

    def _expand(self, root_logp: torch.Tensor, seq_len: int, depth: int, max_nodes: int) -> DraftTree:
        """EAGLE-2-style growth from the root distribution (see the module docstring)."""
        cfg = self.config
        if depth <= 0 or max_nodes <= 0:
            return DraftTree.empty()
        top = torch.topk(root_logp, cfg.top_k)
        tokens = top.indices.cpu().tolist()
        parents = [ROOT] * len(tokens)
        logps = top.values.cpu().tolist()
        depths = [1] * len(tokens)
        cache_slot = [-1] * len(tokens)  # row of the node in the drafter's tree cache, once fed
        slots_fed = 0
        level = list(range(len(tokens)))
        for d in range(1, depth):
            frontier = sorted(level, key=lambda i: -logps[i])[: cfg.frontier]
            if not frontier:
                break
            n = len(frontier)
            # each frontier row sees its fed ancestors and itself
            anc = np.zeros((n, slots_fed + n), bool)
            for r, node in enumerate(frontier):
                p = parents[node]
                while p != ROOT:
                    if cache_slot[p] >= 0:
                        anc[r, cache_slot[p]] = True
                    p = parents[p]
                anc[r, slots_fed + r] = True
                cache_slot[node] = slots_fed + r
            ids = np.asarray([tokens[i] for i in frontier], np.int64)
            positions = np.asarray([seq_len - 1 + depths[i] for i in frontier], np.int64)
            logp = self._forward(ids, positions, anc)
            slots_fed += n
            top = torch.topk(logp, cfg.top_k, dim=-1)
            values, indices = top.values.cpu().numpy(), top.indices.cpu().numpy()
            level = []
            for r, node in enumerate(frontier):
                for v, t in zip(values[r].tolist(), indices[r].tolist()):
                    tokens.append(int(t))
                    parents.append(node)
                    logps.append(logps[node] + v)
                    depths.append(d + 1)
                    cache_slot.append(-1)
                    level.append(len(tokens) - 1)
        tree = DraftTree(
            np.asarray(tokens, np.int64), np.asarray(parents, np.int32),
            np.exp(np.asarray(logps, np.float64)).astype(np.float32), np.ones(len(tokens), np.uint32),
        ).with_monotone_scores()
        return prune(tree, max_nodes)

    def propose(self, context: np.ndarray, max_nodes: int, max_depth: int) -> DraftTree:
        return self.propose_with(context, [], max_nodes, max_depth)[0]

    @torch.no_grad()
    def adjust_logits(self, context: np.ndarray, slot_tokens: np.ndarray, parent_slots: np.ndarray, logits: torch.Tensor) -> torch.Tensor:
        """RAPID knowledge transfer (lossy, see ``DrafterConfig.transfer``): mix the drafter's
        log-probabilities at every verified slot into the target's logits; the identity when
        ``transfer == 0``. ``context`` ends with the root (slot 0)."""
        weight = self.config.transfer
        if weight == 0.0:
            return logits
        seq = self._sequence(np.asarray(context, np.int64))
        if self.fed == seq.shape[0]:  # the root is cached already: read it again, with the tree
            self.cache.crop(-1)
            self.fed -= 1
        self.fed_cache = self.fed
        self._catch_up(seq)
        tree_parents = (parent_slots[1:] - 1).astype(np.int32)
        tree = DraftTree(
            slot_tokens[1:].astype(np.int64),
            tree_parents,
            np.ones(tree_parents.shape[0], np.float32),
            np.ones(tree_parents.shape[0], np.uint32),
        )
        positions = (seq.shape[0] - 1 + np.concatenate([[0], tree.depths()])).astype(np.int64)
        draft = self._forward(np.concatenate([seq[-1:], tree.tokens]).astype(np.int64), positions, _tree_sees(tree_parents))
        self.fed = seq.shape[0]
        drop = self.fed_cache - self.fed  # keep the root, drop the tree
        if drop > 0:
            self.cache.crop(-drop)
        self.fed_cache = self.fed
        return (1.0 - weight) * logits + weight * draft.to(logits.device, logits.dtype)

    def observe(self, step: Verified) -> None:
        """The cache catches up with committed tokens at the next step."""


class TransferSession(DrafterSession):
    """A drafter session with RAPID's knowledge transfer on (``DrafterConfig.transfer > 0``):
    it declares that it changes the target's distribution — **lossy**, opt-in."""

    adjusts_logits = True
