"""How users call retrospec: ``retrospec.generate``, ``generate_many`` and transformers'
``custom_generate`` seam.

All go through ``model.generate``, so generation configs, logits processors, stopping
criteria and length handling are prepared by transformers itself, exactly as for plain
decoding; :func:`custom_generate` then runs the speculative loop over the batch::

    out = model.generate(**inputs, custom_generate=retrospec.custom_generate,
                         speculator=spec, max_new_tokens=128)

transformers does not hand ``streamer=`` (nor ``tokenizer=``) to a custom decoding
function, so streaming goes through ``retrospec_streamer=`` there; ``retrospec.generate``
maps ``streamer=`` to it and turns ``stop_strings=`` + ``tokenizer=`` into a stopping
criterion itself.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers.utils import ModelOutput

from retrospec.buffers import layer_windows
from retrospec.compat import check_transformers, max_positions
from retrospec.compat import pad_token_id as compat_pad
from retrospec.drafting.speculator import Speculator
from retrospec.loop import DecodeSettings, Request, decode
from retrospec.stats import SpecStats
from retrospec.verify.attention import tree_attention
from retrospec.verify.verifiers import VerifierConfig

log = logging.getLogger(__name__)

check_transformers()

UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


@dataclass
class SpecOutput(ModelOutput):
    """What ``retrospec.generate`` returns.

    Attributes:
        sequences: ``LongTensor [B, L + new]``: prompts (with their padding) and new tokens;
            rows that stopped early are padded with the pad token, as ``generate()`` does.
        stats: the :class:`~retrospec.SpecStats` of the call (all rows together).
        lengths: new tokens of each row (the rest of its tail is padding).
    """

    sequences: torch.LongTensor | None = None
    stats: SpecStats | None = None
    lengths: list[int] | None = None


def _stop_strings(generate_kwargs: dict) -> None:
    """``stop_strings=`` + ``tokenizer=`` as plain ``generate()`` takes them: transformers
    drops ``tokenizer`` on the way to a custom decoding function, so build the criterion here."""
    tokenizer = generate_kwargs.pop("tokenizer", None)
    stop = generate_kwargs.pop("stop_strings", None)
    if stop is None:
        return
    if tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: pass tokenizer=... as to plain generate()")
    from transformers import StoppingCriteriaList, StopStringCriteria

    criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
    criteria.append(StopStringCriteria(tokenizer, [stop] if isinstance(stop, str) else list(stop)))
    generate_kwargs["stopping_criteria"] = criteria


_DEFAULTS: weakref.WeakKeyDictionary[object, Speculator] = weakref.WeakKeyDictionary()
_DEFAULTS_LOCK = threading.Lock()


def default_speculator(model) -> Speculator:
    """The speculator a call without ``speculator=`` uses: one per model, kept as long as the
    model (so what Token Recycling and the calibrator learn carries over between calls that
    only pass keyword arguments, as evaluation harnesses do): context + Token Recycling + history."""
    from retrospec.sources.registry import default_sources

    with _DEFAULTS_LOCK:
        spec = _DEFAULTS.get(model)
        if spec is None:
            spec = _DEFAULTS[model] = Speculator(default_sources(model), budget="auto")
        return spec


def generate(
    model,
    input_ids: torch.Tensor,
    speculator: Speculator | None = None,
    streamer=None,
    documents=None,
    verifier: VerifierConfig | None = None,
    batch_size: int | None = None,
    **generate_kwargs,
) -> SpecOutput:
    """Speculative ``model.generate``: same arguments, same tokens, fewer forwards.

    ``speculator=None`` uses the model's :func:`default_speculator` (context + Token
    Recycling, kept across calls); pass your own to choose the sources. ``documents``
    (texts, or one list of texts per row) go to the document sources. ``verifier`` sets how
    verification runs (:class:`VerifierConfig`). Rows of a batch are verified together in
    one forward per step; ``batch_size`` decodes at most that many at once, refilling rows
    from the rest as they finish (see :func:`generate_many`).
    """
    generate_kwargs["return_dict_in_generate"] = True
    _stop_strings(generate_kwargs)
    return model.generate(
        input_ids,
        custom_generate=custom_generate,
        speculator=speculator,
        retrospec_streamer=streamer,
        retrospec_documents=documents,
        retrospec_verifier=verifier,
        retrospec_batch_size=batch_size,
        **generate_kwargs,
    )


def generate_many(
    model,
    prompts: Sequence[Sequence[int] | torch.Tensor | np.ndarray],
    speculator: Speculator | None = None,
    batch_size: int = 32,
    documents: Sequence[Sequence[str]] | None = None,
    verifier: VerifierConfig | None = None,
    progress: bool = True,
    pad_token_id: int | None = None,
    **generate_kwargs,
) -> tuple[list[list[int]], SpecStats]:
    """Continue every prompt (token ids), ``batch_size`` at a time: as a request finishes,
    the next one takes its row (continuous batching), with a progress bar.

    Returns each prompt's new tokens, in order, and the statistics of the whole run. Each
    output equals what plain ``generate()`` gives for that prompt alone (greedy; sampling
    draws from the same distribution). ``documents`` gives each prompt its own texts.

    >>> # outputs, stats = retrospec.generate_many(model, [tok(p).input_ids for p in prompts],
    >>> #                                          speculator=spec, batch_size=32, max_new_tokens=128)
    """
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if not rows:
        return [], SpecStats()
    if any(r.shape[0] == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    if documents is not None and len(documents) != len(rows):
        raise ValueError(f"documents gives {len(documents)} lists for {len(rows)} prompts")
    width = max(r.shape[0] for r in rows)
    pad = pad_token_id if pad_token_id is not None else compat_pad(model.generation_config)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - r.shape[0] :] = r
        mask[b, width - r.shape[0] :] = 1
    out = generate(model, ids, speculator=speculator, documents=[list(d) for d in documents] if documents is not None else None,
                   verifier=verifier, batch_size=batch_size, attention_mask=mask, pad_token_id=pad,
                   retrospec_progress=progress, **generate_kwargs)
    new = out.sequences[:, width:]
    return [new[b, : out.lengths[b]].tolist() for b in range(len(rows))], out.stats


def _check_config(model, generation_config) -> None:
    if model.config.is_encoder_decoder:
        raise ValueError("retrospec speculates for decoder-only models; this model is encoder-decoder")
    if generation_config.num_beams != 1:
        raise ValueError(f"retrospec supports greedy decoding and sampling, not beam search (num_beams={generation_config.num_beams})")
    if generation_config.num_return_sequences not in (None, 1):
        raise ValueError(f"retrospec returns one sequence per prompt (num_return_sequences={generation_config.num_return_sequences})")
    if generation_config.return_dict_in_generate:
        asked = [name for name in UNSUPPORTED_OUTPUTS if getattr(generation_config, name, False)]
        if asked:
            raise ValueError(f"retrospec does not return {', '.join(asked)}; drop those generation options")


def split_stopping(stopping_criteria, width: int) -> tuple[int | None, frozenset[int], object | None]:
    """transformers' criteria as the loop checks them: the max new tokens per row (from
    ``MaxLengthCriteria``, relative to the batch ``width``), the EOS ids (from
    ``EosTokenCriteria``), and the rest (``None`` when none), called row by row."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

    max_new, eos, others = None, set(), []
    for criterion in list(stopping_criteria or []):
        if type(criterion) is MaxLengthCriteria:
            limit = int(criterion.max_length) - width
            max_new = limit if max_new is None else min(max_new, limit)
        elif type(criterion) is EosTokenCriteria:
            eos.update(int(t) for t in criterion.eos_token_id.reshape(-1).tolist())
        else:
            others.append(criterion)
    return max_new, frozenset(eos), StoppingCriteriaList(others) if others else None


def _requests(input_ids: torch.Tensor, attention_mask, documents) -> list[Request]:
    rows = input_ids.cpu().numpy()
    keep = attention_mask.bool().cpu().numpy() if attention_mask is not None else None
    per_row = documents is not None and len(documents) == rows.shape[0] and all(isinstance(d, (list, tuple)) for d in documents)
    out = []
    for b, row in enumerate(rows):
        start = 0
        if keep is not None:
            real = keep[b]
            start = int(real.argmax()) if real.any() else row.shape[0]
            if not real[start:].all():
                raise ValueError("right padding or holes in attention_mask: pad prompts on the left (tokenizer.padding_side='left')")
        if start >= row.shape[0]:
            raise ValueError(f"row {b} of the batch has no tokens")
        texts = tuple(documents[b]) if per_row else tuple(documents or ())
        out.append(Request(row.astype(np.int64), start, texts))
    return out


def custom_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    speculator: Speculator | None = None,
    retrospec_streamer=None,
    retrospec_documents=None,
    retrospec_verifier: VerifierConfig | None = None,
    retrospec_batch_size: int | None = None,
    retrospec_progress: bool = False,
    **model_kwargs,
):
    """The decoding function for ``model.generate(custom_generate=...)``.

    Its own keywords, passed through ``generate()``: ``speculator`` (default: the model's
    :func:`default_speculator`), ``retrospec_streamer`` (transformers keeps ``streamer=`` to
    itself), ``retrospec_documents`` (texts for the document sources, or one list per row),
    ``retrospec_verifier`` (a :class:`VerifierConfig`), ``retrospec_batch_size`` (rows
    decoded at once; the others wait and take the rows of finished ones) and
    ``retrospec_progress`` (a progress bar over the rows).

    Returns what ``generate()`` returns: the sequences tensor, or a :class:`SpecOutput`
    (``sequences`` + ``stats``) when ``return_dict_in_generate=True``. The stats of the
    latest call are also kept on ``speculator.last_stats``.
    """
    _check_config(model, generation_config)
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("retrospec needs input_ids, not inputs_embeds")
    for name in ("cache", "past_key_values"):
        cache = model_kwargs.get(name)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"retrospec starts every request from an empty cache; got a `{name}` holding {cache.get_seq_length()} tokens")
    speculator = speculator if speculator is not None else default_speculator(model)
    if retrospec_documents and not any(getattr(s, "name", "") == "documents" for s in speculator.sources):
        log.warning("retrospec: documents came with the request but the speculator has no document source "
                    "(sources: %s); they are not used", ", ".join(speculator.source_names))
    batch, width = input_ids.shape
    max_new, eos, others = split_stopping(stopping_criteria, width)
    settings = DecodeSettings(
        logits_processor=logits_processor if logits_processor else None,
        stopping_criteria=others,
        eos=eos,
        do_sample=bool(generation_config.do_sample),
        max_new_tokens=max_new,
        windows=layer_windows(model.config),
        max_positions=max_positions(model.config),
        streamer=retrospec_streamer,
    )
    requests = _requests(input_ids, model_kwargs.get("attention_mask"), retrospec_documents)
    if retrospec_streamer is not None:
        if batch > 1:
            raise ValueError(f"streaming needs batch size 1, got {batch}")
        retrospec_streamer.put(input_ids.cpu())  # generate() streams the prompt first
    progress = None
    if retrospec_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=batch, desc="retrospec", unit="prompt")
    try:
        with tree_attention(model):
            results, total = decode(model, requests, speculator, settings, retrospec_verifier or VerifierConfig(),
                                    batch_size=retrospec_batch_size, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    if retrospec_streamer is not None:
        retrospec_streamer.end()
    new_width = max(len(r.tokens) for r in results)
    tail = torch.full((batch, new_width), compat_pad(generation_config), dtype=input_ids.dtype, device=input_ids.device)
    for b, result in enumerate(results):
        tail[b, : len(result.tokens)] = torch.tensor(result.tokens, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, tail], dim=1)
    speculator.last_stats = total
    log.debug("retrospec: %d new tokens in %d steps (MAT %.2f)", total.new_tokens, total.steps, total.mean_accepted)
    if generation_config.return_dict_in_generate:
        return SpecOutput(sequences=sequences, stats=total, lengths=[len(r.tokens) for r in results])
    return sequences
