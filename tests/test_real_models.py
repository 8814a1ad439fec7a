"""Losslessness on real models: speculative greedy == plain generate(), fp32, token for token."""

from __future__ import annotations

import pytest
import torch

import retrospec
from conftest import BENCH
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
