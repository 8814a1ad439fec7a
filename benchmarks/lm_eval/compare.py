"""Compare two lm-eval --log_samples runs: every generated output, and the scores.

    python benchmarks/lm_eval/compare.py runs/lm_eval/plain runs/lm_eval/retrospec
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(run: Path) -> tuple[dict, dict]:
    """(doc_id -> raw generated text, the results.json 'results' section) of one run."""
    samples = sorted(run.rglob("samples_*.jsonl"))
    results = sorted(run.rglob("results_*.json"))
    if not samples or not results:
        raise SystemExit(f"{run}: no samples_*.jsonl / results_*.json (run lm_eval with --log_samples --output_path)")
    outputs = {}
    for line in samples[-1].read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        outputs[row["doc_id"]] = row["resps"][0][0]
    return outputs, json.loads(results[-1].read_text())["results"]


def main(argv: list[str]) -> int:
    (a_out, a_res), (b_out, b_res) = load(Path(argv[0])), load(Path(argv[1]))
    same = sum(a_out[k] == b_out.get(k) for k in a_out)
    print(f"{same}/{len(a_out)} generated outputs identical")
    for task, scores in a_res.items():
        for key, value in scores.items():
            if key.startswith("exact_match,"):
                other = b_res[task][key]
                print(f"{task} {key}: {value} vs {other} ({'identical' if value == other else 'DIFFERENT'})")
    return 0 if same == len(a_out) == len(b_out) and a_res == b_res else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
