"""RetrospecChatGenerator in real Haystack 3 pipelines."""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

import pytest
from haystack import Document, Pipeline
from haystack.components.builders import ChatPromptBuilder
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
from haystack.dataclasses import ChatMessage
from haystack.document_stores.in_memory import InMemoryDocumentStore

from haystack_integrations.components.generators.retrospec import RetrospecChatGenerator

NQ = Path(__file__).resolve().parents[4] / "shared" / "bench" / "rag" / "nq_rag5.jsonl"
TEMPLATE = [ChatMessage.from_user(
    "Answer the question in one sentence, using the passages.\n"
    "{% for d in documents %}Passage {{ loop.index }}: {{ d.content }}\n{% endfor %}\n"
    "Question: {{ question }}"
)]


def nq_records(n: int) -> list[dict]:
    records = []
    with open(NQ, encoding="utf-8") as f:
        for line in f:
            records.append(json.loads(line))
            if len(records) == n:
                return records
    return records


def nq_store(records: list[dict]) -> InMemoryDocumentStore:
    """Every passage of ``records`` (5 per question, deduplicated) in one BM25 store."""
    docs = {}
    for record in records:
        raw = record["passages"]
        for p in ast.literal_eval(raw) if isinstance(raw, str) else raw:
            content = f"{p['title']}. {p['text']}"
            docs.setdefault(content, Document(content=content, meta={"title": p["title"]}))
    store = InMemoryDocumentStore()
    store.write_documents(list(docs.values()))
    return store


def rag_pipeline(store, generator: RetrospecChatGenerator) -> Pipeline:
    pipe = Pipeline()
    pipe.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=3))
    pipe.add_component("prompt", ChatPromptBuilder(template=TEMPLATE, required_variables=["question", "documents"]))
    pipe.add_component("llm", generator)
    pipe.connect("retriever.documents", "prompt.documents")
    pipe.connect("retriever.documents", "llm.documents")  # the documents feed the drafts
    pipe.connect("prompt.prompt", "llm.messages")
    return pipe


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer (fast; real text is not the point)."""
    from retrospec.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def check_nq_pipelines(model: str, questions: int, max_new_tokens: int) -> tuple[int, int]:
    """BM25 over NQ passages -> ChatPromptBuilder -> RetrospecChatGenerator, with speculation,
    without, and streamed: the same replies; returns (steps, tokens) of the speculative runs."""
    records = nq_records(12)
    store = nq_store(records)
    kwargs = {"max_new_tokens": max_new_tokens}
    fast = rag_pipeline(store, RetrospecChatGenerator(model=model, generation_kwargs=kwargs))
    plain = rag_pipeline(store, RetrospecChatGenerator(model=model, generation_kwargs=kwargs, speculate=False))
    chunks = []
    streamed = rag_pipeline(store, RetrospecChatGenerator(model=model, generation_kwargs=kwargs,
                                                          streaming_callback=chunks.append))
    steps = tokens = 0
    for record in records[:questions]:
        q = record["question"]
        inputs = {"retriever": {"query": q}, "prompt": {"question": q}}
        a = fast.run(inputs)["llm"]["replies"][0]
        b = plain.run(inputs)["llm"]["replies"][0]
        assert a.text == b.text and a.text
        spec = a.meta["speculation"]
        assert spec["enabled"] and spec["documents"] == 3 and not b.meta["speculation"]["enabled"]
        assert a.meta["usage"] == b.meta["usage"] and a.meta["usage"]["completion_tokens"] <= max_new_tokens
        assert set(spec["accepted_by_source"]) >= {"context", "documents"}
        steps, tokens = steps + spec["steps"], tokens + a.meta["usage"]["completion_tokens"]

        chunks.clear()
        c = streamed.run(inputs)["llm"]["replies"][0]
        assert "".join(ch.content for ch in chunks) == c.text == a.text
        assert chunks[0].start and chunks[-1].finish_reason == a.meta["finish_reason"]
        assert len(chunks) > 2  # a chunk per committed block, not one at the end
    return steps, tokens


def test_nq_pipeline_wiring_on_a_tiny_model(tiny_dir):
    """The same pipelines on a tiny random model: fast, and what CI runs on Haystack 2.31 too."""
    check_nq_pipelines(tiny_dir, questions=1, max_new_tokens=16)


@pytest.mark.real
def test_nq_pipeline_replies_identical_with_and_without_speculation():
    """SmolLM2-135M fp32: identical replies, and the drafts were accepted."""
    steps, tokens = check_nq_pipelines("smollm2-135m", questions=2, max_new_tokens=32)
    assert tokens / steps > 1.0


def test_string_in_chat_message_out_with_usage_and_stats(tiny_dir):
    gen = RetrospecChatGenerator(model=tiny_dir, generation_kwargs={"max_new_tokens": 12})
    gen.warm_up()
    model = gen._model
    gen.warm_up()
    assert gen._model is model  # warm_up is idempotent
    reply = gen.run("Hello there", documents=[Document(content="Gull Island has no permanent residents.")])["replies"][0]
    assert reply.is_from("assistant") and reply.text is not None
    meta = reply.meta
    assert meta["usage"]["completion_tokens"] == 12 and meta["finish_reason"] == "length"
    assert meta["usage"]["total_tokens"] == meta["usage"]["prompt_tokens"] + 12
    assert meta["speculation"]["documents"] == 1 and meta["speculation"]["mean_accepted_tokens"] >= 1.0
    assert meta["tokens_per_second"] > 0
    same = gen.run([ChatMessage.from_user("Hello there")])["replies"][0]
    plain = RetrospecChatGenerator(model=tiny_dir, generation_kwargs={"max_new_tokens": 12}, speculate=False)
    assert plain.run("Hello there")["replies"][0].text == same.text == reply.text


def test_run_async_equals_run_and_streams_to_async_callbacks(tiny_dir):
    gen = RetrospecChatGenerator(model=tiny_dir, generation_kwargs={"max_new_tokens": 16})
    sync = gen.run("Tell me about lighthouses.")["replies"][0]
    got = []

    async def collect(chunk):
        await asyncio.sleep(0)
        got.append(chunk)

    async def main():
        plain = await gen.run_async("Tell me about lighthouses.")
        streamed = await gen.run_async("Tell me about lighthouses.", streaming_callback=collect)
        return plain["replies"][0], streamed["replies"][0]

    plain, streamed = asyncio.run(main())
    assert plain.text == streamed.text == sync.text
    assert "".join(c.content for c in got) == sync.text and got[-1].finish_reason == "length"
    gen.close()
    assert gen.executor is None


def test_serialization_round_trip(tiny_dir):
    gen = RetrospecChatGenerator(model=tiny_dir, generation_kwargs={"max_new_tokens": 8}, speculate=False,
                                 budget=16, streaming_callback=print)
    data = gen.to_dict()
    assert data["type"].endswith("generators.retrospec.chat.chat_generator.RetrospecChatGenerator")
    assert data["init_parameters"]["streaming_callback"] == "builtins.print"
    again = RetrospecChatGenerator.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data and again.streaming_callback is print
    pipe = Pipeline()
    pipe.add_component("llm", RetrospecChatGenerator(model=tiny_dir, generation_kwargs={"max_new_tokens": 8}))
    assert Pipeline.loads(pipe.dumps()).to_dict() == pipe.to_dict()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_new_tokens"):
        RetrospecChatGenerator(generation_kwargs={"max_new_tokens": 0})
    with pytest.raises(ValueError, match="budget"):
        RetrospecChatGenerator(budget="big")
    with pytest.raises(ValueError, match="dtype"):
        RetrospecChatGenerator(dtype="fp8")
