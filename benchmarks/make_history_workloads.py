"""Build workloads where requests repeat each other, for the history source (issue 15).

Spec-Bench mixes unrelated tasks, so a request rarely drafts from another. Services are
not like that: the same application sends the same kind of request all day. This writes
three Spec-Bench-style JSONL files (one record per request, in arrival order) from the
public halves in ``../shared/bench`` (nothing here is committed but this script):

* ``extract.jsonl`` — **structured extraction**: one fixed instruction and JSON schema,
  filled from a different Wikipedia passage each time (NQ-open oracle passages). This is
  what document-processing pipelines do: the schema, key order and punctuation of every
  answer are the same; only the values change.
* ``code.jsonl`` — **code edits**: HumanEval functions (prompt + canonical solution) with one
  fixed editing instruction (add type hints and a Google-style docstring, return the whole
  function). Coding assistants send the same instruction over many functions; answers
  share the docstring layout, ``Args:``/``Returns:`` blocks and Python idioms, and copy much
  of their own prompt.
* ``agent.jsonl`` — **a simulated agent loop**: a system prompt with tool descriptions, a
  question (NQ-open), and three turns: the task, then two tool observations (passages)
  fed back after the model's own previous tool call (the bench runs turns with the
  model's own answers). Every answer is a tool call of the same JSON shape; every request
  repeats the whole system prompt, as agent frameworks do.

    python benchmarks/make_history_workloads.py --out runs/history-workloads --n 32

Each record: ``{"id", "category", "turns"}``; the category is the workload's name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"

EXTRACT = """Extract information from the passage below. Reply with only a JSON object with exactly these keys, in this order:
{"title": string, "topic": one of "person", "place", "event", "work", "organisation", "science", "other",
 "people": list of names, "places": list of names, "years": list of numbers, "one_sentence_summary": string}

Passage title: {title}
Passage: {text}"""

EDIT = (
    "Rewrite the following Python function. Add type hints to every argument and the return value, and a Google-style "
    'docstring with a one-line summary, an "Args:" section and a "Returns:" section. Keep the behaviour exactly the same. '
    "Reply with only the code, in one ```python block.\n\n```python\n{code}\n```"
)

AGENT_SYSTEM = """You are a research agent. You answer the user's question by calling tools. Tools:
- search(query: string): searches Wikipedia and returns the best passage.
- lookup(title: string, keyword: string): returns the sentence of the article {title} that contains {keyword}.
- finish(answer: string): gives the final answer to the user.
Reply to every message with exactly one tool call, as one JSON object and nothing else:
{"thought": "<one sentence>", "tool": "<search|lookup|finish>", "arguments": {"<name>": "<value>"}}"""


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def extraction(n: int) -> list[dict]:
    rows = _jsonl(BENCH / "rag" / "nq_open_oracle_passages.jsonl")[:n]
    return [{"id": f"extract-{i:03d}", "category": "extract",
             "turns": [EXTRACT.replace("{title}", r["gold_passage"]["title"]).replace("{text}", r["gold_passage"]["text"])]}
            for i, r in enumerate(rows)]


def code_edits(n: int) -> list[dict]:
    rows = _jsonl(BENCH / "code" / "humaneval.jsonl")[:n]
    return [{"id": f"code-{i:03d}", "category": "code",
             "turns": [EDIT.replace("{code}", (r["prompt"] + r["canonical_solution"]).strip())]} for i, r in enumerate(rows)]


def agent_loop(n: int) -> list[dict]:
    passages = _jsonl(BENCH / "rag" / "nq_open_oracle_passages.jsonl")
    rows = passages[-n:]  # other passages than the extraction workload's
    out = []
    for i, r in enumerate(rows):
        other = passages[(i * 7 + 11) % (len(passages) - n)]["gold_passage"]
        gold = r["gold_passage"]
        out.append({"id": f"agent-{i:03d}", "category": "agent", "turns": [
            f"{AGENT_SYSTEM}\n\nQuestion: {r['question']}?",
            f"Observation: {other['title']}: {other['text']}",
            f"Observation: {gold['title']}: {gold['text']}",
        ]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/history-workloads", help="output folder (default: %(default)s)")
    parser.add_argument("--n", type=int, default=32, help="requests per workload (default: %(default)s)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("extract", extraction(args.n)), ("code", code_edits(args.n)), ("agent", agent_loop(args.n))):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{out / name}.jsonl: {len(rows)} requests")


if __name__ == "__main__":
    main()
