"""Losslessness on real models: speculative greedy == plain generate(), fp32, token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import BENCH

import retrospec
from retrospec.sources.registry import default_sources
from retrospec.tools.prompts import load_prompts, render

SPECBENCH = BENCH / "specbench" / "question.jsonl"


def check_identical(model, tokenizer, records, max_new_tokens, speculator):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mats = []
    for record in records:
        ids = render(tokenizer, [{"role": "user", "content": record.turns[0]}], raw=record.raw)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)
        ref = model.generate(ids, **kw)
        out = retrospec.generate(model, ids, speculator=speculator, documents=list(record.passages), **kw)
        assert torch.equal(out.sequences, ref), f"{record.category}/{record.id} differs"
        mats.append(out.stats.mean_accepted)
    return mats


@pytest.mark.real
def test_smollm2_identical_one_prompt_per_category(smollm2):
    model, tokenizer = smollm2
    records = load_prompts(SPECBENCH, per_category=1)
    assert len({r.category for r in records}) == 6
    speculator = retrospec.Speculator(default_sources(model, tokenizer), budget=24)
    mats = check_identical(model, tokenizer, records, 48, speculator)
    assert sum(mats) / len(mats) > 1.3


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_identical_30_specbench_prompts(smollm2):
    model, tokenizer = smollm2
    records = load_prompts(SPECBENCH, per_category=5)
    assert len(records) == 30
    for budget in ("auto",):
        speculator = retrospec.Speculator(default_sources(model, tokenizer), budget=budget)
        check_identical(model, tokenizer, records, 96, speculator)


@pytest.mark.slow
@pytest.mark.real
def test_gemma3_identical_past_its_sliding_window():
    model, tokenizer = retrospec.load_model("gemma3-270m", "float32")
    assert model.config.sliding_window == 512
    records = load_prompts(SPECBENCH, per_category=2, categories=["summarization", "rag"])
    long = [r for r in records if len(tokenizer(r.turns[0]).input_ids) > 600]
    assert long, "need a prompt longer than the 512-token window"
    speculator = retrospec.Speculator([retrospec.ContextSource()], budget=24)
    check_identical(model, tokenizer, long, 64, speculator)


def check_batch_identical(model, tokenizer, records, batch_sizes, max_new_tokens, sources, verify="auto"):
    """Every row of each batch equals plain generate() of that prompt alone."""
    from retrospec.compat import pad_token_id

    pad = pad_token_id(tokenizer)
    prompts = [render(tokenizer, [{"role": "user", "content": r.turns[0]}], raw=r.raw)[0].tolist() for r in records]
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        refs.append(model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                                   pad_token_id=pad)[0, len(p):].tolist())
    speculator = retrospec.Speculator(sources(), budget="auto")
    for batch in batch_sizes:
        outputs, stats = retrospec.generate_many(model, prompts, speculator=speculator, batch_size=batch, progress=False,
                                                 verifier=retrospec.VerifierConfig(mode=verify), do_sample=False,
                                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
        # generate_many pads the rows to the longest prompt: left padding in a real batch
        differing = [r.id for r, out, ref in zip(records, outputs, refs) if out != ref]
        assert not differing, (batch, differing)
        assert stats.prefills == len(prompts)


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("verify", ["dynamic", "static"])
def test_smollm2_batches_of_2_4_8_16_rows_equal_each_row_alone(smollm2, verify):
    model, tokenizer = smollm2
    records = load_prompts(SPECBENCH, per_category=3)[:16]
    check_batch_identical(model, tokenizer, records, (2, 4, 8, 16), 40,
                          lambda: default_sources(model, tokenizer), verify)


@pytest.mark.slow
@pytest.mark.real
def test_gemma3_batches_past_its_sliding_window_equal_each_row_alone():
    model, tokenizer = retrospec.load_model("gemma3-270m", "float32")
    records = load_prompts(SPECBENCH, per_category=2, categories=["summarization", "rag", "qa"])
    assert any(len(tokenizer(r.turns[0]).input_ids) > 600 for r in records)  # some rows run past the 512-token window
    check_batch_identical(
        model, tokenizer, records, (2, 4), 32, lambda: [retrospec.ContextSource(), retrospec.TokenRecycling.for_model(model)]
    )
