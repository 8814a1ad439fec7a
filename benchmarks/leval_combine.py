"""Combine `retrospec bench` runs over L-Eval documents (one output directory per run) into
per-document and overall rows:

    python benchmarks/leval_combine.py runs/leval-a runs/leval-b/*

Overall MAT and tok/s weigh each document by its reference (greedy) output length.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def combine(dirs: list[Path]) -> dict[str, dict[str, tuple[int, float, float, int]]]:
    """method -> document -> (reference tokens, MAT, tok/s, identical)."""
    per_doc: dict[str, dict[str, tuple[int, float, float, int]]] = {}
    for d in dirs:
        if not (d / "results.json").exists():
            continue
        methods = json.loads((d / "results.json").read_text())["methods"]
        records = [json.loads(line) for line in (d / "outputs.jsonl").read_text().splitlines()]
        tokens = {r["category"]: sum(len(o) for o in r["outputs"]) for r in records}
        for method, row in methods.items():
            for doc, r in row["categories"].items():
                per_doc.setdefault(method, {})[doc] = (tokens[doc], r["mat"], r["tok_s"], r["identical"])
    return per_doc


def main() -> None:
    per_doc = combine([Path(a) for a in sys.argv[1:]])
    print("| method | documents | MAT | tok/s (prefill included) | identical |\n|---|---:|---:|---:|---:|")
    for method, docs in per_doc.items():
        tokens = sum(t for t, *_ in docs.values())
        steps = sum(t / mat for t, mat, *_ in docs.values())
        seconds = sum(t / tok_s for t, _, tok_s, _ in docs.values())
        identical = sum(i for *_, i in docs.values())
        print(f"| {method} | {len(docs)} | {tokens / steps:.2f} | {tokens / seconds:.3f} | {identical}/{len(docs)} |")
    print()
    for method, docs in per_doc.items():
        print(method, {doc: (round(v[1], 2), round(v[2], 3), v[3]) for doc, v in docs.items()})


if __name__ == "__main__":
    main()
