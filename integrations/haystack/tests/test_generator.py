"""RetrospecGenerator in real Haystack pipelines."""

from __future__ import annotations

import json

import pytest
from haystack import Document, Pipeline
from haystack.components.builders import PromptBuilder
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
from haystack.dataclasses import ChatMessage
from haystack.document_stores.in_memory import InMemoryDocumentStore

from retrospec_haystack import RetrospecChatGenerator, RetrospecGenerator

TEMPLATE = """Answer the question using the passages.
{% for d in documents %}Passage: {{ d.content }}
{% endfor %}Question: {{ question }}"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer (fast; real text is not the point)."""
    from retrospec.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def rag_pipeline(model: str, speculate: bool, store) -> Pipeline:
    pipe = Pipeline()
    pipe.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=3))
    pipe.add_component("prompt", PromptBuilder(template=TEMPLATE, required_variables=["question", "documents"]))
    pipe.add_component("llm", RetrospecGenerator(model=model, max_new_tokens=24, speculate=speculate))
    pipe.connect("retriever.documents", "prompt.documents")
    pipe.connect("retriever.documents", "llm.documents")
    pipe.connect("prompt.prompt", "llm.prompt")
    return pipe


def docs():
    return [
        Document(content="The Harlow Lighthouse was completed in 1871 and electrified in 1934."),
        Document(content="Gull Island has no permanent residents; a ferry runs twice a day in summer."),
        Document(content="The last keeper, Margaret Olsen, left the lighthouse in 1998."),
    ]


def test_pipeline_replies_equal_plain_greedy_and_meta_has_stats(tiny_dir):
    store = InMemoryDocumentStore()
    store.write_documents(docs())
    question = "When was the Harlow Lighthouse completed?"
    inputs = {"retriever": {"query": question}, "prompt": {"question": question}}
    fast = rag_pipeline(tiny_dir, True, store).run(inputs)["llm"]
    plain = rag_pipeline(tiny_dir, False, store).run(inputs)["llm"]
    assert fast["replies"] == plain["replies"]
    meta = fast["meta"][0]
    assert meta["speculate"] and meta["documents"] == 3 and meta["new_tokens"] == 24
    assert meta["mean_accepted_tokens"] >= 1.0 and set(meta["accepted_by_source"]) >= {"context", "documents"}
    assert not plain["meta"][0]["speculate"]


def test_streaming_callback_receives_the_reply(tiny_dir):
    chunks = []
    gen = RetrospecGenerator(model=tiny_dir, max_new_tokens=16, streaming_callback=chunks.append)
    gen.warm_up()
    reply = gen.run("Tell me about lighthouses.")["replies"][0]
    assert "".join(c.content for c in chunks) == reply
    assert chunks[-1].finish_reason == "stop"


def test_serialization_round_trip(tiny_dir):
    gen = RetrospecGenerator(model=tiny_dir, max_new_tokens=8, speculate=False, budget=16, streaming_callback=print)
    data = gen.to_dict()
    assert data["init_parameters"]["streaming_callback"] == "builtins.print"
    again = RetrospecGenerator.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data
    pipe = Pipeline()
    pipe.add_component("llm", RetrospecChatGenerator(model=tiny_dir, max_new_tokens=8))
    assert Pipeline.loads(pipe.dumps()).to_dict() == pipe.to_dict()


def test_chat_variant(tiny_dir):
    chat = RetrospecChatGenerator(model=tiny_dir, max_new_tokens=12)
    chat.warm_up()
    out = chat.run([ChatMessage.from_user("Hello there")], documents=docs())
    reply = out["replies"][0]
    assert reply.text is not None and reply.meta["new_tokens"] == 12


def test_run_before_warm_up_is_a_clear_error(tiny_dir):
    with pytest.raises(RuntimeError, match="warm_up"):
        RetrospecGenerator(model=tiny_dir).run("hi")
    with pytest.raises(ValueError, match="max_new_tokens"):
        RetrospecGenerator(model=tiny_dir, max_new_tokens=0)
