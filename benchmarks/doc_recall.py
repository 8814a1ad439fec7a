"""Build a document store over the NQ passages and measure top-k recall of the gold passage.

    python benchmarks/doc_recall.py --tokenizer qwen2.5-coder-1.5b --out runs/idx/nq-docs

Documents: the distinct passages of ../shared/bench/rag/nq_rag5.jsonl (gold and BM25
neighbours; 1,256 in the public half). Queries: the questions of
nq_open_oracle_passages.jsonl, each with its gold passage.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import time
from pathlib import Path

from retrospec.datastores.corpus import Document
from retrospec.datastores.documents import DocumentStore, build_document_store
from retrospec.datastores.files import IndexFormatError
from retrospec.tools.index_cli import load_tokenizer

RAG = Path(__file__).resolve().parents[2] / "shared" / "bench" / "rag"


def passage_key(p: dict) -> str:
    return f"{p['title']}. {p['text']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="qwen2.5-coder-1.5b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)

    texts: dict[str, int] = {}
    for line in (RAG / "nq_rag5.jsonl").read_text(encoding="utf-8").splitlines():
        for p in json.loads(line)["passages"]:
            texts.setdefault(passage_key(p), len(texts))
    docs = [Document(text, f"nq:{i}", {}) for text, i in texts.items()]
    start = time.perf_counter()
    report = build_document_store(None, tokenizer, args.out, documents=docs, chunk_tokens=256, overlap=0)
    build_s = time.perf_counter() - start
    store = DocumentStore.open(args.out, tokenizer=tokenizer)

    hits = {"dense": 0, "hybrid": 0}
    n = 0
    start = time.perf_counter()
    for line in (RAG / "nq_open_oracle_passages.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        gold = row["gold_passage"]
        gold = ast.literal_eval(gold) if isinstance(gold, str) else gold
        want = texts.get(passage_key(gold))
        if want is None:
            continue
        n += 1
        for mode in hits:
            found = {h.document for h in store.search(row["question"], args.k, mode=mode, tokenizer=tokenizer)}
            hits[mode] += want in found
    query_s = time.perf_counter() - start
    result = {"documents": report["documents"], "chunks": report["chunks"], "build_seconds": round(build_s, 1),
              "questions": n, **{f"recall@{args.k}_{m}": round(h / n, 4) for m, h in hits.items()},
              "ms_per_query": round(1e3 * query_s / (2 * n), 2)}
    # a damaged store is refused with a clear message
    broken = Path(args.out + "-broken")
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(args.out, broken)
    dense = broken / "dense.faiss"
    dense.write_bytes(dense.read_bytes()[: dense.stat().st_size // 2])
    try:
        DocumentStore.open(broken)
    except IndexFormatError as err:
        result["corrupted_store_error"] = str(err)
    shutil.rmtree(broken, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
