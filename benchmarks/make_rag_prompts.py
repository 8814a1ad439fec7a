"""The RAG prompt set of the benchmarks: Spec-Bench's `rag` prompts + NQ questions with passages.

    python benchmarks/make_rag_prompts.py --specbench 10 --nq 40 --out runs/rag50.jsonl

Records keep `retrospec bench`'s schema (`id`, `category`, `turns`); the NQ ones also carry
their five retrieved `passages`, which the `documents` source drafts from. Categories are
renamed `specbench-rag` and `nq-rag5` so the report shows the two sets apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specbench", type=int, default=10, help="first N `rag` prompts of specbench/question.jsonl")
    parser.add_argument("--nq", type=int, default=40, help="first N records of rag/nq_rag5.jsonl")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = []
    with open(BENCH / "specbench" / "question.jsonl", encoding="utf-8") as f:
        rag = [r for r in map(json.loads, f) if r["category"] == "rag"][: args.specbench]
    out += [{"id": f"specbench-{r['question_id']}", "category": "specbench-rag", "turns": r["turns"]} for r in rag]
    with open(BENCH / "rag" / "nq_rag5.jsonl", encoding="utf-8") as f:
        nq = [json.loads(line) for _, line in zip(range(args.nq), f)]
    out += [{"id": r["id"], "category": "nq-rag5", "turns": r["turns"], "passages": r["passages"]} for r in nq]
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    print(f"{len(out)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
