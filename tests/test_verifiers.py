"""Which verifier runs, and what the API refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import repetitive_prompt, tiny_model
from helpers import plain, spec

import retrospec


@pytest.mark.parametrize(("before", "during"), [("flash_attention_2", "retrospec_sdpa"), ("sdpa", "retrospec_sdpa"),
                                                  ("eager", "eager")])
def test_attention_is_switched_for_the_call_and_back(caplog, before, during):
    from retrospec.verify.attention import tree_attention

    class Config:
        _attn_implementation = before

    class Model:
        config = Config()

        def __init__(self):
            self.calls = []

        def set_attn_implementation(self, name):
            self.calls.append(name)
            self.config._attn_implementation = name

    model = Model()
    with caplog.at_level("INFO"), tree_attention(model):
        assert model.config._attn_implementation == during
    assert model.config._attn_implementation == before
    assert model.calls == ([] if before == during else [during, before])
    assert ("cannot take a tree mask" in caplog.text) == before.startswith("flash")


@pytest.mark.parametrize(("batch", "mask_batch", "heads", "kv_heads", "queries"),
                         [(4, 4, 9, 3, 5), (2, 1, 4, 2, 9), (1, 1, 8, 1, 17), (3, 3, 4, 4, 6), (2, 2, 6, 3, 1)])
def test_packed_tree_attention_equals_sdpa_bit_for_bit(batch, mask_batch, heads, kv_heads, queries):
    """Many queries a row, grouped heads packed instead of repeated: transformers' sdpa's
    output exactly, for tree masks (each query sees a subset of the tree and masked cache
    positions), broadcast masks, one key-value head, no groups and one query (passed through)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from retrospec.verify.attention import packed_sdpa

    class Module:
        num_key_value_groups = heads // kv_heads

    g = torch.Generator().manual_seed(heads * 100 + queries)
    cache = 37
    q = torch.randn(batch, heads, queries, 16, generator=g)
    k, v = (torch.randn(batch, kv_heads, cache + queries, 16, generator=g) for _ in range(2))
    sees = torch.rand(mask_batch, 1, queries, cache + queries, generator=g) < 0.7
    sees[..., cache:] &= torch.ones(queries, queries, dtype=torch.bool).tril()  # a tree sees a subset of its ancestors
    sees[..., 0] = True  # every query sees something
    mask = torch.zeros(sees.shape).masked_fill(~sees, float("-inf"))
    want, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](Module(), q, k, v, mask, scaling=0.25)
    got, _ = packed_sdpa(Module(), q, k, v, mask, scaling=0.25)
    assert got.shape == (batch, queries, heads, 16) and torch.equal(got, want)


def test_bad_requests_get_clear_errors():
    model = tiny_model("gpt2", n_positions=64)
    ids = repetitive_prompt(96, 80, 0)
    with pytest.raises(ValueError, match="positions end at 64"):
        spec(model, ids, retrospec.Speculator(budget=4), max_new_tokens=4)
    llama = tiny_model("llama")
    ids = repetitive_prompt(96, 20, 0)
    with pytest.raises(ValueError, match="beam search"):
        spec(llama, ids, retrospec.Speculator(budget=4), max_new_tokens=4, num_beams=2)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with pytest.raises(ValueError, match="right padding"):
        retrospec.generate(llama, ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)


def test_verifier_choice():
    from retrospec.verify.verifiers import DynamicVerifier, StaticVerifier, VerifierPool, make_verifier, release_verifier

    model = tiny_model("llama")
    windows = {"full_attention": None}
    auto, static = retrospec.VerifierConfig(), retrospec.VerifierConfig(mode="static", slot_options=(0, 8))
    assert isinstance(make_verifier(model, auto, windows, 1, 100, 16), DynamicVerifier)  # CPU: dynamic
    pool = VerifierPool.for_model(model)
    a = make_verifier(model, static, windows, 1, 300, 16)
    assert isinstance(a, StaticVerifier) and a.capacity == 1024  # cache sizes come in a few buckets
    assert a.node_options == (0, 8, 16)  # the configured sizes, capped by the budget
    by_batch = retrospec.VerifierConfig(mode="static", slots=64)
    assert by_batch.node_options(16, batch=1) == (16,) and by_batch.node_options(128, batch=16) == (0, 16)
    b = make_verifier(model, static, windows, 1, 900, 16)
    assert b is not a  # a is still lent to its request: it holds that request's cache
    release_verifier(model, a)
    assert make_verifier(model, static, windows, 1, 900, 16) is a and len(pool) == 2
    assert make_verifier(model, static, windows, 3, 900, 16).batch == 4  # batch buckets
    with pytest.raises(ValueError, match="CUDA"):
        make_verifier(model, retrospec.VerifierConfig(mode="graph"), windows, 1, 100, 16)
    with pytest.raises(ValueError, match="verify mode"):
        retrospec.VerifierConfig(mode="fast")


def test_calls_without_a_speculator_share_the_models_default(caplog):
    from retrospec.hooks import default_speculator

    model = tiny_model("llama")
    ids = repetitive_prompt(96, 20, 3)
    out = retrospec.generate(model, ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, pad_token_id=0)
    spec = default_speculator(model)
    assert spec is default_speculator(model) and spec.last_stats is out.stats  # kept with the model
    assert spec.source_names == ["context", "recycling", "history"]
    assert default_speculator(tiny_model("llama")) is not spec
    with caplog.at_level("WARNING"):
        retrospec.generate(model, ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, pad_token_id=0, documents=["some text"])
    assert "no document source" in caplog.text  # documents that nothing reads are not dropped silently


@pytest.mark.slow
def test_one_dynamic_compile_serves_every_static_shape():
    """The compiled step (CPU inductor here) gives the eager step's logits for several
    batch sizes and cache capacities, and compiles once for all rows >= 2 (a shape that
    changes only a row count, a capacity or the slot count, a plain step's included, is no
    new compile)."""
    import numpy as np
    from torch._dynamo.utils import counters

    from retrospec.tree import DraftTree
    from retrospec.verify.verifiers import StaticVerifier

    model = tiny_model("llama")
    rng = np.random.default_rng(0)
    graphs = []
    with torch.no_grad():
        for batch, capacity in [(2, 64), (4, 64), (4, 128)]:
            trees = [DraftTree.from_paths([rng.integers(0, 90, size=rng.integers(1, 3)).tolist() for _ in range(2)]) for _ in range(batch)]
            roots, past = rng.integers(0, 90, batch).tolist(), np.full(batch, 24)
            logits = []
            for compile in (False, True):
                v = StaticVerifier(model, {"full_attention": None}, batch, capacity, (4,), compile=compile)
                v.warm()
                v.prefill([np.arange(24) % 90] * batch, list(range(batch)))
                logits.append(v.verify(trees, roots, past, 4).logits.clone())
            torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
            graphs.append(counters["stats"]["unique_graphs"])
        # a plain step (0 nodes) runs in 2 slots, so it shares the compile too
        v = StaticVerifier(model, {"full_attention": None}, 2, 64, (0, 4), compile=True)
        v.warm()
        assert v.steps[0].slots == 2
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1, 1], graphs
    with pytest.raises(ValueError, match="at least 2 rows"):
        StaticVerifier(model, {"full_attention": None}, 1, 64, (4,), compile=True)


def test_a_prefill_as_chained_graph_steps_equals_the_eager_one():
    """Prompts longer than one step (and one row left free) read as chained steps of the
    widest slot count give the eager prefill's logits and the same cached keys; a batch
    decoded after such a prefill equals plain generate() row by row."""
    import numpy as np

    from retrospec.loop import DecodeSettings, Request, decode
    from retrospec.verify.verifiers import StaticVerifier, VerifierConfig

    model = tiny_model("llama")
    prompts = [repetitive_prompt(96, n, seed + 40)[0].numpy() for seed, n in enumerate((23, 9, 40))]
    caches, logits = [], []
    with torch.no_grad():
        for mode in ("eager", "chunked"):
            v = StaticVerifier(model, {"full_attention": None}, 4, 128, (8,))
            v.prefill_mode = mode
            logits.append(v.prefill(prompts, [0, 1, 3], alone=True))
            caches.append(v.cache)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    for eager, chunked in zip(caches[0].layers, caches[1].layers):
        for row, prompt in zip([0, 1, 3], prompts):
            torch.testing.assert_close(chunked.keys[row, :, : len(prompt)], eager.keys[row, :, : len(prompt)], rtol=1e-4, atol=1e-4)
    # a prompt that would reach the null rows' region is read eagerly, whatever the mode
    v = StaticVerifier(model, {"full_attention": None}, 4, 128, (8,))
    v.prefill_mode = "chunked"
    assert v._chunked(prompts) and not v._chunked([np.zeros(120, np.int64)])  # 120 + 9 slots + 1 > 128

    refs = [plain(model, torch.as_tensor(p)[None], max_new_tokens=20)[0, len(p) :].tolist() for p in prompts]
    v = StaticVerifier(model, {"full_attention": None}, 4, 128, (8,))
    v.prefill_mode = "chunked"
    settings = DecodeSettings(None, None, frozenset(), False, 20, {"full_attention": None}, None)
    results, _ = decode(model, [Request(p) for p in prompts], retrospec.Speculator(budget=8), settings, VerifierConfig(mode="static"),
                        verifier=v)
    assert [r.tokens for r in results] == refs
