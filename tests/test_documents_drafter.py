"""Document source, document store, model drafter (EAGLE-2 tree, RASD rescoring, RAPID view)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import repetitive_prompt, tiny_model

import retrospec
from retrospec.sources.documents import DocumentConfig, DocumentSource
from retrospec.sources.drafter import DrafterConfig, ModelDrafter, rapid_view
from retrospec.tree import DraftTree


class WordTokenizer:
    """Whitespace words -> ids (a fixed table); offsets are character spans."""

    def __init__(self, words):
        self.ids = {w: i for i, w in enumerate(words)}
        self.words = {i: w for w, i in self.ids.items()}
        self.name_or_path = "words"
        self.bos_token = self.eos_token = self.pad_token = self.unk_token = None

    def _one(self, text):
        ids, offsets, pos = [], [], 0
        for word in text.split():
            start = text.index(word, pos)
            ids.append(self.ids[word])
            offsets.append((start, start + len(word)))
            pos = start + len(word)
        return ids, offsets

    def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False):
        single = isinstance(texts, str)
        encoded = [self._one(t) for t in ([texts] if single else texts)]
        out = {"input_ids": [e[0] for e in encoded]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e[1] for e in encoded]
        return {k: v[0] for k, v in out.items()} if single else out

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.words[int(i)] for i in ids)

    def get_vocab(self):
        return dict(self.ids)


WORDS = [
    "the",
    "lighthouse",
    "was",
    "completed",
    "in",
    "1871",
    "and",
    "electrified",
    "1934",
    "its",
    "last",
    "keeper",
    "Margaret",
    "Olsen",
    "finished",
    "built",
    "a",
    "tower",
]


def ids(tok, text):
    return np.asarray(tok(text)["input_ids"], np.int64)


def test_documents_exact_suffix_continuations():
    tok = WordTokenizer(WORDS)
    src = DocumentSource(tok, config=DocumentConfig(max_depth=4))
    docs = ["the lighthouse was completed in 1871 and electrified in 1934", "its last keeper Margaret Olsen"]
    context = ids(tok, "a tower was completed in")
    tree = src.start_request(context, docs).propose(context, 16, 4)
    assert tree.paths() == [[ids(tok, "1871")[0], ids(tok, "and")[0], ids(tok, "electrified")[0], ids(tok, "in")[0]]]
    # the continuation stops at the end of its document
    context = ids(tok, "its last keeper Margaret")
    assert src.start_request(context, docs).propose(context, 16, 8).paths() == [[ids(tok, "Olsen")[0]]]


def test_documents_fuzzy_anchor_when_the_model_paraphrases():
    tok = WordTokenizer(WORDS)
    src = DocumentSource(tok, config=DocumentConfig(max_depth=2, fuzzy_threshold=70))
    docs = ["the lighthouse was completed in 1871 and electrified in 1934"]
    # "finished" never occurs: no exact 2-token suffix, but the text aligns with the document
    context = ids(tok, "the lighthouse was finished")
    tree = src.start_request(context, docs).propose(context, 16, 2)
    assert [ids(tok, "in")[0], ids(tok, "1871")[0]] in tree.paths()


def test_documents_without_documents_or_store_draft_nothing():
    tok = WordTokenizer(WORDS)
    context = ids(tok, "the lighthouse")
    assert len(DocumentSource(tok).start_request(context).propose(context, 8, 4)) == 0
    with pytest.raises(ValueError, match="tokenizer"):
        DocumentSource(None)


def test_rapid_view_keeps_the_most_relevant_chunks_and_the_end():
    cfg = DrafterConfig(rapid_threshold=10, rapid_chunk=4, rapid_budget=8, rapid_tail=4)
    prompt = np.array([1, 2, 3, 4, 9, 9, 9, 9, 5, 6, 7, 8, 1, 2, 3, 0])
    assert rapid_view(prompt, cfg).tolist() == [1, 2, 3, 4, 1, 2, 3, 0]
    assert rapid_view(prompt[:8], cfg).tolist() == prompt[:8].tolist()  # short prompts are read whole


def test_a_drafter_equal_to_the_target_is_accepted_almost_always():
    """Drafting with the target itself checks the drafter's cache, positions and tree masks."""
    model = tiny_model("llama")
    ids_ = repetitive_prompt(96, 30, 11)
    kw = dict(attention_mask=torch.ones_like(ids_), do_sample=False, max_new_tokens=40, pad_token_id=0)
    ref = model.generate(ids_, **kw)
    drafter = ModelDrafter(model, DrafterConfig(depth=4, top_k=2, frontier=2, rescore=False))
    out = retrospec.generate(model, ids_, speculator=retrospec.Speculator([drafter], budget=16), **kw)
    assert torch.equal(out.sequences, ref)
    assert out.stats.mean_accepted > 4.0  # 4 drafted + 1 bonus per step, nearly always


def test_rasd_rescoring_gives_the_drafter_probabilities():
    model = tiny_model("qwen2")
    drafter = ModelDrafter(model, DrafterConfig(depth=1, top_k=2))
    prompt = repetitive_prompt(96, 20, 12)[0].numpy()
    other = DraftTree.from_paths([[5, 6], [7]], [[0.9, 0.8], [0.5]])
    session = drafter.start_request(prompt)
    _, (rescored,) = session.propose_with(prompt, [other], 8, 4)
    with torch.no_grad():
        logp_root = torch.log_softmax(model(torch.from_numpy(prompt)[None]).logits[0, -1].float(), -1)
        logp_5 = torch.log_softmax(model(torch.tensor([prompt.tolist() + [5]])).logits[0, -1].float(), -1)
    expected = [logp_root[5].exp(), (logp_root[5] + logp_5[6]).exp(), logp_root[7].exp()]
    assert rescored.scores.tolist() == pytest.approx([float(e) for e in expected], rel=1e-3)
    assert session.cache.get_seq_length() == len(prompt)  # only the committed context stays cached


def test_the_drafter_reads_a_long_prompt_without_its_logits():
    """Catching up on the prompt fills the cache only: a 16k-token document's logits would be
    10 GB in fp32 (the L-Eval run that was OOM-killed at 24 GB)."""
    model = tiny_model("qwen2")
    drafter = ModelDrafter(model, DrafterConfig(depth=2, top_k=2))
    prompt = repetitive_prompt(96, 40, 13)[0].numpy()
    rows = []
    hook = model.register_forward_hook(lambda module, args, out: rows.append(out.logits.shape[1]))
    try:
        session = drafter.start_request(prompt)
        session.propose_with(prompt, [], 8, 2)
    finally:
        hook.remove()
    assert rows[0] == 1  # the catch-up over prompt[:-1] kept one row of logits
    assert max(rows) < len(prompt) // 2
    assert session.cache.get_seq_length() == len(prompt)


def test_fused_drafter_documents_context_stay_lossless():
    model = tiny_model("llama", seed=5)
    drafter_model = tiny_model("llama", seed=6)
    prompt = repetitive_prompt(96, 40, 13)
    kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=40, pad_token_id=0)
    ref = model.generate(prompt, **kw)
    sources = [
        retrospec.ContextSource(),
        ModelDrafter(drafter_model, DrafterConfig(depth=2, rapid_threshold=24, rapid_chunk=8, rapid_budget=24, rapid_tail=8)),
    ]
    out = retrospec.generate(model, prompt, speculator=retrospec.Speculator(sources, budget=24), **kw)
    assert torch.equal(out.sequences, ref)


def test_knowledge_transfer_is_opt_in_and_changes_the_output_as_documented():
    target = tiny_model("llama", seed=7)
    draft_model = tiny_model("llama", seed=8)
    ids = repetitive_prompt(96, 24, 14)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24, pad_token_id=0)
    target_greedy = target.generate(ids, **kw)
    draft_greedy = draft_model.generate(ids, **kw)
    assert not torch.equal(target_greedy, draft_greedy)
    lossless = ModelDrafter(draft_model, DrafterConfig(depth=2))
    out = retrospec.generate(target, ids, speculator=retrospec.Speculator([lossless], budget=8), **kw)
    assert torch.equal(out.sequences, target_greedy)  # transfer = 0: lossless
    full = ModelDrafter(draft_model, DrafterConfig(depth=2, transfer=1.0))
    out = retrospec.generate(target, ids, speculator=retrospec.Speculator([full], budget=8), **kw)
    assert torch.equal(out.sequences, draft_greedy)  # transfer = 1: the drafter's own text
    with pytest.raises(ValueError, match="transfer"):
        DrafterConfig(transfer=1.5)
