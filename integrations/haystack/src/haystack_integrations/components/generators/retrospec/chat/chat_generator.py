"""``RetrospecChatGenerator``: a Haystack 3 chat generator that decodes with retrospec.

It runs a local transformers causal LM (a retrospec short name such as ``smollm2-135m``, a
local directory or a hub id). With ``speculate=True`` (the default) every reply goes through
:func:`retrospec.generate` with one :class:`retrospec.Speculator` shared by all calls, and the
documents the pipeline retrieved feed the request's document source: answers copied from the
passages are drafted from them. Greedy replies are token for token those of plain
``generate()``, which ``speculate=False`` runs through the same component for comparison.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.components.generators.utils import _normalize_messages
from haystack.dataclasses import ChatMessage, ComponentInfo, StreamingCallbackT, StreamingChunk
from haystack.dataclasses.streaming_chunk import select_streaming_callback
from haystack.utils import deserialize_callable, serialize_callable
from haystack.utils.hf import convert_message_to_hf_format

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512


class _TextDeltas:
    """A transformers-style streamer (``put``/``end``) that turns the blocks of tokens each
    verification step commits into text deltas for ``emit(text, first)``.

    Deltas are cut from the decoding of *all* new tokens so far, so that their concatenation
    is exactly the decoded reply; a multi-byte character split across blocks waits for the
    rest of its bytes.
    """

    def __init__(self, tokenizer, emit: Callable[[str, bool], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.tokens: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() streams the prompt first
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._send(text)

    def end(self) -> None:
        self._send(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.emit(text[self.sent :], self.sent == 0)
            self.sent = len(text)


@component
class RetrospecChatGenerator:
    """Generates chat replies with a local model, speculating with retrospec.

    ### Usage example
    ```python
    from haystack.dataclasses import ChatMessage
    from haystack_integrations.components.generators.retrospec import RetrospecChatGenerator

    generator = RetrospecChatGenerator(model="smollm2-135m", generation_kwargs={"max_new_tokens": 64})
    generator.warm_up()
    reply = generator.run([ChatMessage.from_user("What is a lighthouse?")])["replies"][0]
    reply.text, reply.meta["usage"], reply.meta["speculation"]["mean_accepted_tokens"]
    ```

    In a RAG pipeline connect the retriever's ``documents`` to this component's
    ``documents`` as well as to the prompt builder: they become drafts.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str = "float32",
        generation_kwargs: dict[str, Any] | None = None,
        speculate: bool = True,
        budget: int | str = "auto",
        index: str | None = None,
        drafter: str | None = None,
        streaming_callback: StreamingCallbackT | None = None,
        async_executor: ThreadPoolExecutor | None = None,
    ) -> None:
        """
        :param model: a retrospec short name (``smollm2-135m``, ``qwen2.5-coder-1.5b``...), a
            local model directory or a hub id.
        :param dtype: ``float32`` (replies identical to plain greedy decoding) or ``bfloat16``.
        :param generation_kwargs: keyword arguments of ``generate()`` (``max_new_tokens``,
            ``do_sample``, ``temperature``...). ``max_new_tokens`` defaults to 512.
        :param speculate: ``False`` runs plain ``generate()`` through the same component.
        :param budget: draft-tree nodes verified per step: ``"auto"`` or an int.
        :param index: a suffix index directory (``retrospec index build``) to draft from too.
        :param drafter: a small draft model (short name, path or hub id) with the same tokenizer.
        :param streaming_callback: called with a ``StreamingChunk`` per block of committed text.
        :param async_executor: the executor ``run_async`` generates in; by default one thread
            that the component owns.
        """
        generation_kwargs = dict(generation_kwargs or {})
        generation_kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if not isinstance(generation_kwargs["max_new_tokens"], int) or generation_kwargs["max_new_tokens"] < 1:
            raise ValueError(f"generation_kwargs['max_new_tokens'] must be an int >= 1, got {generation_kwargs['max_new_tokens']!r}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        if not (budget == "auto" or (isinstance(budget, int) and budget >= 0)):
            raise ValueError(f"budget must be 'auto' or an int >= 0, got {budget!r}")
        self.model = model
        self.dtype = dtype
        self.generation_kwargs = generation_kwargs
        self.speculate = speculate
        self.budget = budget
        self.index = index
        self.drafter = drafter
        self.streaming_callback = streaming_callback
        self._owns_executor = async_executor is None
        self.executor = async_executor
        self._model = self._tokenizer = self._speculator = None

    # ------------------------------------------------------------------ lifecycle
    def warm_up(self) -> None:
        """Load the model and build the speculator (once), and the executor ``run_async`` uses."""
        if self._model is None:
            import retrospec

            self._model, self._tokenizer = retrospec.load_model(self.model, self.dtype)
            if self.speculate:
                stores = retrospec.Datastores(index=self.index, drafter=self.drafter)
                sources = retrospec.default_sources(self._model, self._tokenizer, stores)
                self._speculator = retrospec.Speculator(sources, budget=self.budget)
        if self._owns_executor and self.executor is None:
            self.executor = ThreadPoolExecutor(thread_name_prefix=f"retrospec-chat-{id(self)}", max_workers=1)

    def close(self) -> None:
        """Shut down the executor the component owns (if any)."""
        if self._owns_executor and self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None

    def to_dict(self) -> dict[str, Any]:
        """Serialize the component (the streaming callback by its import path)."""
        callback = serialize_callable(self.streaming_callback) if self.streaming_callback else None
        return default_to_dict(
            self,
            model=self.model,
            dtype=self.dtype,
            generation_kwargs=self.generation_kwargs,
            speculate=self.speculate,
            budget=self.budget,
            index=self.index,
            drafter=self.drafter,
            streaming_callback=callback,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrospecChatGenerator:
        """Rebuild a component from :meth:`to_dict`'s output."""
        params = data.get("init_parameters", {})
        if params.get("streaming_callback"):
            params["streaming_callback"] = deserialize_callable(params["streaming_callback"])
        return default_from_dict(cls, data)

    # ------------------------------------------------------------------ running
    @component.output_types(replies=list[ChatMessage])
    def run(
        self,
        messages: list[ChatMessage] | str,
        documents: list[Document] | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        streaming_callback: StreamingCallbackT | None = None,
    ) -> dict[str, list[ChatMessage]]:
        """Reply to ``messages`` (a plain string is one user turn).

        :param documents: the retrieved documents; their texts feed the drafts of this reply.
        :param generation_kwargs: per-call ``generate()`` arguments, merged over the init ones.
        :param streaming_callback: overrides the init callback for this call.
        :returns: ``replies``: one assistant ``ChatMessage`` whose ``meta`` has ``usage``,
            ``finish_reason``, ``seconds``, ``tokens_per_second`` and ``speculation`` (MAT,
            accepted tokens by source, steps).
        """
        self.warm_up()
        callback = select_streaming_callback(self.streaming_callback, streaming_callback, requires_async=False)
        emit = None
        if callback is not None:
            info = ComponentInfo.from_component(self)

            def emit(text: str, first: bool) -> None:
                callback(StreamingChunk(content=text, index=0, start=first, component_info=info))

        reply = self._generate(_normalize_messages(messages), documents, generation_kwargs, emit)
        if callback is not None:
            callback(self._last_chunk(reply))
        return {"replies": [reply]}

    @component.output_types(replies=list[ChatMessage])
    async def run_async(
        self,
        messages: list[ChatMessage] | str,
        documents: list[Document] | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        streaming_callback: StreamingCallbackT | None = None,
    ) -> dict[str, list[ChatMessage]]:
        """:meth:`run` for ``await``: generation runs in the executor; chunks reach the
        callback (sync or async) on the event loop, in order."""
        self.warm_up()
        assert self.executor is not None
        callback = select_streaming_callback(self.streaming_callback, streaming_callback, requires_async=True)
        messages = _normalize_messages(messages)
        loop = asyncio.get_running_loop()
        if callback is None:
            reply = await loop.run_in_executor(self.executor, self._generate, messages, documents, generation_kwargs, None)
            return {"replies": [reply]}

        info = ComponentInfo.from_component(self)
        queue: asyncio.Queue[StreamingChunk | None] = asyncio.Queue()

        def emit(text: str, first: bool) -> None:  # runs in the executor's thread
            chunk = StreamingChunk(content=text, index=0, start=first, component_info=info)
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        async def deliver() -> None:
            while (chunk := await queue.get()) is not None:
                result = callback(chunk)
                if inspect.isawaitable(result):
                    await result

        consumer = asyncio.create_task(deliver())
        try:
            reply = await loop.run_in_executor(self.executor, self._generate, messages, documents, generation_kwargs, emit)
        finally:
            queue.put_nowait(None)  # after every chunk emit() scheduled: call_soon keeps order
            await consumer
        result = callback(self._last_chunk(reply))
        if inspect.isawaitable(result):
            await result
        return {"replies": [reply]}

    # ------------------------------------------------------------------ internals
    def _last_chunk(self, reply: ChatMessage) -> StreamingChunk:
        """The closing chunk: no text, the finish reason and the reply's meta."""
        return StreamingChunk(content="", index=0, finish_reason=reply.meta["finish_reason"], meta=reply.meta,
                              component_info=ComponentInfo.from_component(self))

    def _prompt_ids(self, messages: list[ChatMessage]):
        """``LongTensor [1, L]``: the conversation through the model's chat template, ending
        with the assistant's turn (plain text joined by blank lines for models without one)."""
        turns = [convert_message_to_hf_format(m) for m in messages]
        if getattr(self._tokenizer, "chat_template", None):
            enc = self._tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        else:
            enc = self._tokenizer("\n\n".join(t["content"] for t in turns), return_tensors="pt")
        return enc["input_ids"]

    def _generate(self, messages: list[ChatMessage], documents: list[Document] | None,
                  generation_kwargs: dict[str, Any] | None, emit: Callable[[str, bool], None] | None) -> ChatMessage:
        import torch

        import retrospec

        if self._model is None:
            raise RuntimeError("the component was not warmed up: call warm_up() (a Pipeline does it for you)")
        kwargs = {**self.generation_kwargs, **(generation_kwargs or {})}
        tokenizer = self._tokenizer
        ids = self._prompt_ids(messages).to(self._model.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs.setdefault("pad_token_id", pad)
        kwargs.setdefault("do_sample", False)
        streamer = _TextDeltas(tokenizer, emit) if emit is not None else None
        texts = [d.content for d in documents or [] if d.content]

        start = time.perf_counter()
        if self.speculate:
            out = retrospec.generate(self._model, ids, speculator=self._speculator, streamer=streamer,
                                     documents=texts, attention_mask=torch.ones_like(ids), **kwargs)
            sequences, stats = out.sequences, out.stats
        else:
            sequences = self._model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
            stats = None
        seconds = time.perf_counter() - start

        new = sequences[0, ids.shape[1] :].tolist()  # one row: never padded
        n = len(new)
        text = tokenizer.decode(new, skip_special_tokens=True)
        eos = self._model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        length = n >= kwargs["max_new_tokens"] and not (new and new[-1] in eos)
        meta: dict[str, Any] = {
            "model": self.model,
            "index": 0,
            "finish_reason": "length" if length else "stop",
            "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": n, "total_tokens": int(ids.shape[1]) + n},
            "seconds": round(seconds, 4),
            "tokens_per_second": round(n / seconds, 3) if seconds > 0 else 0.0,
        }
        if stats is not None:
            meta["speculation"] = {
                "enabled": True,
                "steps": stats.steps,
                "mean_accepted_tokens": round(stats.mean_accepted, 4),
                "accepted_by_source": dict(stats.accepted_by_source),
                "drafted_nodes": stats.drafted_nodes,
                "documents": len(texts),
            }
        else:  # plain decoding: one token per forward after the prefill (SpecStats' definition of MAT)
            meta["speculation"] = {"enabled": False, "steps": max(n - 1, 0), "mean_accepted_tokens": round(n / max(n - 1, 1), 4),
                                   "accepted_by_source": {}, "drafted_nodes": 0, "documents": len(texts)}
        return ChatMessage.from_assistant(text, meta=meta)
