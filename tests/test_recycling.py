"""Token Recycling: template BFS, the update rule, persistence, and sharing across threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import repetitive_prompt, tiny_model

import retrospec
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


def _crafted(tmp_path, model, edit, meta_edit=None, name="rec.npz"):
    """A file saved by retrospec, then changed: ``edit(matrix)``, ``meta_edit(meta)``."""
    import io
    import json

    rec = TokenRecycling.for_model(model)
    rec.matrix[:, :2] = np.arange(rec.matrix.shape[0])[:, None] % 7
    matrix = rec.matrix.copy()
    edit(matrix)
    meta = {"format_version": 1, "k": rec.k, "vocab_size": int(matrix.shape[0]), "fingerprint": rec.fingerprint,
            "template": [list(p) for p in rec.template]}
    if meta_edit:
        meta_edit(meta)
    buf = io.BytesIO()
    np.savez(buf, matrix=matrix, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("value", [2**31 - 1, -(10**9), 96, -2])
def test_every_matrix_value_is_checked_at_load(tmp_path, value):
    model = tiny_model("llama")

    def plant(m):
        m[42, 0] = value

    with pytest.raises(ValueError, match=r"not token ids in \[-1, 96\), e.g. matrix\[42, 0\]"):
        TokenRecycling.load(_crafted(tmp_path, model, plant), model)


def test_half_the_rows_an_empty_fingerprint_and_bad_headers_are_refused(tmp_path):
    model = tiny_model("llama")
    half = _crafted(tmp_path, model, lambda m: None, lambda meta: meta.update(vocab_size=48))
    with pytest.raises(ValueError, match=r"matrix.npy is int32\[96, 8\]"):
        TokenRecycling.load(half, model)
    unmarked = _crafted(tmp_path, model, lambda m: None, lambda meta: meta.update(fingerprint=""))
    TokenRecycling.load(unmarked)  # without a model there is nothing to compare
    with pytest.raises(ValueError, match="carries no model fingerprint"):
        TokenRecycling.load(unmarked, model)
    for bad, message in [(dict(k="8"), "field k must be an integer"), (dict(template=[[9]]), "ranks in"),
                         (dict(template=[[0, 0]]), "before its parent"), (dict(vocab_size=None), "vocab_size"),
                         (dict(format="other"), "names format")]:
        with pytest.raises(ValueError, match=message):
            TokenRecycling.load(_crafted(tmp_path, model, lambda m: None, lambda meta, bad=bad: meta.update(bad)))


CRAFTED_DRAFT = """
import sys
import numpy as np
from retrospec.sources.recycling import TokenRecycling
rec = TokenRecycling(vocab_size=96, k=8)
rec.matrix[42, 0] = 2**31 - 1   # the issue's repro, assigned directly (no load to refuse it)
rec.matrix[42, 1] = 7
rec.matrix[7, 0] = -10**9
print(rec.draft(42, 80, 6).tokens.tolist())
"""


def test_the_bfs_kernel_never_indexes_outside_the_matrix():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", CRAFTED_DRAFT], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr  # was -11 (SIGSEGV)
    assert run.stdout.strip() == "[7]"


def test_updates_never_plant_ids_the_matrix_has_no_row_for():
    rec = TokenRecycling(vocab_size=10, k=2, template=((0,), (0, 0)))
    rec.update(np.array([1, 2]), np.array([[3, 500], [-9, 4]]))
    assert rec.matrix[1].tolist() == [3, EMPTY] and rec.matrix[2].tolist() == [EMPTY, 4]


def test_save_replaces_only_recycling_files(tmp_path):
    rec = TokenRecycling(vocab_size=10, k=2, template=((0,),))
    precious = tmp_path / "notes.npz"
    precious.write_bytes(b"not a matrix")
    with pytest.raises(ValueError, match="not a Token Recycling file; refusing to replace it"):
        rec.save(precious)
    assert precious.read_bytes() == b"not a matrix"
    rec.save(precious, force=True)
    rec.save(precious)  # a Token Recycling file now: replaced
    assert TokenRecycling.load(precious).k == 2
    with pytest.raises(ValueError, match="is a folder"):
        rec.save(tmp_path)


def test_saving_never_follows_a_planted_symlink(tmp_path):
    import os

    rec = TokenRecycling(vocab_size=10, k=2, template=((0,),))
    victim = tmp_path / "victim"
    victim.write_text("keep")
    path = tmp_path / "rec.npz"
    os.symlink(victim, tmp_path / f".rec.npz.{os.getpid()}.tmp")  # the old predictable temporary name
    rec.save(path)
    assert victim.read_text() == "keep" and TokenRecycling.load(path).k == 2


def test_two_threads_saving_one_path(tmp_path):
    recs = [TokenRecycling(vocab_size=50, k=4, template=((0,),)) for _ in range(2)]
    for i, rec in enumerate(recs):
        rec.matrix[:] = i
    errors = []

    def work(rec):
        try:
            for _ in range(10):
                rec.save(tmp_path / "shared.npz")
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(r,)) for r in recs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert np.unique(TokenRecycling.load(tmp_path / "shared.npz").matrix).size == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shared.npz"]
