"""ChatRetrospec and with_documents, mechanics on a tiny model and a real RAG chain."""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

import pytest
import torch
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, FunctionMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_retrospec import ChatRetrospec, with_documents
from langchain_retrospec.chat_models import to_chat_turns

torch.set_num_threads(2)
NQ = Path(__file__).resolve().parents[4] / "shared" / "bench" / "rag" / "nq_rag5.jsonl"
PROMPT = ChatPromptTemplate.from_messages(
    [("user", "Answer the question in one sentence, using the passages.\n{context}\n\nQuestion: {question}")])


@pytest.fixture(scope="module")
def tiny():
    """A ChatRetrospec over a tiny random Llama with the SmolLM2 tokenizer (wiring, not text)."""
    import tempfile

    import retrospec
    from retrospec.testing import save_tiny_model

    path = save_tiny_model(tempfile.mkdtemp(prefix="tiny-lc-"))
    model, tok = retrospec.load_model(path)
    return ChatRetrospec(model=path, max_new_tokens=16, hf_model=model, tokenizer=tok).load()


def plain_twin(llm: ChatRetrospec, **overrides) -> ChatRetrospec:
    """The same weights decoded with plain generate()."""
    return llm.model_copy(update={"speculate": False, "speculator": None, **overrides})


def test_invoke_returns_usage_and_speculation_stats(tiny):
    msg = tiny.invoke([SystemMessage("Be brief."), HumanMessage("Hello there")], documents=["Gull Island has no residents."])
    assert isinstance(msg, AIMessage) and msg.content
    assert msg.usage_metadata["output_tokens"] == 16
    assert msg.usage_metadata["total_tokens"] == msg.usage_metadata["input_tokens"] + 16
    meta = msg.response_metadata
    assert meta["finish_reason"] == "length" and meta["tokens_per_second"] > 0
    assert meta["speculation"]["enabled"] and meta["speculation"]["documents"] == 1
    assert meta["speculation"]["mean_accepted_tokens"] >= 1.0
    assert plain_twin(tiny).invoke([SystemMessage("Be brief."), HumanMessage("Hello there")]).content == msg.content


def test_stream_chunks_join_to_the_invoked_reply(tiny):
    text = tiny.invoke("Tell me about lighthouses.").content
    chunks = list(tiny.stream("Tell me about lighthouses."))
    assert "".join(c.content for c in chunks) == text
    assert len(chunks) > 2 and chunks[-1].chunk_position == "last" and chunks[-1].content == ""
    whole = chunks[0]
    for c in chunks[1:]:
        whole += c
    assert whole.usage_metadata["output_tokens"] == 16 and whole.response_metadata["speculation"]["steps"] > 0


def test_stop_sequences_cut_the_reply_and_the_stream_alike(tiny):
    full = tiny.invoke("Count the ships.").content
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    assert len(stop) == 4
    cut = tiny.invoke("Count the ships.", stop=[stop])
    assert cut.content == full[: full.find(stop)] and cut.response_metadata["finish_reason"] == "stop"
    assert "".join(c.content for c in tiny.stream("Count the ships.", stop=[stop])) == cut.content
    assert plain_twin(tiny).invoke("Count the ships.", stop=[stop]).content == cut.content


def test_batch_and_async_share_one_speculator(tiny):
    prompts = ["one", "two", "three"]
    replies = [m.content for m in tiny.batch(prompts)]
    assert replies == [tiny.invoke(p).content for p in prompts]

    async def main():
        a = await tiny.ainvoke("two")
        b = [c.content async for c in tiny.astream("two")]
        return a.content, "".join(b)

    assert asyncio.run(main()) == (replies[1], replies[1])


def test_with_documents_feeds_prompt_and_drafts(tiny):
    docs = [Document("The Harlow Lighthouse was completed in 1871."), Document("Gull Island has a ferry.")]
    chain = with_documents(PROMPT, tiny)
    msg = chain.invoke({"question": "When was it completed?", "documents": docs})
    assert msg.response_metadata["speculation"]["documents"] == 2
    prompt_text = PROMPT.invoke({"question": "When was it completed?", "context": "\n\n".join(d.page_content for d in docs)})
    assert tiny.invoke(prompt_text).content == msg.content
    assert "".join(c.content for c in chain.stream({"question": "When was it completed?", "documents": docs})) == msg.content
    with pytest.raises(ValueError, match="documents"):
        chain.invoke({"question": "no documents key"})
    with pytest.raises(TypeError, match="ChatRetrospec"):
        with_documents(PROMPT, object())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_new_tokens"):
        ChatRetrospec(max_new_tokens=0)
    with pytest.raises(ValueError, match="budget"):
        ChatRetrospec(budget="big")
    with pytest.raises(ValueError, match="FunctionMessage"):
        to_chat_turns([FunctionMessage(content="x", name="f")])


@pytest.mark.real
def test_nq_rag_chain_identical_with_and_without_speculation():
    """BM25Retriever over NQ passages -> with_documents -> SmolLM2-135M fp32, on and off."""
    from langchain_community.retrievers import BM25Retriever

    records = [json.loads(line) for line in NQ.read_text(encoding="utf-8").splitlines()[:12]]
    docs = {}
    for record in records:
        for p in ast.literal_eval(record["passages"]) if isinstance(record["passages"], str) else record["passages"]:
            text = f"{p['title']}. {p['text']}"
            docs.setdefault(text, Document(text))
    retriever = BM25Retriever.from_documents(list(docs.values()), k=3)
    # a fixed budget: with "auto" a busy machine may rightly decode a short answer plainly
    fast_llm = ChatRetrospec(model="smollm2-135m", max_new_tokens=40, budget=16).load()

    def chain(llm):
        return {"question": RunnablePassthrough(), "documents": retriever} | with_documents(PROMPT, llm)

    fast, plain = chain(fast_llm), chain(plain_twin(fast_llm))
    for record in records[:2]:
        a, b = fast.invoke(record["question"]), plain.invoke(record["question"])
        assert a.content == b.content and a.content
        assert a.usage_metadata == b.usage_metadata
        spec = a.response_metadata["speculation"]
        assert spec["documents"] == 3 and set(spec["accepted_by_source"]) >= {"context", "documents"}
        assert spec["steps"] < a.usage_metadata["output_tokens"] - 1  # drafts were accepted
        streamed = list((chain(fast_llm) | StrOutputParser()).stream(record["question"]))
        assert "".join(streamed) == a.content and len(streamed) > 2
