"""Speculative greedy == plain generate() on tiny random models, through every source layout and verifier."""

from __future__ import annotations

import pytest
import torch
from conftest import repetitive_prompt, tiny_model
from helpers import OracleSource, plain, spec

import retrospec

ARCHS = ["llama", "qwen2", "gpt2", "gemma3"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_context_source_greedy_is_identical(arch, attn):
    model = tiny_model(arch, attn)
    for seed in range(3):
        ids = repetitive_prompt(96, 48, seed)
        ref = plain(model, ids, max_new_tokens=40)
        out = spec(model, ids, retrospec.Speculator(budget=12), max_new_tokens=40)
        assert torch.equal(out.sequences, ref), (arch, attn, seed)
        assert out.stats.new_tokens == ref.shape[1] - ids.shape[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_deep_wide_trees_with_hidden_truth(arch):
    """The accepted path sits at random siblings and depths: masks and KV compaction must be exact."""
    model = tiny_model(arch)
    for seed in range(3):
        ids = repetitive_prompt(96, 30, seed + 10)
        ref = plain(model, ids, max_new_tokens=48)
        oracle = OracleSource(ref[0, ids.shape[1] :].tolist(), 96, ids.shape[1], seed=seed)
        out = spec(model, ids, retrospec.Speculator([oracle], budget=40), max_new_tokens=48)
        assert torch.equal(out.sequences, ref), (arch, seed)
        assert out.stats.mean_accepted > 2.0  # the tree paths really were taken


def test_sliding_window_prompt_longer_than_the_window():
    """Gemma3 layers with a window of 8 and a 60-token prompt: the mask must apply the window."""
    model = tiny_model("gemma3")
    assert model.config.sliding_window == 8
    for seed in range(3):
        ids = repetitive_prompt(96, 60, seed)
        ref = plain(model, ids, max_new_tokens=40)
        oracle = OracleSource(ref[0, ids.shape[1] :].tolist(), 96, ids.shape[1], depth=6, seed=seed)
        out = spec(model, ids, retrospec.Speculator([oracle, retrospec.ContextSource()], budget=24), max_new_tokens=40)
        assert torch.equal(out.sequences, ref)


def test_sliding_window_would_fail_without_the_window_mask():
    """Guard the guard: the same run with the window ignored must differ."""
    from retrospec import loop

    model = tiny_model("gemma3")
    ids = repetitive_prompt(96, 60, 0)
    ref = plain(model, ids, max_new_tokens=40)
    oracle = OracleSource(ref[0, ids.shape[1] :].tolist(), 96, ids.shape[1], depth=6, seed=0)
    original = loop.DecodeSettings.__init__

    def no_window(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.windows = {"full_attention": None, "sliding_attention": None}

    loop.DecodeSettings.__init__ = no_window
    try:
        out = spec(model, ids, retrospec.Speculator([oracle], budget=24), max_new_tokens=40)
    finally:
        loop.DecodeSettings.__init__ = original
    assert not torch.equal(out.sequences, ref)


def test_logits_processors_apply_per_node_with_its_own_prefix():
    model = tiny_model("llama")
    ids = repetitive_prompt(96, 40, 9)
    kw = dict(max_new_tokens=40, repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=10)
    ref = plain(model, ids, **kw)
    oracle = OracleSource(ref[0, 40:].tolist(), 96, 40, depth=6)
    out = spec(model, ids, retrospec.Speculator([oracle, retrospec.ContextSource()], budget=24), **kw)
    assert torch.equal(out.sequences, ref)
    assert out.stats.mean_accepted > 1.5


def test_assistant_chain_compat_object():
    model = tiny_model("llama")
    ids = repetitive_prompt(96, 40, 10)
    ref = plain(model, ids, max_new_tokens=30)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30, pad_token_id=0,
                         assistant_model=retrospec.AssistantChain(model))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3"])
def test_static_cache_verifier_with_padded_trees(arch, caplog):
    """The fixed-shape verifier (padded tree slots, a few tree sizes) is exact too; on
    sliding-window models it falls back to the dynamic verifier with a log line."""
    from retrospec.verify.verifiers import VerifierPool

    model = tiny_model(arch)
    static = retrospec.VerifierConfig(mode="static")
    for seed in range(2):
        ids = repetitive_prompt(96, 30, seed + 20)
        ref = plain(model, ids, max_new_tokens=40)
        oracle = OracleSource(ref[0, ids.shape[1] :].tolist(), 96, ids.shape[1], seed=seed)
        speculator = retrospec.Speculator([oracle, retrospec.ContextSource()], budget=24)
        with caplog.at_level("INFO"):
            out = spec(model, ids, speculator, max_new_tokens=40, verifier=static)
        assert torch.equal(out.sequences, ref), (arch, seed)
        assert out.stats.mean_accepted > 2.0
    if arch == "gemma3":
        assert "verified with the dynamic verifier" in caplog.text
    else:
        assert len(VerifierPool.for_model(model)) == 1  # one static cache, reused across requests
