"""``ChatRetrospec``: a LangChain chat model over a local transformers model, decoding with
retrospec's lossless speculative decoding.

One :class:`retrospec.Speculator` is built per chat model and shared by every call (and
thread: ``batch`` runs calls concurrently), so what its sources learn carries over. Greedy
replies are token for token those of plain ``generate()``; ``speculate=False`` runs that
through the same class for comparison.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, field_validator

ROLES = ((SystemMessage, "system"), (HumanMessage, "user"), (AIMessage, "assistant"), (ToolMessage, "tool"))


def to_chat_turns(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the ``{"role", "content"}`` turns of a chat template.

    >>> to_chat_turns([SystemMessage("Be brief."), HumanMessage("Hi")])
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    """
    turns = []
    for m in messages:
        if isinstance(m, ChatMessage):
            role = m.role
        else:
            role = next((name for cls, name in ROLES if isinstance(m, cls)), None)
            if role is None:
                raise ValueError(f"cannot render a {type(m).__name__} in a chat template")
        turns.append({"role": role, "content": m.text})
    return turns


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """``text`` up to (not including) the first stop sequence, and whether one was found.

    >>> cut_at_stop("an answer\\nQuestion: next", ["\\nQuestion:"])
    ('an answer', True)
    """
    hits = [i for i in (text.find(s) for s in stop or ()) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class _TextDeltas:
    """A transformers-style streamer (``put``/``end``) that turns the blocks of tokens each
    verification step commits into text deltas for ``emit``.

    Deltas are cut from the decoding of *all* new tokens so far and from the same
    :func:`cut_at_stop` as the final reply, so they join to exactly the reply's text. Text
    that could be the start of a stop sequence, or a multi-byte character split across
    blocks, waits for the next block.
    """

    def __init__(self, tokenizer, emit: Callable[[str], None], stop: list[str] | None):
        self.tokenizer, self.emit, self.stop = tokenizer, emit, stop or []
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0
        self.prompt_seen = self.stopped = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() streams the prompt first
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stopped or text.endswith("\ufffd"):
            return
        text, self.stopped = cut_at_stop(text, self.stop)
        self._send(text if self.stopped else text[: len(text) - self.hold])

    def end(self) -> None:
        self._send(cut_at_stop(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stop)[0])

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.emit(text[self.sent :])
            self.sent = len(text)


class ChatRetrospec(BaseChatModel):
    """A local chat model that generates with retrospec.

    Example:
        .. code-block:: python

            from langchain_retrospec import ChatRetrospec

            llm = ChatRetrospec(model="smollm2-135m", max_new_tokens=64)
            msg = llm.invoke("What is a lighthouse?")
            msg.content, msg.usage_metadata, msg.response_metadata["speculation"]["mean_accepted_tokens"]

    Pass ``documents=[...]`` (texts) to ``invoke``/``stream`` (or ``bind``) to draft from
    them; :func:`langchain_retrospec.with_documents` does it for a retrieval chain.
    """

    model_name: str = Field(default="smollm2-135m", alias="model")
    """A retrospec short name (``smollm2-135m``...), a local model directory or a hub id."""
    dtype: str = "float32"
    """``float32`` (replies identical to plain greedy decoding) or ``bfloat16``."""
    max_new_tokens: int = 256
    """The most tokens generated per reply."""
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other ``generate()`` arguments (``do_sample``, ``temperature``...); greedy by default."""
    speculate: bool = True
    """``False`` runs plain ``generate()`` through the same model, for comparison."""
    budget: int | str = "auto"
    """Draft-tree nodes verified per step: ``"auto"`` or an int."""
    index: str | None = None
    """A suffix index directory to draft from as well."""
    drafter: str | None = None
    """A small draft model (short name, path or hub id) sharing the target's tokenizer."""
    hf_model: Any = Field(default=None, exclude=True)
    """An already loaded transformers model (with ``tokenizer``); else ``model`` is loaded on first use."""
    tokenizer: Any = Field(default=None, exclude=True)
    speculator: Any = Field(default=None, exclude=True)
    """A ``retrospec.Speculator`` to share; else one with the default sources is built on first use."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @field_validator("max_new_tokens")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {value}")
        return value

    @field_validator("budget")
    @classmethod
    def _budget(cls, value):
        if not (value == "auto" or (isinstance(value, int) and value >= 0)):
            raise ValueError(f"budget must be 'auto' or an int >= 0, got {value!r}")
        return value

    @property
    def _llm_type(self) -> str:
        return "retrospec-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "dtype": self.dtype, "max_new_tokens": self.max_new_tokens,
                "speculate": self.speculate, "budget": self.budget, **self.generation_kwargs}

    def load(self) -> ChatRetrospec:
        """Load the model and build the shared speculator now (once; calls do it when needed)."""
        with self._lock:
            import retrospec

            if self.hf_model is None:
                self.hf_model, self.tokenizer = retrospec.load_model(self.model_name, self.dtype)
            elif self.tokenizer is None:
                raise ValueError("hf_model was given without its tokenizer")
            if self.speculate and self.speculator is None:
                stores = retrospec.Datastores(index=self.index, drafter=self.drafter)
                self.speculator = retrospec.Speculator(retrospec.default_sources(self.hf_model, self.tokenizer, stores),
                                                       budget=self.budget)
        return self

    # ------------------------------------------------------------------ generation
    def _run(self, messages: list[BaseMessage], stop: list[str] | None, documents, emit, kwargs: dict) -> AIMessage:
        """One reply; ``emit`` (if any) gets the text deltas as the steps commit them."""
        import torch
        from transformers import StoppingCriteriaList, StopStringCriteria

        import retrospec

        if self.hf_model is None or (self.speculate and self.speculator is None):
            self.load()
        tok, model = self.tokenizer, self.hf_model
        turns = to_chat_turns(messages)
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok("\n\n".join(t["content"] for t in turns), return_tensors="pt")["input_ids"]
        ids = ids.to(model.device)
        gen = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **self.generation_kwargs, **kwargs}
        gen.setdefault("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        if stop:  # stop as soon as a stop sequence is committed; the text is cut before it
            # (a criterion, not stop_strings=: generate() drops tokenizer= for a custom_generate callable)
            criteria = StoppingCriteriaList(gen.pop("stopping_criteria", None) or [])
            criteria.append(StopStringCriteria(tok, list(stop)))
            gen["stopping_criteria"] = criteria
        texts = [getattr(d, "page_content", d) for d in documents or ()]
        streamer = _TextDeltas(tok, emit, stop) if emit is not None else None

        start = time.perf_counter()
        if self.speculate:
            out = retrospec.generate(model, ids, speculator=self.speculator, streamer=streamer, documents=texts,
                                     attention_mask=torch.ones_like(ids), **gen)
            sequences, stats = out.sequences, out.stats
        else:
            sequences = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **gen)
            stats = None
        seconds = time.perf_counter() - start

        new = sequences[0, ids.shape[1] :].tolist()  # one row: never padded
        n = len(new)
        text, stopped = cut_at_stop(tok.decode(new, skip_special_tokens=True), stop)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        finish = "length" if n >= gen["max_new_tokens"] and not stopped and not (new and new[-1] in eos) else "stop"
        if stats is not None:
            spec = {"enabled": True, "steps": stats.steps, "mean_accepted_tokens": round(stats.mean_accepted, 4),
                    "accepted_by_source": dict(stats.accepted_by_source), "drafted_nodes": stats.drafted_nodes,
                    "documents": len(texts)}
        else:  # plain decoding: one token per forward after the prefill (SpecStats' definition of MAT)
            spec = {"enabled": False, "steps": max(n - 1, 0), "mean_accepted_tokens": round(n / max(n - 1, 1), 4),
                    "accepted_by_source": {}, "drafted_nodes": 0, "documents": len(texts)}
        metadata = {"model_name": self.model_name, "finish_reason": finish, "seconds": round(seconds, 4),
                    "tokens_per_second": round(n / seconds, 3) if seconds > 0 else 0.0, "speculation": spec}
        usage = {"input_tokens": int(ids.shape[1]), "output_tokens": n, "total_tokens": int(ids.shape[1]) + n}
        return AIMessage(content=text, response_metadata=metadata, usage_metadata=usage)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, *, documents=None, **kwargs: Any) -> ChatResult:
        message = self._run(messages, stop, documents, None, kwargs)
        info = {"finish_reason": message.response_metadata["finish_reason"]}
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)],
                          llm_output={"model_name": self.model_name, "token_usage": message.usage_metadata})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, *, documents=None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        """A chunk per block of text that a verification step commits, then a last chunk
        with no text and the reply's usage and response metadata."""
        deltas: queue.Queue = queue.Queue()
        done = object()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["message"] = self._run(messages, stop, documents, deltas.put, kwargs)
            except Exception as err:  # re-raised in the caller's thread
                result["error"] = err
            finally:
                deltas.put(done)

        worker = threading.Thread(target=work, name="retrospec-stream", daemon=True)
        worker.start()
        while (delta := deltas.get()) is not done:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        worker.join()
        if "error" in result:
            raise result["error"]
        message = result["message"]
        yield ChatGenerationChunk(
            message=AIMessageChunk(content="", response_metadata=message.response_metadata,
                                   usage_metadata=message.usage_metadata, chunk_position="last"),
            generation_info={"finish_reason": message.response_metadata["finish_reason"]},
        )
