"""Pick L-Eval long documents (>= 8k tokens) as Spec-Bench-style prompts.

    python benchmarks/make_leval_prompts.py --tokenizer qwen2.5-coder-1.5b --n 10 --out runs/leval10.jsonl

One document per task file (open-ended tasks first), the shortest that has at least
``--min-tokens`` tokens, with its first instruction after the document.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrospec.tools.index_cli import load_tokenizer

LEVAL = Path(__file__).resolve().parents[2] / "shared" / "bench" / "long_context" / "leval"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="qwen2.5-coder-1.5b")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--min-tokens", type=int, default=8000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    picked = []
    for path in sorted(LEVAL.glob("Open-ended-tasks/*.jsonl")) + sorted(LEVAL.glob("Closed-ended-tasks/*.jsonl")):
        best = None
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            n = len(tokenizer(record["input"], add_special_tokens=False).input_ids)
            if n >= args.min_tokens and (best is None or n < best[0]):
                best = (n, record)
        if best is not None:
            n, record = best
            instruction = record["instructions"][0]
            picked.append({"id": record.get("doc_id", path.stem), "category": path.stem, "tokens": n,
                           "turns": [f"{record['input']}\n\n{instruction}"]})
        if len(picked) == args.n:
            break
    with open(args.out, "w", encoding="utf-8") as f:
        for row in picked:
            f.write(json.dumps(row) + "\n")
    print(json.dumps([(r["category"], r["tokens"]) for r in picked]))


if __name__ == "__main__":
    main()
