"""``RetrospecGenerator`` and ``RetrospecChatGenerator``.

Both run a local transformers causal LM (a retrospec short name such as ``smollm2-135m``,
a local directory or a hub id) with greedy decoding. With ``speculate=True`` (the default)
generation goes through :func:`retrospec.generate`, and the pipeline's ``documents`` feed
the request's document source, so answers copied from retrieved passages are drafted from
them; the replies are token for token those of plain greedy decoding, which
``speculate=False`` runs through the same component for comparison.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from haystack import Document, component, default_from_dict, default_to_dict
from haystack.dataclasses import ChatMessage, StreamingChunk
from haystack.utils import deserialize_callable, serialize_callable

log = logging.getLogger(__name__)


class _ChunkStreamer:
    """A transformers streamer that hands decoded text deltas to a Haystack callback."""

    def __init__(self, tokenizer, callback: Callable[[StreamingChunk], None]):
        self.tokenizer, self.callback = tokenizer, callback
        self.tokens: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() streams the prompt first
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return
        if len(text) > self.sent:
            self.callback(StreamingChunk(content=text[self.sent :]))
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.sent:
            self.callback(StreamingChunk(content=text[self.sent :]))
        self.callback(StreamingChunk(content="", finish_reason="stop"))


class _Engine:
    """The shared model-loading and generation code of both components."""

    def __init__(self, model: str, dtype: str, max_new_tokens: int, speculate: bool, budget: str | int,
                 index: str | None, streaming_callback: Callable | None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model_name, self.dtype, self.max_new_tokens = model, dtype, max_new_tokens
        self.speculate, self.budget, self.index = speculate, budget, index
        self.streaming_callback = streaming_callback
        self.model = self.tokenizer = self.speculator = None

    def warm_up(self) -> None:
        if self.model is not None:
            return
        import retrospec
        from retrospec.sources.registry import Datastores, default_sources

        self.model, self.tokenizer = retrospec.load_model(self.model_name, self.dtype)
        sources = default_sources(self.model, self.tokenizer, Datastores(index=self.index))
        self.speculator = retrospec.Speculator(sources, budget=self.budget)

    def generate(self, messages: list[dict], documents: list[Document] | None, callback: Callable | None) -> tuple[str, dict]:
        import torch

        import retrospec
        from retrospec.tools.prompts import render

        if self.model is None:
            raise RuntimeError("the component was not warmed up: call warm_up() (a Pipeline does it for you)")
        ids = render(self.tokenizer, messages)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad)
        callback = callback or self.streaming_callback
        streamer = _ChunkStreamer(self.tokenizer, callback) if callback else None
        texts = [d.content for d in documents or [] if d.content]
        start = time.perf_counter()
        if self.speculate:
            out = retrospec.generate(self.model, ids, speculator=self.speculator, streamer=streamer, documents=texts, **kwargs)
            sequences, stats = out.sequences, out.stats
        else:
            sequences = self.model.generate(ids, streamer=streamer, **kwargs)
            stats = None
        seconds = time.perf_counter() - start
        new = sequences[0, ids.shape[1] :]
        n = int(new.shape[0])
        meta = {
            "model": self.model_name,
            "speculate": self.speculate,
            "new_tokens": n,
            "seconds": round(seconds, 4),
            "tokens_per_second": round(n / seconds, 3) if seconds else 0.0,
            "finish_reason": "length" if n >= self.max_new_tokens else "stop",
        }
        if stats is not None:
            meta.update({"steps": stats.steps, "mean_accepted_tokens": round(stats.mean_accepted, 4),
                         "accepted_by_source": dict(stats.accepted_by_source), "documents": len(texts)})
        else:
            meta.update({"steps": max(n - 1, 0), "mean_accepted_tokens": n / max(n - 1, 1) if n else 0.0})
        return self.tokenizer.decode(new, skip_special_tokens=True), meta

    def to_dict(self, component) -> dict[str, Any]:
        callback = serialize_callable(self.streaming_callback) if self.streaming_callback else None
        return default_to_dict(component, model=self.model_name, dtype=self.dtype, max_new_tokens=self.max_new_tokens,
                               speculate=self.speculate, budget=self.budget, index=self.index, streaming_callback=callback)


class _Component:
    """What both components share: construction, warm-up and serialization."""

    def __init__(self, model: str = "smollm2-135m", dtype: str = "float32", max_new_tokens: int = 256,
                 speculate: bool = True, budget: str | int = "auto", index: str | None = None,
                 streaming_callback: Callable[[StreamingChunk], None] | None = None):
        self._engine = _Engine(model, dtype, max_new_tokens, speculate, budget, index, streaming_callback)

    def warm_up(self) -> None:
        """Load the model (once)."""
        self._engine.warm_up()

    def to_dict(self) -> dict[str, Any]:
        return self._engine.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        params = data.get("init_parameters", {})
        if params.get("streaming_callback"):
            params["streaming_callback"] = deserialize_callable(params["streaming_callback"])
        return default_from_dict(cls, data)


@component
class RetrospecGenerator(_Component):
    """Generates a reply to a prompt; the pipeline's documents feed retrospec's drafts.

    Args:
        model: a retrospec short name (``smollm2-135m``...), a local model directory or a hub id.
        dtype: ``float32`` (exact identity with plain greedy) or ``bfloat16``.
        max_new_tokens: the most tokens generated per reply.
        speculate: ``False`` runs plain greedy ``generate()`` through the same component.
        budget: draft nodes verified per step (``"auto"`` or an int).
        index: an optional suffix index directory to draft from as well.
        streaming_callback: called with a ``StreamingChunk`` per committed piece of text.
    """

    @component.output_types(replies=list[str], meta=list[dict[str, Any]])
    def run(self, prompt: str, documents: list[Document] | None = None,
            streaming_callback: Callable[[StreamingChunk], None] | None = None):
        """Reply to ``prompt`` (rendered with the model's chat template as a user turn)."""
        text, meta = self._engine.generate([{"role": "user", "content": prompt}], documents, streaming_callback)
        return {"replies": [text], "meta": [meta]}


@component
class RetrospecChatGenerator(_Component):
    """The chat variant: takes ``ChatMessage``s, returns an assistant ``ChatMessage`` whose
    ``meta`` carries the speculation statistics. Arguments as :class:`RetrospecGenerator`."""

    @component.output_types(replies=list[ChatMessage])
    def run(self, messages: list[ChatMessage], documents: list[Document] | None = None,
            streaming_callback: Callable[[StreamingChunk], None] | None = None):
        turns = [{"role": str(m.role.value if hasattr(m.role, "value") else m.role), "content": m.text or ""} for m in messages]
        text, meta = self._engine.generate(turns, documents, streaming_callback)
        return {"replies": [ChatMessage.from_assistant(text, meta=meta)]}
