"""retrospec as a transformers ``custom_generate`` method: lossless speculative decoding.

    model.generate(**inputs, custom_generate="<this repo or folder>", trust_remote_code=True, max_new_tokens=256)

transformers hands ``generate`` every argument of ``model.generate`` (``model`` first). This
file passes them on to ``model.generate`` with retrospec's decoding loop as the callable
``custom_generate``, so transformers still prepares the generation config, the logits
processors and the stopping criteria exactly as for plain decoding, and greedy output is
token for token plain greedy's.

Arguments beyond ``generate()``'s own:

- ``speculator``: a ``retrospec.Speculator`` to use. By default each model gets one (context
  + Token Recycling, + documents when ``tokenizer`` is given), kept while the model lives, so
  that what its sources learn carries over from call to call.
- ``documents``: texts this request's answer may copy from (needs ``tokenizer=``).
- ``tokenizer``: the model's tokenizer, for ``documents`` and ``stop_strings``.

The return value is ``generate()``'s: the sequences tensor, or with
``return_dict_in_generate=True`` an output with ``sequences`` and ``stats`` (MAT, accepted
tokens by source). ``output_scores`` / ``output_logits`` / attentions / hidden states and
beam search are refused with a ``ValueError``.
"""

from __future__ import annotations

import threading
import weakref

import retrospec

_SPECULATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def default_speculator(model, tokenizer=None):
    """The speculator ``model`` keeps across calls: one with the document source when a
    tokenizer is given, one without; dropped with the model."""
    with _LOCK:
        kept = _SPECULATORS.setdefault(model, {})
        with_documents = tokenizer is not None
        if with_documents not in kept:
            kept[with_documents] = retrospec.Speculator(retrospec.default_sources(model, tokenizer), budget="auto")
        return kept[with_documents]


def generate(model, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
             streamer=None, speculator=None, documents=None, tokenizer=None, **kwargs):
    """``model.generate(...)`` decoded by retrospec; arguments and result as ``generate()``'s."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    if documents and tokenizer is None:
        raise ValueError("documents= needs the model's tokenizer: pass tokenizer= too")
    if speculator is None:
        speculator = default_speculator(model, tokenizer)
    if documents and "documents" not in speculator.source_names:
        # retrospec would ignore them without a word
        raise ValueError(f"documents= needs a speculator with a document source; this one has {speculator.source_names}")
    stop_strings = kwargs.pop("stop_strings", None)
    if stop_strings:
        # generate() drops tokenizer= when custom_generate is a callable, so it could not
        # build this criterion itself
        if tokenizer is None:
            raise ValueError("stop_strings= needs the model's tokenizer: pass tokenizer= too")
        stopping_criteria = StoppingCriteriaList(stopping_criteria or [])
        stopping_criteria.append(StopStringCriteria(tokenizer, [stop_strings] if isinstance(stop_strings, str) else stop_strings))
    return model.generate(
        inputs,
        generation_config=generation_config,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        custom_generate=retrospec.custom_generate,
        speculator=speculator,
        retrospec_streamer=streamer,
        retrospec_documents=documents,
        **kwargs,
    )
