"""Speculative greedy == plain generate() on tiny random models, through every seam."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

import retrospec
from conftest import repetitive_prompt, tiny_model
from helpers import OracleSource

ARCHS = ["llama", "qwen2", "gpt2", "gemma3"]


def plain(model, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kw)


def spec(model, ids, speculator, **kw):
    return retrospec.generate(model, ids, speculator=speculator, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kw)


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


@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_new_tokens_is_exact(n):
    model = tiny_model("llama")
    ids = repetitive_prompt(96, 40, 1)
    ref = plain(model, ids, max_new_tokens=n)
    oracle = OracleSource(plain(model, ids, max_new_tokens=20)[0, 40:].tolist(), 96, 40, depth=8, error_rate=0.0)
    out = spec(model, ids, retrospec.Speculator([oracle], budget=16), max_new_tokens=n)
    assert out.sequences.shape[1] == ids.shape[1] + n
    assert torch.equal(out.sequences, ref)


class StopAfter(StoppingCriteria):
    """Stops once the sequence holds ``count`` tokens after the prompt."""

    def __init__(self, prompt_len, count):
        self.prompt_len, self.count = prompt_len, count

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.prompt_len >= self.count, dtype=torch.bool)


def test_stopping_criterion_fires_mid_block():
    model = tiny_model("llama")
    ids = repetitive_prompt(96, 40, 2)
    full = plain(model, ids, max_new_tokens=30)
    oracle = OracleSource(full[0, 40:].tolist(), 96, 40, depth=10, width=1, error_rate=0.0)
    speculator = retrospec.Speculator([oracle], budget=16)
    out = spec(model, ids, speculator, max_new_tokens=30, stopping_criteria=StoppingCriteriaList([StopAfter(40, 5)]))
    assert out.sequences[0, 40:].tolist() == full[0, 40:45].tolist()
    # the first verification could commit 11 tokens; the criterion cut it at 5
    assert out.stats.steps == 1 and out.stats.new_tokens == 5


def test_eos_stops_exactly():
    model = tiny_model("llama")
    ids = repetitive_prompt(96, 40, 3)
    full = plain(model, ids, max_new_tokens=30)[0, 40:].tolist()
    eos = full[9]  # the 10th generated token becomes the end-of-sequence token
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    oracle = OracleSource(full, 96, 40, depth=12, width=1, error_rate=0.0)
    out = retrospec.generate(model, ids, speculator=retrospec.Speculator([oracle], budget=16), attention_mask=torch.ones_like(ids),
                             do_sample=False, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    assert out.sequences[0, -1].item() == eos


class Collect:
    """A streamer that records what it is given."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_exactly_the_generated_tokens():
    model = tiny_model("llama")
    ids = repetitive_prompt(96, 40, 4)
    ref = plain(model, ids, max_new_tokens=25)
    streamer = Collect()
    out = retrospec.generate(model, ids, speculator=retrospec.Speculator(budget=12), streamer=streamer,
                             attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=25, pad_token_id=0)
    assert streamer.chunks[0] == ids[0].tolist()  # the prompt first, as generate() does
    assert sum(streamer.chunks[1:], []) == ref[0, 40:].tolist() == out.sequences[0, 40:].tolist()
    assert streamer.ended


def test_custom_generate_seam_with_streaming():
    model = tiny_model("qwen2")
    ids = repetitive_prompt(96, 40, 5)
    ref = plain(model, ids, max_new_tokens=25)
    streamer = Collect()
    speculator = retrospec.Speculator(budget=12)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=25, pad_token_id=0,
                         custom_generate=retrospec.custom_generate, speculator=speculator, retrospec_streamer=streamer)
    assert torch.equal(out, ref)  # a plain tensor, as generate() returns by default
    assert sum(streamer.chunks[1:], []) == ref[0, 40:].tolist()
    assert speculator.last_stats.new_tokens == 25
    as_dict = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=25, pad_token_id=0,
                             custom_generate=retrospec.custom_generate, speculator=speculator, return_dict_in_generate=True)
    assert torch.equal(as_dict.sequences, ref) and as_dict.stats.new_tokens == 25


def test_text_streamer_prints_the_generated_text(capsys):
    from transformers import AutoTokenizer  # noqa: F401  (the demo tokenizer is not needed: ids decode to themselves)

    class Tok:
        def decode(self, ids, **kw):
            return " ".join(str(i) for i in ids) + " "

    model = tiny_model("llama")
    ids = repetitive_prompt(96, 40, 6)
    ref = plain(model, ids, max_new_tokens=10)
    retrospec.generate(model, ids, speculator=retrospec.Speculator(budget=8), streamer=TextStreamer(Tok(), skip_prompt=True),
                       attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10, pad_token_id=0)
    printed = capsys.readouterr().out.split()
    assert [int(x) for x in printed] == ref[0, 40:].tolist()


def test_batch_rows_with_left_padding():
    model = tiny_model("llama")
    a, b = repetitive_prompt(96, 40, 7), repetitive_prompt(96, 28, 8)
    pad = 0
    batch = torch.full((2, 40), pad)
    batch[0] = a[0]
    batch[1, 12:] = b[0]
    mask = torch.zeros_like(batch)
    mask[0] = 1
    mask[1, 12:] = 1
    ref = model.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=pad)
    out = retrospec.generate(model, batch, speculator=retrospec.Speculator(budget=8), attention_mask=mask,
                             do_sample=False, max_new_tokens=20, pad_token_id=pad)
    assert torch.equal(out.sequences, ref)


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


def test_flash_attention_is_switched_to_sdpa_for_the_call(caplog):
    from retrospec.hooks import _tree_attention

    class Config:
        _attn_implementation = "flash_attention_2"

    class Model:
        config = Config()
        calls = []

        def set_attn_implementation(self, name):
            self.calls.append(name)
            self.config._attn_implementation = name

    model = Model()
    with caplog.at_level("INFO"), _tree_attention(model):
        assert model.config._attn_implementation == "sdpa"
    assert model.calls == ["sdpa", "flash_attention_2"]
    assert "sdpa" in caplog.text


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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3"])
def test_static_cache_verifier_with_padded_trees(arch, caplog):
    """The fixed-shape verifier (StaticCache, padded tree slots) is exact too; on sliding-window
    models it falls back to the dynamic cache with a log line."""
    model = tiny_model(arch)
    config = retrospec.SpeculatorConfig(verify="static")
    for seed in range(2):
        ids = repetitive_prompt(96, 30, seed + 20)
        ref = plain(model, ids, max_new_tokens=40)
        oracle = OracleSource(ref[0, ids.shape[1] :].tolist(), 96, ids.shape[1], seed=seed)
        speculator = retrospec.Speculator([oracle, retrospec.ContextSource()], budget=24, config=config)
        with caplog.at_level("INFO"):
            out = spec(model, ids, speculator, max_new_tokens=40)
        assert torch.equal(out.sequences, ref), (arch, seed)
        assert out.stats.mean_accepted > 2.0
    if arch == "gemma3":
        assert "verified with the dynamic cache" in caplog.text
    else:
        assert len(speculator.verifiers) == 1  # one static cache, reused across requests


def test_two_threads_sharing_one_static_speculator_match_plain_greedy():
    """A static verifier holds its request's KV cache: concurrent requests must not share one."""
    import threading

    model = tiny_model("llama")
    speculator = retrospec.Speculator([retrospec.ContextSource()], budget=8, config=retrospec.SpeculatorConfig(verify="static"))
    prompts = [repetitive_prompt(96, 30, seed) for seed in range(30, 36)]
    refs = [plain(model, ids, max_new_tokens=40) for ids in prompts]
    outs: dict[int, torch.Tensor] = {}
    start = threading.Barrier(2)

    def work(worker: int) -> None:
        start.wait()
        for i in range(worker, len(prompts), 2):
            outs[i] = spec(model, prompts[i], speculator, max_new_tokens=40).sequences

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ref in enumerate(refs):
        assert torch.equal(outs[i], ref), i
    assert 1 <= len(speculator.verifiers) <= 2


def test_stop_rule_fast_path_matches_the_criteria():
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

    from retrospec.loop import StopRule

    rule = StopRule(StoppingCriteriaList([MaxLengthCriteria(10), EosTokenCriteria(torch.tensor([7, 9]))]))
    assert rule.fast and rule.max_length == 10 and rule.eos == {7, 9}
    assert rule.first_stop([1, 2, 3], length_before=5) is None
    assert rule.first_stop([1, 9, 3], length_before=5) == 2  # EOS is kept, then stop
    assert rule.first_stop([1, 2, 3, 4, 5], length_before=7) == 3  # the 10th token ends it
    assert not StopRule(StoppingCriteriaList([StopAfter(0, 3)])).fast  # unknown criteria: checked one by one


def test_verifier_choice():
    from retrospec.verify.verifiers import DynamicVerifier, StaticVerifier, VerifierPool, make_verifier

    model = tiny_model("llama")
    windows = {"full_attention": None}
    assert isinstance(make_verifier(model, "auto", windows, 100, 17), DynamicVerifier)  # CPU: dynamic
    pool = VerifierPool()
    a = make_verifier(model, "static", windows, 300, 17, pool)
    assert isinstance(a, StaticVerifier) and a.max_len == 1024  # cache sizes come in a few buckets
    b = make_verifier(model, "static", windows, 900, 17, pool)
    assert b is not a  # a is still lent to its request: it holds that request's cache
    pool.release(a)
    assert make_verifier(model, "static", windows, 900, 17, pool) is a and len(pool) == 2
    with pytest.raises(ValueError, match="CUDA"):
        make_verifier(model, "graph", windows, 100, 17)
    with pytest.raises(ValueError, match="verify mode"):
        make_verifier(model, "fast", windows, 100, 17)
