"""Memory of a long run: many requests through one Speculator with a bounded history.

No model: each request's prompt and output are replayed through the speculator by the
model-free simulator (:func:`retrospec.tools.simulate.replay`), so every request drafts
from the history step by step, as in a service, and is added to it when it finishes.
Requests are built from real text on hand (``../shared/bench`` passages and questions,
tokenized with the model's tokenizer): an extraction prompt over a passage, answered by a
JSON object whose values are spans of that passage — the repetitive shape the history
source is for. Prints (and writes as JSON) the process RSS and the history's own size
every ``--every`` requests.

    python benchmarks/history_memory.py --requests 5000 --max-tokens 262144 --json runs/history-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def requests(tokenizer, n: int):
    """``n`` (prompt ids, output ids) pairs, cycling over the passages (each a new request)."""
    rows = [json.loads(line) for line in (BENCH / "rag" / "nq_open_oracle_passages.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    for i in range(n):
        r = rows[i % len(rows)]
        text = r["gold_passage"]["text"]
        words = text.split()
        a = int(rng.integers(0, max(1, len(words) - 8)))
        prompt = f"Extract a JSON object with keys title, answer, evidence.\nQuestion: {r['question']}\nPassage: {text}"
        output = json.dumps({"title": r["gold_passage"]["title"], "answer": r["answers"][0],
                             "evidence": " ".join(words[a : a + 8 + int(rng.integers(0, 8))])})
        yield (np.asarray(tokenizer(prompt, add_special_tokens=False)["input_ids"], np.int64),
               np.asarray(tokenizer(output, add_special_tokens=False)["input_ids"], np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--max-tokens", type=int, default=1 << 18, help="the history's token budget")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer (default: %(default)s)")
    parser.add_argument("--json", help="write the series here")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    import retrospec
    from retrospec.models import model_dir
    from retrospec.sources.history import HistoryConfig, HistorySource
    from retrospec.tools.simulate import replay

    tokenizer = AutoTokenizer.from_pretrained(model_dir(args.model))
    history = HistorySource(HistoryConfig(max_tokens=args.max_tokens))
    speculator = retrospec.Speculator([retrospec.ContextSource(), history], budget=16)
    series, tokens, steps = [], 0, 0
    start = time.perf_counter()
    for i, (prompt, output) in enumerate(requests(tokenizer, args.requests), 1):
        steps += replay(speculator, prompt, output)
        tokens += output.shape[0]
        if i % args.every == 0:
            point = {"requests": i, "rss_mib": round(rss_mib(), 1), "history_tokens": len(history.index),
                     "history_requests": history.index.requests, "history_mib": round(history.index.nbytes / 2**20, 2),
                     "evicted": history.index.evicted, "mat": round(tokens / max(steps, 1), 3),
                     "seconds": round(time.perf_counter() - start, 1)}
            tokens = steps = 0
            series.append(point)
            print(json.dumps(point), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "pid": os.getpid(), "series": series}, indent=1))


if __name__ == "__main__":
    main()
