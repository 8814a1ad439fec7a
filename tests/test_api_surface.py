"""Direct calls of the public helpers that the end-to-end tests only reach indirectly."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import BENCH, repetitive_prompt, tiny_model

import retrospec
from retrospec import compat, models
from retrospec.buffers import prefill_buffers, to_buffers
from retrospec.datastores.corpus import ReadOptions, iter_documents
from retrospec.datastores.files import edge_digest, file_digest, tokenizer_identity, write_atomic
from retrospec.datastores.suffix_build import suffix_array
from retrospec.datastores.suffix_index import bits_for, pack_bits, sa_range
from retrospec.drafting.budget import StepCost
from retrospec.paths import cache_dir, cache_root
from retrospec.sources.recycling import model_fingerprint
from retrospec.sources.registry import Datastores, make_source, recycling_for
from retrospec.tools import bench, prompts
from retrospec.tools.demo import demo_prompts
from retrospec.tools.simulate import replay
from retrospec.tree import DraftTree, prune_with_index
from retrospec.verify.acceptance import pick_token, predictions
from retrospec.verify.cache import RowCache
from retrospec.verify.step_cost import measure_step_cost


def test_compat_and_models_helpers():
    model = tiny_model("llama")
    assert compat.cache_kwarg(model) in ("cache", "past_key_values")
    assert compat.accepts(model, "position_ids") and not compat.accepts(model, "no_such_argument")
    assert compat.max_positions(model.config) == 1024
    assert models.parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        models.parse_dtype("fp8")
    assert models.spec_for("smollm2-135m").arch == "llama"
    assert isinstance(models.is_fetched("gemma3-270m"), bool)


def test_paths_follow_the_environment(isolated_cache):
    assert cache_root() == isolated_cache
    assert cache_dir("a", "b").is_dir()
    write_atomic(isolated_cache / "x.json", b"{}")
    assert (isolated_cache / "x.json").read_bytes() == b"{}"


def test_verify_and_cache_primitives():
    """A prompt and a tree through a RowCache by hand: the tree's logits equal the logits of
    each path fed to the model plainly, and moving the accepted slots keeps them exact."""
    model = tiny_model("llama")
    ids = repetitive_prompt(96, 12, 0)
    cache = RowCache(model.config, batch=1, capacity=32)
    ckw = {compat.cache_kwarg(model): cache}  # 5.24 says cache=; 5.17 takes past_key_values and would drop cache=
    positions, index, mask = prefill_buffers([12], 12, key_len=12, scratch=cache.scratch)
    cache.prepare(index, view=12)
    model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **ckw)
    buffers = to_buffers(DraftTree.from_paths([[5, 6], [7]]), root_token=3, past_len=12)
    cache.prepare(buffers.cache_index, view=16)
    logits = model(input_ids=buffers.input_ids, position_ids=buffers.position_ids, attention_mask=buffers.attention_mask,
                   use_cache=True, **ckw).logits[0]
    assert logits.shape == (4, 96)
    plain_logits = model(torch.cat([ids, torch.tensor([[3, 7]])], 1)).logits[0, -2:]
    torch.testing.assert_close(logits[[0, 3]], plain_logits, rtol=1e-4, atol=1e-4)  # root, then node 7
    preds, top = predictions(logits, 3)
    assert preds.shape == (4,) and top.shape == (4, 3) and (top[:, 0] == preds).all()
    assert pick_token(logits[:1], ids, None, False) == int(preds[0])
    cache.move(torch.tensor([[12, 15]]), torch.tensor([[12, 13]]))  # keep root and node 7
    buffers = to_buffers(DraftTree.empty(), root_token=9, past_len=14)
    cache.prepare(buffers.cache_index, view=15)
    after = model(input_ids=buffers.input_ids, position_ids=buffers.position_ids, attention_mask=buffers.attention_mask,
                  use_cache=True, **ckw).logits[0, 0]
    torch.testing.assert_close(after, model(torch.cat([ids, torch.tensor([[3, 7, 9]])], 1)).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_step_cost_measurement_gives_a_time_per_size():
    cost = measure_step_cost(tiny_model("llama"), sizes=(1, 4), context=8, repeats=1)
    assert isinstance(cost, StepCost) and len(cost.seconds) == 2 and cost(2) > 0


def test_tree_and_index_helpers(tmp_path):
    t = DraftTree.from_paths([[1, 2], [3]], [[0.9, 0.5], [0.7]])
    pruned, keep = prune_with_index(t, 2)
    assert pruned.tokens.tolist() == [1, 3] and keep.tolist() == [0, 2]
    tokens = np.array([2, 1, 2, 1, 0], np.uint16)
    sa = suffix_array(tokens)
    assert sa.tolist() == [4, 3, 1, 2, 0]  # suffixes 0 < 1 0 < 1 2 1 0 < 2 1 0 < 2 1 2 1 0
    w = bits_for(4)
    assert sa_range(pack_bits(tokens.astype(np.int64), w), w, pack_bits(sa, 3), 3, 5, np.array([2, 1]), 2) == (3, 5)
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert len(file_digest(path)) == 64 and len(edge_digest(path, 3)) == 64


def test_prompts_and_corpus_readers(tmp_path):
    assert prompts.parse_record({"task_id": "t", "prompt": "def f():"}).raw
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": 1, "category": "x", "turns": ["hi"]}) + "\n")
    assert [obj["id"] for _, obj in prompts.read_jsonl(path)] == [1]
    assert len(demo_prompts()) == 4
    docs = list(iter_documents([path], ReadOptions(field="category")))
    assert docs[0].text == "x"


def test_sources_by_name_and_fingerprints():
    model = tiny_model("llama")
    assert len(model_fingerprint(model)) == 16
    assert recycling_for(model).matrix.shape[0] == 96
    assert make_source("context", model, None).name == "context"
    with pytest.raises(ValueError, match="--index"):
        make_source("suffix-index", model, None, Datastores())
    with pytest.raises(ValueError, match="unknown source"):
        make_source("oracle", model, None)
    assert bench.split_budget("retrospec@16") == ("retrospec", "16")
    with pytest.raises(ValueError):
        bench.check_method("context+magic")


def test_simulator_replay_counts_steps():
    spec = retrospec.Speculator(budget=8)
    prompt = np.array([1, 2, 3, 1, 2, 3, 1, 2])
    # the reference continues the cycle: the context source drafts it all after the first token
    assert replay(spec, prompt, np.array([3, 1, 2, 3, 1, 2])) == 1


@pytest.mark.real
def test_tokenizer_identity_of_a_real_tokenizer(smollm2):
    identity = tokenizer_identity(smollm2[1])
    assert identity["vocab_size"] == 49152 and len(identity["fingerprint"]) == 20
    # generation settings do not change how text becomes ids, so they keep the fingerprint
    other = copy.deepcopy(smollm2[1])
    other.eos_token, other.pad_token = "<|endoftext|>", None
    assert tokenizer_identity(other)["fingerprint"] == identity["fingerprint"]
    other.add_tokens(["retrospec_probe_token"])
    assert tokenizer_identity(other)["fingerprint"] != identity["fingerprint"]
    assert BENCH.exists()
