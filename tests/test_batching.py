"""Batches: every row of a batched run equals plain generate() of that row alone."""

from __future__ import annotations

import pytest
import torch
from conftest import repetitive_prompt, tiny_model
from helpers import OracleSource, plain
from transformers import StoppingCriteria, StoppingCriteriaList

import retrospec

LENGTHS = [48, 30, 61, 12, 40]


def left_padded(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.shape[1] :] = p[0]
        mask[b, width - p.shape[1] :] = 1
    return ids, mask


def rows_of(out, width: int) -> list[list[int]]:
    return [out.sequences[b, width : width + out.lengths[b]].tolist() for b in range(out.sequences.shape[0])]


def alone(model, prompts, **kw) -> list[list[int]]:
    return [plain(model, p, **kw)[0, p.shape[1] :].tolist() for p in prompts]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3"])
def test_every_row_equals_that_row_alone(arch, attn, mode):
    """Prompts of different lengths, left-padded; rows accept different lengths every step."""
    model = tiny_model(arch, attn)
    prompts = [repetitive_prompt(96, n, seed) for seed, n in enumerate(LENGTHS)]
    refs = alone(model, prompts, max_new_tokens=30)
    ids, mask = left_padded(prompts)
    oracles = [OracleSource(r, 96, p.shape[1], seed=i) for i, (r, p) in enumerate(zip(refs, prompts))]
    # one oracle per row would need per-row sources: the context source drafts for all rows,
    # the recycling matrix is shared between them
    speculator = retrospec.Speculator([retrospec.ContextSource(), retrospec.TokenRecycling.for_model(model)], budget=12)
    out = retrospec.generate(model, ids, attention_mask=mask, speculator=speculator, verifier=retrospec.VerifierConfig(mode=mode),
                             do_sample=False, pad_token_id=0, max_new_tokens=30)
    assert rows_of(out, ids.shape[1]) == refs
    assert out.stats.forwards < sum(len(r) for r in refs) / len(refs)  # rows shared their forwards
    del oracles


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prompts_of_very_different_lengths_prefill_apart_and_stay_exact(arch):
    """A 180-token prompt beside 8- and 10-token ones: the short ones are read in a forward of
    their own (no 170 columns of padding each), into the same cache, with the same outputs."""
    from retrospec.verify.verifiers import PREFILL_OVERHEAD, prefill_groups

    model = tiny_model(arch)
    prompts = [repetitive_prompt(96, n, seed + 70) for seed, n in enumerate([8, 180, 10])]
    assert prefill_groups([p.shape[1] for p in prompts], PREFILL_OVERHEAD["cpu"]) == [[0, 2], [1]]
    refs = alone(model, prompts, max_new_tokens=24)
    ids, mask = left_padded(prompts)
    for mode in ("dynamic", "static"):
        speculator = retrospec.Speculator([retrospec.ContextSource()], budget=8)
        out = retrospec.generate(model, ids, attention_mask=mask, speculator=speculator, verifier=retrospec.VerifierConfig(mode=mode),
                                 do_sample=False, pad_token_id=0, max_new_tokens=24)
        assert rows_of(out, ids.shape[1]) == refs, mode


def test_rows_accept_different_lengths_and_the_cache_stays_exact():
    """Each row drafts from its own oracle (errors at random depths): rows drift apart."""
    model = tiny_model("llama")
    prompts = [repetitive_prompt(96, n, seed + 40) for seed, n in enumerate(LENGTHS)]
    refs = alone(model, prompts, max_new_tokens=40)

    class PerRow:  # routes each row's session to the oracle of its prompt
        name, topk_wanted = "oracle", 0

        def start_request(self, prompt, documents=()):
            i = next(i for i, p in enumerate(prompts) if p.shape[1] == prompt.shape[0] and p[0].tolist() == prompt.tolist())
            return OracleSource(refs[i], 96, prompt.shape[0], depth=6, seed=i)

    ids, mask = left_padded(prompts)
    for mode in ("dynamic", "static"):
        out = retrospec.generate(model, ids, attention_mask=mask, speculator=retrospec.Speculator([PerRow()], budget=24),
                                 verifier=retrospec.VerifierConfig(mode=mode), do_sample=False, pad_token_id=0, max_new_tokens=40)
        assert rows_of(out, ids.shape[1]) == refs, mode
        assert out.stats.mean_accepted > 2.0
        hist = out.stats.accepted_hist
        assert sum(1 for k, n in enumerate(hist) if n and k > 1) >= 3  # steps committed many different lengths


def test_the_auto_budget_of_a_static_verifier_leaves_the_cache_alone():
    """Its step costs are timed when it is built, never by running its steps mid-request."""
    model = tiny_model("llama")
    prompts = [repetitive_prompt(96, n, seed + 50) for seed, n in enumerate(LENGTHS)]
    refs = alone(model, prompts, max_new_tokens=30)
    ids, mask = left_padded(prompts)
    speculator = retrospec.Speculator([retrospec.ContextSource(), retrospec.TokenRecycling.for_model(model)], budget="auto")
    out = retrospec.generate(model, ids, attention_mask=mask, speculator=speculator, verifier=retrospec.VerifierConfig(mode="static"),
                             do_sample=False, pad_token_id=0, max_new_tokens=30)
    assert rows_of(out, ids.shape[1]) == refs


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_more_prompts_than_rows_refill_finished_rows(batch_size):
    model = tiny_model("qwen2")
    prompts = [repetitive_prompt(96, n, seed + 5) for seed, n in enumerate(LENGTHS)]
    refs = alone(model, prompts, max_new_tokens=25)
    ids, mask = left_padded(prompts)
    for mode in ("dynamic", "static"):
        out = retrospec.generate(model, ids, attention_mask=mask, speculator=retrospec.Speculator(budget=8), batch_size=batch_size,
                                 verifier=retrospec.VerifierConfig(mode=mode), do_sample=False, pad_token_id=0, max_new_tokens=25)
        assert rows_of(out, ids.shape[1]) == refs, mode
        assert out.stats.prefills == len(prompts)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_two_pipelined_halves_equal_each_row_alone(arch, mode):
    """``pipeline=True``: the batch runs as two halves whose steps interleave, refilled from
    one queue (more prompts than rows), with EOS ending some rows early; every row still
    equals plain generate() of it alone, in order, and each half shares its forwards."""
    model = tiny_model(arch)
    prompts = [repetitive_prompt(96, n, seed + 30) for seed, n in enumerate(LENGTHS * 2)]
    full = alone(model, prompts, max_new_tokens=24)
    eos = full[2][9]
    refs = alone(model, prompts, max_new_tokens=24, eos_token_id=eos)
    assert any(len(r) < 24 for r in refs) and any(len(r) == 24 for r in refs)
    ids, mask = left_padded(prompts)
    speculator = retrospec.Speculator([retrospec.ContextSource(), retrospec.TokenRecycling.for_model(model)], budget=8)
    out = retrospec.generate(model, ids, attention_mask=mask, speculator=speculator, batch_size=6, do_sample=False,
                             verifier=retrospec.VerifierConfig(mode=mode, pipeline=True), pad_token_id=0,
                             max_new_tokens=24, eos_token_id=eos)
    assert rows_of(out, ids.shape[1]) == refs
    assert out.stats.prefills == len(prompts)
    assert "launch" in out.stats.seconds  # the pipelined path ran
    serial = retrospec.generate(model, ids, attention_mask=mask, speculator=speculator, batch_size=6, do_sample=False,
                                verifier=retrospec.VerifierConfig(mode=mode, pipeline=False), pad_token_id=0,
                                max_new_tokens=24, eos_token_id=eos)
    assert "launch" not in serial.stats.seconds
    assert rows_of(serial, ids.shape[1]) == refs


def test_the_pipeline_is_on_only_where_it_can_overlap():
    config, model = retrospec.VerifierConfig(), tiny_model("llama")
    assert not config.pipelined(model, 64)  # a CPU computes while the host waits: nothing to hide
    assert retrospec.VerifierConfig(pipeline=True).pipelined(model, 2)
    assert not retrospec.VerifierConfig(pipeline=True).pipelined(model, 1)


def test_generate_many_keeps_the_order_and_each_output():
    model = tiny_model("llama")
    prompts = [repetitive_prompt(96, n, seed + 9)[0].tolist() for seed, n in enumerate(LENGTHS * 2)]
    refs = alone(model, [torch.tensor([p]) for p in prompts], max_new_tokens=20)
    outputs, stats = retrospec.generate_many(model, prompts, speculator=retrospec.Speculator(budget=8), batch_size=4,
                                             progress=False, do_sample=False, max_new_tokens=20, pad_token_id=0)
    assert outputs == refs
    assert stats.new_tokens == sum(len(r) for r in refs)
    with pytest.raises(ValueError, match="at least one token"):
        retrospec.generate_many(model, [[1, 2], []], max_new_tokens=4)


def test_eos_and_stopping_criteria_are_exact_per_row():
    model = tiny_model("llama")
    prompts = [repetitive_prompt(96, n, seed + 20) for seed, n in enumerate(LENGTHS)]
    full = alone(model, prompts, max_new_tokens=30)
    eos = full[1][6]  # row 1's 7th token ends rows wherever they produce it
    refs = alone(model, prompts, max_new_tokens=30, eos_token_id=eos)
    assert len(refs[1]) == 7 and any(len(r) == 30 for r in refs)
    ids, mask = left_padded(prompts)
    out = retrospec.generate(model, ids, attention_mask=mask, speculator=retrospec.Speculator(budget=12), do_sample=False,
                             pad_token_id=0, max_new_tokens=30, eos_token_id=eos)
    assert rows_of(out, ids.shape[1]) == refs

    class NewTokens(StoppingCriteria):  # stops a row once it holds 9 more tokens than its (padded) prompt
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 9, dtype=torch.bool)

    out = retrospec.generate(model, ids, attention_mask=mask, speculator=retrospec.Speculator(budget=12), do_sample=False,
                             pad_token_id=0, max_new_tokens=30, stopping_criteria=StoppingCriteriaList([NewTokens()]))
    assert rows_of(out, ids.shape[1]) == [r[:9] for r in full]


def test_batch_rows_with_left_padding_match_plain_batched_generate():
    model = tiny_model("llama")
    a, b = repetitive_prompt(96, 40, 7), repetitive_prompt(96, 28, 8)
    ids, mask = left_padded([a, b])
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0)
    out = retrospec.generate(model, ids, speculator=retrospec.Speculator(budget=8), attention_mask=mask,
                             do_sample=False, max_new_tokens=20, pad_token_id=0)
    assert torch.equal(out.sequences, ref)


def test_streaming_needs_a_batch_of_one():
    model = tiny_model("llama")
    ids, mask = left_padded([repetitive_prompt(96, 20, 0), repetitive_prompt(96, 10, 1)])

    class Sink:
        def put(self, value): ...
        def end(self): ...

    with pytest.raises(ValueError, match="batch size 1"):
        retrospec.generate(model, ids, attention_mask=mask, streamer=Sink(), max_new_tokens=4, pad_token_id=0)
