"""A Haystack RAG pipeline over Natural Questions passages, generating with retrospec.

    python examples/rag_pipeline.py --questions 20

Retriever (BM25 over the passages of ../shared/bench/rag/nq_rag5.jsonl) -> ChatPromptBuilder ->
RetrospecChatGenerator (Haystack 3, or 2.31), whose drafts also come from the retrieved
documents. The same pipeline runs with speculate=False (plain greedy); replies are compared
and MAT and speedup printed.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
from pathlib import Path

import torch
from haystack import Document, Pipeline
from haystack.components.builders import ChatPromptBuilder
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
from haystack.dataclasses import ChatMessage
from haystack.document_stores.in_memory import InMemoryDocumentStore

from haystack_integrations.components.generators.retrospec import RetrospecChatGenerator

DATA = Path(__file__).resolve().parents[2] / "shared" / "bench" / "rag" / "nq_rag5.jsonl"
TEMPLATE = [ChatMessage.from_user("""Answer the question in one sentence, using the passages.
{% for d in documents %}Passage {{ loop.index }}: {{ d.content }}
{% endfor %}
Question: {{ question }}""")]


def load_records(path: Path, n: int) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            records.append(json.loads(line))
            if len(records) == n:
                break
    return records


def passages(record: dict) -> list[Document]:
    raw = record["passages"]
    items = ast.literal_eval(raw) if isinstance(raw, str) else raw
    return [Document(content=f"{p['title']}. {p['text']}", meta={"title": p["title"]}) for p in items]


def build_pipeline(store, model: str, max_new_tokens: int, speculate: bool) -> Pipeline:
    pipe = Pipeline()
    pipe.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=5))
    pipe.add_component("prompt", ChatPromptBuilder(template=TEMPLATE, required_variables=["question", "documents"]))
    pipe.add_component("llm", RetrospecChatGenerator(model=model, generation_kwargs={"max_new_tokens": max_new_tokens},
                                                     speculate=speculate))
    pipe.connect("retriever.documents", "prompt.documents")
    pipe.connect("retriever.documents", "llm.documents")  # the documents feed the drafts
    pipe.connect("prompt.prompt", "llm.messages")
    return pipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)

    records = load_records(Path(args.data), args.questions)
    store = InMemoryDocumentStore()
    seen = {}
    for record in records:
        for doc in passages(record):
            seen.setdefault(doc.content, doc)
    store.write_documents(list(seen.values()))
    fast = build_pipeline(store, args.model, args.max_new_tokens, speculate=True)
    plain = build_pipeline(store, args.model, args.max_new_tokens, speculate=False)
    fast.warm_up()
    plain.warm_up()

    same = tokens = steps = 0
    fast_s = plain_s = 0.0
    for record in records:
        question = record["question"]
        inputs = {"retriever": {"query": question}, "prompt": {"question": question}}
        a = fast.run(inputs)["llm"]["replies"][0]
        b = plain.run(inputs)["llm"]["replies"][0]
        spec = a.meta["speculation"]
        same += a.text == b.text
        tokens += a.meta["usage"]["completion_tokens"]
        steps += spec["steps"]
        fast_s += a.meta["seconds"]
        plain_s += b.meta["seconds"]
        print(f"Q: {question}\nA: {a.text.strip()}\n   MAT {spec['mean_accepted_tokens']:.2f}, {spec['accepted_by_source']}\n")
    print(f"{same}/{len(records)} replies identical to plain greedy; MAT {tokens / max(steps, 1):.2f}; "
          f"retrospec {tokens / fast_s:.1f} tok/s vs plain {tokens / plain_s:.1f} tok/s: speedup {plain_s / fast_s:.2f}x")
    return 0 if same == len(records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
