"""integrations/hub loaded the way transformers loads a custom_generate repo, by local path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TextStreamer

import retrospec

torch.set_num_threads(2)
HUB = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def tiny():
    import tempfile

    from retrospec.testing import save_tiny_model

    return retrospec.load_model(save_tiny_model(tempfile.mkdtemp(prefix="tiny-hub-")))


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def three_ways(model, ids, **kwargs):
    """The folder through model.generate (with its stats), retrospec.generate, and plain greedy."""
    base = dict(attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
    hub = model.generate(ids, custom_generate=HUB, trust_remote_code=True, return_dict_in_generate=True, **base)
    api = retrospec.generate(model, ids, **base).sequences
    plain = model.generate(ids, **base)
    return hub, api, plain


def test_folder_equals_retrospec_and_plain_greedy_on_a_tiny_model(tiny):
    model, tok = tiny
    hub, api, plain = three_ways(model, chat_ids(tok, "Hello there"), max_new_tokens=24, pad_token_id=tok.eos_token_id)
    assert torch.equal(hub.sequences, api) and torch.equal(hub.sequences, plain)


def test_extra_arguments_stats_streamer_documents_and_stop_strings(tiny):
    model, tok = tiny
    ids = chat_ids(tok, "Tell me about lighthouses.")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20, pad_token_id=tok.eos_token_id)
    out = model.generate(ids, custom_generate=HUB, trust_remote_code=True, return_dict_in_generate=True,
                         tokenizer=tok, documents=["The Harlow Lighthouse was completed in 1871."], **kw)
    assert out.stats.new_tokens == 20 and out.stats.mean_accepted >= 1.0 and "documents" in out.stats.accepted_by_source

    class Collect(TextStreamer):
        def __init__(self):
            super().__init__(tok, skip_prompt=True)
            self.text = ""

        def on_finalized_text(self, text, stream_end=False):
            self.text += text

    streamer = Collect()
    model.generate(ids, custom_generate=HUB, trust_remote_code=True, streamer=streamer, **kw)
    assert streamer.text == tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)

    words = tok.decode(out.sequences[0, ids.shape[1]:]).split()
    stop = words[len(words) // 2]
    hub = model.generate(ids, custom_generate=HUB, trust_remote_code=True, stop_strings=[stop], tokenizer=tok, **kw)
    plain = model.generate(ids, stop_strings=[stop], tokenizer=tok, **kw)
    assert torch.equal(hub, plain) and hub.shape[1] < out.sequences.shape[1]

    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, custom_generate=HUB, trust_remote_code=True, documents=["x"], **kw)
    with pytest.raises(ValueError, match="document source"):
        model.generate(ids, custom_generate=HUB, trust_remote_code=True, documents=["x"], tokenizer=tok,
                       speculator=retrospec.Speculator([retrospec.ContextSource()]), **kw)
    with pytest.raises(ValueError, match=r"trust_remote_code|custom generation code"):
        model.generate(ids, custom_generate=HUB, **kw)


def test_one_speculator_per_model_is_kept(tiny):
    model, tok = tiny
    ids = chat_ids(tok, "Hello")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4, pad_token_id=tok.eos_token_id)
    first = model.load_custom_generate(HUB, trust_remote_code=True)
    model.generate(ids, custom_generate=HUB, trust_remote_code=True, **kw)
    again = model.load_custom_generate(HUB, trust_remote_code=True)
    assert first is again  # transformers keeps the module: its per-model speculators live on
    module = __import__(first.__module__, fromlist=["default_speculator"])
    assert module.default_speculator(model) is module.default_speculator(model)
    assert module.default_speculator(model, tok) is not module.default_speculator(model)


@pytest.mark.real
def test_folder_equals_retrospec_and_plain_greedy_on_smollm2_fp32():
    model, tok = retrospec.load_model("smollm2-135m", "float32")
    prompt = ("Here is a function:\n\ndef mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
              "    return total / len(values)\n\nRewrite it so that it returns 0.0 for an empty list.")
    ids = chat_ids(tok, prompt)
    hub, api, plain = three_ways(model, ids, max_new_tokens=48, pad_token_id=tok.eos_token_id)
    assert torch.equal(hub.sequences, api) and torch.equal(hub.sequences, plain)
    assert hub.stats.mean_accepted > 1.25  # the rewrite copies most of the prompt (the auto budget's trees shrink when the machine is busy)
