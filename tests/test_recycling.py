"""Token Recycling: template BFS, the update rule, persistence, and sharing across threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import retrospec
from conftest import repetitive_prompt, tiny_model
from retrospec.sources.recycling import EMPTY, REFERENCE_TEMPLATE, TokenRecycling


def test_reference_template_is_the_papers_80_node_tree():
    assert len(REFERENCE_TEMPLATE) == 80
    by_depth = np.bincount([len(p) for p in REFERENCE_TEMPLATE])[1:].tolist()
    assert by_depth == [8, 21, 25, 15, 8, 3]
    assert REFERENCE_TEMPLATE[:3] == ((0,), (1,), (2,)) and REFERENCE_TEMPLATE[-1] == (0, 0, 0, 1, 0, 0)


def test_bfs_token_table():
    rec = TokenRecycling(vocab_size=20, k=2, template=((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))
    rec.matrix[3] = [4, 5]
    rec.matrix[4] = [6, 7]
    rec.matrix[5] = [8, EMPTY]
    rec.matrix[6] = [9, 10]
    tree = rec.draft(3, max_nodes=16, max_depth=8)
    # root 3 -> (4 -> (6 -> 9), 7), (5 -> 8)
    assert tree.tokens.tolist() == [4, 5, 6, 7, 8, 9]
    assert tree.parents.tolist() == [-1, -1, 0, 0, 1, 2]
    assert rec.draft(3, max_nodes=16, max_depth=1).tokens.tolist() == [4, 5]
    assert rec.draft(3, max_nodes=3, max_depth=8).tokens.tolist() == [4, 5, 6]  # BFS order keeps it prefix-closed
    assert len(rec.draft(11, 16, 8)) == 0  # a row never written
    tree.validate()


def test_update_overwrites_every_verified_row_accepted_path_last():
    rec = TokenRecycling(vocab_size=10, k=2, template=((0,),))
    slot_tokens = np.array([1, 2, 2, 3])  # token 2 verified twice: in a rejected and an accepted slot
    topk = np.array([[5, 6], [7, 8], [9, 0], [4, 4]])
    rec.update(slot_tokens, topk, accepted_slots=np.array([0, 2]))
    assert rec.matrix[1].tolist() == [5, 6]
    assert rec.matrix[2].tolist() == [9, 0]  # the accepted slot's prediction wins
    assert rec.matrix[3].tolist() == [4, 4]  # rejected branches are recycled too


def test_save_load_round_trip_and_refusals(tmp_path):
    model = tiny_model("llama")
    rec = TokenRecycling.for_model(model)
    rec.matrix[5] = np.arange(8)
    path = tmp_path / "rec.npz"
    rec.save(path)
    again = TokenRecycling.load(path, model)
    assert np.array_equal(again.matrix, rec.matrix) and again.template == rec.template
    with pytest.raises(ValueError, match="made for another model"):
        TokenRecycling.load(path, tiny_model("llama", seed=9))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable Token Recycling file"):
        TokenRecycling.load(path)
    with pytest.raises(ValueError, match="ranks"):
        TokenRecycling(10, k=2, template=((0,), (2,)))


def test_recycling_learns_and_stays_lossless():
    model = tiny_model("qwen2")
    rec = TokenRecycling.for_model(model)
    ids = repetitive_prompt(96, 30, 5)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48, pad_token_id=0)
    ref = model.generate(ids, **kw)
    spec = retrospec.Speculator([rec], budget=80)
    first = retrospec.generate(model, ids, speculator=spec, **kw)
    second = retrospec.generate(model, ids, speculator=spec, **kw)  # hot start: the matrix remembers
    assert torch.equal(first.sequences, ref) and torch.equal(second.sequences, ref)
    assert second.stats.mean_accepted > first.stats.mean_accepted
    assert (rec.matrix != EMPTY).any(axis=1).sum() > 10


def test_two_threads_sharing_one_matrix_match_plain_greedy():
    model = tiny_model("llama", seed=2)
    rec = TokenRecycling.for_model(model)
    prompts = [repetitive_prompt(96, 30, s) for s in (6, 7)]
    kw = dict(do_sample=False, max_new_tokens=40, pad_token_id=0)
    refs = [model.generate(p, attention_mask=torch.ones_like(p), **kw) for p in prompts]
    outs: dict[int, torch.Tensor] = {}

    def work(i):
        spec = retrospec.Speculator([retrospec.ContextSource(), rec], budget=24)
        for _ in range(3):
            outs[i] = retrospec.generate(model, prompts[i], speculator=spec, attention_mask=torch.ones_like(prompts[i]), **kw).sequences
            assert torch.equal(outs[i], refs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(outs[i], refs[i]) for i in range(2))
