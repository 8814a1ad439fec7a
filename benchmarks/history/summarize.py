"""Tables for benchmarks/history/README.md from the runs of ``run.sh`` (``runs/hist-*``).

    python benchmarks/history/summarize.py runs/hist-extract runs/hist-code runs/hist-agent runs/hist-specbench
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def bench_table(run: Path) -> list[str]:
    doc = json.loads((run / "results.json").read_text())
    details = json.loads((run / "details.json").read_text())
    lines = ["| method (real run) | MAT | identical | Q1 MAT | Q4 MAT |", "|---|---:|---:|---:|---:|"]
    for name, m in doc["methods"].items():
        q = details.get(name, {}).get("arrival", [])
        o = m["overall"]
        lines.append(f"| {name} | {o['mat']:.2f} | {o['identical']}/{o['n']} | "
                     f"{q[0]['mat']:.2f} | {q[-1]['mat']:.2f} |" if q else f"| {name} | {o['mat']:.2f} | {o['identical']}/{o['n']} | | |")
    return lines


def simulate_table(run: Path) -> list[str]:
    path = run / "simulate.txt"
    if not path.exists():
        return []
    rows = [[c.strip() for c in line.split("|")] for line in path.read_text().splitlines()
            if line.strip() and not set(line.strip()) <= set("-+| ")]
    header, body = rows[0], rows[1:]
    q1, q4 = header.index("Q1"), header.index("Q4")
    lines = ["| sources (model-free replay) | MAT | Q1 MAT | Q4 MAT |", "|---|---:|---:|---:|"]
    for row in body:
        lines.append(f"| {row[0]} | {float(row[1]):.2f} | {float(row[q1]):.2f} | {float(row[q4]):.2f} |")
    return lines


def main() -> None:
    for arg in sys.argv[1:]:
        run = Path(arg)
        print(f"### {run.name}\n")
        print("\n".join(bench_table(run)))
        print()
        print("\n".join(simulate_table(run)))
        print()


if __name__ == "__main__":
    main()
