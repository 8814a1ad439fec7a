"""Stopping criteria, EOS, max_new_tokens and streaming: exact, after every committed token."""

from __future__ import annotations

import functools
import operator

import pytest
import torch
from conftest import repetitive_prompt, tiny_model
from helpers import OracleSource, plain, spec
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

import retrospec


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
    assert functools.reduce(operator.iadd, streamer.chunks[1:], []) == ref[0, 40:].tolist() == out.sequences[0, 40:].tolist()
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
    assert functools.reduce(operator.iadd, streamer.chunks[1:], []) == ref[0, 40:].tolist()
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


def test_stopping_rules_match_the_criteria():
    """Length and EOS are decided on the host per row; other criteria are called row by row."""
    import numpy as np
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    from retrospec.hooks import split_stopping
    from retrospec.loop import DecodeSettings, Request, Row

    max_new, eos, others = split_stopping(StoppingCriteriaList([MaxLengthCriteria(10), EosTokenCriteria(torch.tensor([7, 9]))]), width=5)
    assert (max_new, eos, others) == (5, {7, 9}, None)
    settings = DecodeSettings(None, None, eos, False, max_new, {"full_attention": None}, None)

    def row():
        return Row.open(0, Request(np.arange(5)), None, max_new)

    r = row()
    assert r.commit([1, 2, 3], settings, "cpu") == 3 and not r.done
    r = row()
    assert r.commit([1, 9, 3], settings, "cpu") == 2 and r.done  # EOS is kept, then stop
    r = row()
    r.commit([1, 2], settings, "cpu")
    assert r.commit([1, 2, 3, 4, 5], settings, "cpu") == 3 and r.done  # the 10th token ends it
    assert split_stopping(StoppingCriteriaList([StopAfter(0, 3)]), width=5)[2] is not None  # unknown criteria: called one by one


def test_stop_strings_with_the_tokenizer_as_plain_generate_takes_them(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tok("The cat sat on the mat. The cat sat on the", return_tensors="pt").input_ids
    full = plain(model, ids, max_new_tokens=24)
    stop = tok.decode(full[0, ids.shape[1] + 4 : ids.shape[1] + 6])  # two tokens from the middle of the output
    ref = plain(model, ids, max_new_tokens=24, stop_strings=stop, tokenizer=tok)
    out = spec(model, ids, retrospec.Speculator(budget=8), max_new_tokens=24, stop_strings=stop, tokenizer=tok)
    assert torch.equal(out.sequences, ref)
    assert ref.shape[1] < full.shape[1]  # it did stop early
    with pytest.raises(ValueError, match="tokenizer"):
        spec(model, ids, retrospec.Speculator(budget=8), max_new_tokens=24, stop_strings=stop)
