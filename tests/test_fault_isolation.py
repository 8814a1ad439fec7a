"""No source takes generation down: faults injected into every source kind leave the output
exactly plain greedy, and switch the faulty source off with one warning naming it."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import repetitive_prompt, tiny_model
from helpers import IdTokenizer

import retrospec
from retrospec.datastores.suffix_build import build_index
from retrospec.datastores.suffix_index import SuffixIndex
from retrospec.drafting.speculator import tree_fault
from retrospec.sources.documents import DocumentSource
from retrospec.sources.drafter import DrafterConfig, ModelDrafter
from retrospec.tree import DraftTree

VOCAB = 96
NEW = 24


class Fault(Exception):
    """The exception the injected faults raise."""


class FaultySession:
    """Delegates to a real session, then from step ``at`` on breaks in the way ``fault`` says."""

    def __init__(self, inner, fault: str, at: int, nodes: int):
        self.inner, self.fault, self.at, self.nodes, self.step = inner, fault, at, nodes, 0

    def _broken(self, tree: DraftTree) -> DraftTree:
        n = max(len(tree), 3)
        tokens = np.resize(tree.tokens if len(tree) else np.array([1, 2, 3]), n).astype(np.int64)
        parents = np.full(n, -1, np.int32)
        scores = np.full(n, 0.5, np.float32)
        if self.fault == "raise":
            raise Fault("injected")
        if self.fault == "id_high":
            tokens[-1] = VOCAB
        elif self.fault == "id_negative":
            tokens[0] = -7
        elif self.fault == "nan":
            scores[1] = np.nan
        elif self.fault == "inf":
            scores[0] = np.inf
        elif self.fault == "negative_score":
            scores[2] = -0.5
        elif self.fault == "oversize":
            n = self.nodes + 1
            tokens, parents, scores = np.arange(n) % VOCAB, np.full(n, -1, np.int32), np.full(n, 0.1, np.float32)
        elif self.fault == "bad_parents":
            parents[1] = 1
        elif self.fault == "not_a_tree":
            return [[1, 2]]  # type: ignore[return-value]
        return DraftTree(tokens, parents, scores, np.ones(len(tokens), np.uint32))

    def propose(self, context, max_nodes, max_depth):
        self.step += 1
        tree = self.inner.propose(context, max_nodes, max_depth)
        return self._broken(tree) if self.step >= self.at and self.fault != "raise_observe" else tree

    def observe(self, step):
        if self.fault == "raise_observe" and self.step >= self.at:
            raise Fault("injected in observe")
        self.inner.observe(step)


class FaultyScorerSession(FaultySession):
    """The same for a scorer (a draft model's ``propose_with``)."""

    rescores_others = True  # the declared capability (retrospec.sources.base)

    def propose_with(self, context, others, max_nodes, max_depth):
        self.step += 1
        own, rescored = self.inner.propose_with(context, others, max_nodes, max_depth)
        if self.step < self.at or self.fault == "raise_observe":
            return own, rescored
        if self.fault == "bad_rescore":
            return own, [DraftTree.from_paths([[5, 6]])] * len(others)
        return self._broken(own), rescored


class Faulty:
    """A source wrapper with the wrapped source's name (so the warning names it)."""

    topk_wanted = 0

    def __init__(self, inner, fault: str, at: int = 1, nodes: int = 96):
        self.inner, self.fault, self.at, self.nodes = inner, fault, at, nodes
        self.name = inner.name
        self.topk_wanted = inner.topk_wanted
        self.root = getattr(inner, "root", None)

    def start_request(self, prompt, documents=()):
        if self.fault == "raise_start":
            raise Fault("injected in start_request")
        inner = self.inner.start_request(prompt, documents)
        kind = FaultyScorerSession if hasattr(inner, "propose_with") else FaultySession
        return kind(inner, self.fault, self.at, self.nodes)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, a prompt, plain greedy's output, and one source of every kind that
    drafts well on it (the datastores hold greedy's own continuations)."""
    model = tiny_model("llama", seed=3)
    ids = repetitive_prompt(VOCAB, 24, 4)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    ref = model.generate(ids, **kw)
    text = " ".join(map(str, ref[0].tolist()))
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "c.jsonl"
    corpus.write_text(json.dumps({"text": text}) + "\n")
    tok = IdTokenizer(VOCAB)
    build_index([corpus], tok, root / "idx", progress=False)
    drafter = tiny_model("llama", seed=3)  # the target itself: its drafts are always right
    kinds = {
        "context": lambda: retrospec.ContextSource(),
        "suffix-index": lambda: SuffixIndex.open(root / "idx", tokenizer=tok),
        "recycling": lambda: retrospec.TokenRecycling.for_model(model),
        "documents": lambda: DocumentSource(tok),
        "drafter": lambda: ModelDrafter(drafter, DrafterConfig(depth=3, top_k=2)),
    }
    return model, ids, kw, ref, kinds, text


FAULTS = ["raise", "raise_start", "raise_observe", "id_high", "id_negative", "nan", "inf", "negative_score",
          "oversize", "bad_parents", "not_a_tree"]


@pytest.mark.parametrize("kind", ["context", "suffix-index", "recycling", "documents", "drafter"])
def test_every_fault_in_every_source_kind_leaves_the_output_exact(setup, kind, caplog):
    model, ids, kw, ref, kinds, text = setup
    faults = FAULTS + (["bad_rescore"] if kind == "drafter" else [])
    for fault in faults:
        faulty = Faulty(kinds[kind](), fault)
        others = [retrospec.ContextSource()] if kind != "context" else [retrospec.TokenRecycling.for_model(model)]
        spec = retrospec.Speculator([faulty, *others], budget=16)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="retrospec.drafting.speculator"):
            out = retrospec.generate(model, ids, speculator=spec, documents=[text] if kind == "documents" else None, **kw)
        assert torch.equal(out.sequences, ref), (kind, fault)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, (kind, fault, [r.getMessage() for r in warnings])
        assert repr(kind) in warnings[0].getMessage() and "off for the rest of this request" in warnings[0].getMessage()


def test_a_healthy_source_keeps_drafting_and_stays_quiet(setup, caplog):
    model, ids, kw, ref, kinds, _ = setup
    spec = retrospec.Speculator([kinds["suffix-index"](), retrospec.ContextSource()], budget=16)
    with caplog.at_level(logging.WARNING):
        out = retrospec.generate(model, ids, speculator=spec, **kw)
    assert torch.equal(out.sequences, ref) and not caplog.records
    assert out.stats.accepted_by_source["suffix-index"] > 0


def test_a_corrupted_index_block_switches_the_index_off_naming_the_file(setup, tmp_path, caplog):
    """A flipped byte in sa.bin's middle block passes open (edges and sizes are fine); the
    first query reads that block (every binary search starts at the middle row), its crc32
    fails, and the index is off for the request: one warning naming sa.bin, exact output."""
    model, ids, kw, ref, _, _ = setup
    rng = np.random.default_rng(0)
    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(map(str, rng.integers(1, VOCAB, 3000)))}) + "\n" for _ in range(100)))
    tok = IdTokenizer(VOCAB)
    build_index([corpus], tok, tmp_path / "idx", progress=False)
    index = SuffixIndex.open(tmp_path / "idx", tokenizer=tok)
    shard = index.shards[0]
    middle = (shard.n // 2 * shard.sa_bits) // 8
    assert 1 << 16 < middle < shard.sa.shape[0] - (1 << 16)
    sa = tmp_path / "idx" / "shard-00000" / "sa.bin"
    raw = bytearray(sa.read_bytes())
    raw[middle] ^= 0x10
    sa.write_bytes(bytes(raw))
    index = SuffixIndex.open(tmp_path / "idx", tokenizer=tok)  # the cheap checks cannot see it
    spec = retrospec.Speculator([index, retrospec.ContextSource()], budget=16)
    with caplog.at_level(logging.WARNING, logger="retrospec.drafting.speculator"):
        out = retrospec.generate(model, ids, speculator=spec, **kw)
    assert torch.equal(out.sequences, ref)
    (warning,) = caplog.records
    assert "sa.bin: block" in warning.getMessage() and "'suffix-index'" in warning.getMessage()


def test_tree_fault_names_what_is_wrong():
    ok = DraftTree.from_paths([[1, 2], [3]])
    assert tree_fault(ok, 8, 10) is None
    assert "outside the model's vocabulary" in tree_fault(ok, 8, 3)
    assert tree_fault(ok, 8, None) is None  # no model: ids are not checked
    assert "more than the 2 asked for" in tree_fault(ok, 2, 10)
    nan = DraftTree(ok.tokens, ok.parents, np.array([0.5, np.nan, 0.1], np.float32), ok.sources)
    assert "NaN" in tree_fault(nan, 8, 10)
    loop = DraftTree(ok.tokens, np.array([-1, 1, -1], np.int32), ok.scores, ok.sources)
    assert "parents" in tree_fault(loop, 8, 10)
