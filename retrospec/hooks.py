"""How users call retrospec: ``retrospec.generate`` and transformers' ``custom_generate`` seam.

Both go through ``model.generate``, so generation configs, logits processors, stopping
criteria and length handling are prepared by transformers itself, exactly as for plain
decoding; :func:`custom_generate` then runs the speculative loop per row::

    out = model.generate(**inputs, custom_generate=retrospec.custom_generate,
                         speculator=spec, max_new_tokens=128)

transformers does not hand ``streamer=`` to a custom decoding function, so streaming goes
through ``retrospec_streamer=`` there (``retrospec.generate`` maps ``streamer=`` to it).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from retrospec.compat import check_transformers, max_positions
from retrospec.verify.cache import layer_windows
from retrospec.loop import DecodeSettings, decode_row
from retrospec.drafting.speculator import Speculator
from retrospec.stats import SpecStats
from retrospec.verify.verifiers import StaticVerifier, make_verifier

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
    """

    sequences: torch.LongTensor | None = None
    stats: SpecStats | None = None


def generate(
    model,
    input_ids: torch.Tensor,
    speculator: Speculator | None = None,
    streamer=None,
    documents=None,
    **generate_kwargs,
) -> SpecOutput:
    """Speculative ``model.generate``: same arguments, same tokens, fewer forwards.

    ``speculator=None`` uses a fresh :class:`Speculator` with the context source; reuse one
    Speculator across calls so that its calibration and caches carry over. ``documents``
    (texts) go to the document sources for this request.
    """
    generate_kwargs["return_dict_in_generate"] = True
    return model.generate(
        input_ids,
        custom_generate=custom_generate,
        speculator=speculator,
        retrospec_streamer=streamer,
        retrospec_documents=documents,
        **generate_kwargs,
    )


@contextlib.contextmanager
def _tree_attention(model):
    """Flash attention cannot take a tree mask: switch to sdpa for the call, then back."""
    current = getattr(model.config, "_attn_implementation", None)
    if isinstance(current, str) and "flash" in current:
        log.info("retrospec: attention %s cannot take a tree mask; using sdpa for this call", current)
        model.set_attn_implementation("sdpa")
        try:
            yield
        finally:
            model.set_attn_implementation(current)
    else:
        yield


def _check_config(model, generation_config) -> None:
    if model.config.is_encoder_decoder:
        raise ValueError("retrospec speculates for decoder-only models; this model is encoder-decoder")
    if generation_config.num_beams != 1:
        raise ValueError(f"retrospec supports greedy decoding and sampling, not beam search (num_beams={generation_config.num_beams})")
    if generation_config.return_dict_in_generate:
        asked = [name for name in UNSUPPORTED_OUTPUTS if getattr(generation_config, name, False)]
        if asked:
            raise ValueError(f"retrospec does not return {', '.join(asked)}; drop those generation options")


def _pad_token(generation_config) -> int:
    pad = generation_config.pad_token_id
    if pad is None:
        eos = generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    return int(pad)


def _verifier_for(model, speculator: Speculator, settings: DecodeSettings, prompt_len: int, shown_len: int):
    """The verifier of one row; sets the loop's node cap for fixed-shape verifiers."""
    cfg = speculator.config
    slots = (speculator.budget if isinstance(speculator.budget, int) else cfg.static_slots) + 1
    new_tokens = (settings.max_length - shown_len) if settings.max_length is not None else 4096
    verifier = make_verifier(model, cfg.verify, settings.windows, prompt_len + new_tokens + slots, slots, speculator.verifiers)
    if isinstance(verifier, StaticVerifier):
        settings.max_nodes, settings.flat_cost = slots - 1, True
    else:
        settings.max_nodes, settings.flat_cost = None, False
    return verifier


def custom_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    speculator: Speculator | None = None,
    retrospec_streamer=None,
    retrospec_documents=None,
    **model_kwargs,
):
    """The decoding function for ``model.generate(custom_generate=...)``.

    Its own keywords, passed through ``generate()``: ``speculator`` (default: a fresh one
    with the context source), ``retrospec_streamer`` (transformers keeps ``streamer=`` to
    itself) and ``retrospec_documents`` (texts for the document sources).

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
    speculator = speculator if speculator is not None else Speculator()
    batch = input_ids.shape[0]
    if retrospec_streamer is not None and batch > 1:
        raise ValueError(f"streaming needs batch size 1, got {batch}")
    attention_mask = model_kwargs.get("attention_mask")
    settings = DecodeSettings(
        logits_processor=logits_processor if logits_processor else None,
        stopping_criteria=stopping_criteria,
        do_sample=bool(generation_config.do_sample),
        max_length=getattr(stopping_criteria, "max_length", None) or generation_config.max_length,
        windows=layer_windows(model.config),
        max_positions=max_positions(model.config),
        streamer=retrospec_streamer,
        documents=tuple(retrospec_documents or ()),
    )
    if retrospec_streamer is not None:
        retrospec_streamer.put(input_ids.cpu())  # generate() streams the prompt first
    rows, total = [], SpecStats()
    with _tree_attention(model):
        for b in range(batch):
            row = input_ids[b : b + 1]
            real = row
            if attention_mask is not None:
                keep = attention_mask[b].bool()
                first = int(keep.int().argmax()) if keep.any() else row.shape[1]
                if not bool(keep[first:].all()):
                    raise ValueError("right padding or holes in attention_mask: pad prompts on the left (tokenizer.padding_side='left')")
                real = row[:, first:]
            if real.shape[1] == 0:
                raise ValueError(f"row {b} of the batch has no tokens")
            verifier = _verifier_for(model, speculator, settings, real.shape[1], row.shape[1])
            try:
                new, stats = decode_row(model, real, row, speculator, settings, verifier)
            finally:
                speculator.verifiers.release(verifier)
            rows.append(new)
            total = total.merge(stats)
    if retrospec_streamer is not None:
        retrospec_streamer.end()
    width = max(len(r) for r in rows)
    pad = _pad_token(generation_config)
    tail = torch.full((batch, width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for b, new in enumerate(rows):
        tail[b, : len(new)] = torch.tensor(new, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, tail], dim=1)
    speculator.last_stats = total
    log.debug("retrospec: %d new tokens in %d steps (MAT %.2f)", total.new_tokens, total.steps, total.mean_accepted)
    if generation_config.return_dict_in_generate:
        return SpecOutput(sequences=sequences, stats=total)
    return sequences
