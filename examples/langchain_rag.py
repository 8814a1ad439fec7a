"""A LangChain RAG chain over Natural Questions passages, generating with retrospec.

    python examples/langchain_rag.py --questions 20

BM25Retriever (langchain-community, over the passages of ../shared/bench/rag/nq_rag5.jsonl)
-> with_documents(prompt, ChatRetrospec) -> StrOutputParser: the retrieved documents go into
the prompt and, as drafts, to retrospec's document source. The same chain runs with
speculate=False (plain greedy); replies are compared, each speculative reply is also streamed
(the chunks must join to the same text), and MAT and speedup are printed.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import time
from pathlib import Path

import torch
from langchain_community.retrievers import BM25Retriever
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_retrospec import ChatRetrospec, with_documents

DATA = Path(__file__).resolve().parents[2] / "shared" / "bench" / "rag" / "nq_rag5.jsonl"
PROMPT = ChatPromptTemplate.from_messages([
    ("user", "Answer the question in one sentence, using the passages.\n{context}\n\nQuestion: {question}"),
])


def load_records(path: Path, n: int) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            records.append(json.loads(line))
            if len(records) == n:
                break
    return records


def passages(records: list[dict]) -> list[Document]:
    """Every passage of ``records`` (5 per question), deduplicated."""
    seen: dict[str, Document] = {}
    for record in records:
        raw = record["passages"]
        for p in ast.literal_eval(raw) if isinstance(raw, str) else raw:
            text = f"{p['title']}. {p['text']}"
            seen.setdefault(text, Document(page_content=text, metadata={"title": p["title"]}))
    return list(seen.values())


def build_chain(retriever, llm: ChatRetrospec):
    """question -> {question, documents} -> prompt + drafts -> reply text."""
    return {"question": RunnablePassthrough(), "documents": retriever} | with_documents(PROMPT, llm) | StrOutputParser()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)

    records = load_records(Path(args.data), args.questions)
    retriever = BM25Retriever.from_documents(passages(records), k=args.top_k)
    fast_llm = ChatRetrospec(model=args.model, max_new_tokens=args.max_new_tokens).load()
    # the same weights, decoded plainly: no second copy of the model in memory
    plain_llm = ChatRetrospec(model=args.model, max_new_tokens=args.max_new_tokens, speculate=False,
                              hf_model=fast_llm.hf_model, tokenizer=fast_llm.tokenizer)
    fast, plain = build_chain(retriever, fast_llm), build_chain(retriever, plain_llm)

    same = streamed_same = 0
    fast_s = plain_s = 0.0
    for record in records:
        question = record["question"]
        start = time.perf_counter()
        a = fast.invoke(question)
        fast_s += time.perf_counter() - start
        start = time.perf_counter()
        b = plain.invoke(question)
        plain_s += time.perf_counter() - start
        chunks = list(fast.stream(question))
        same += a == b
        streamed_same += "".join(chunks) == a
        print(f"Q: {question}\nA: {a.strip()}\n   streamed in {len(chunks)} chunks\n")
    print(f"{same}/{len(records)} replies identical to plain greedy; {streamed_same}/{len(records)} streamed == final; "
          f"chain time retrospec {fast_s:.1f}s vs plain {plain_s:.1f}s: speedup {plain_s / max(fast_s, 1e-9):.2f}x")
    return 0 if same == streamed_same == len(records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
