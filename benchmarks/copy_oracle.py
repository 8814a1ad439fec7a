"""How far can drafting by copying go? An upper bound on retrieval MAT from recorded outputs.

For every step of a greedy continuation, an oracle drafter that may copy *any* span of the
text the request can see (the prompt with its passages, the passages again, and the output
so far) proposes the longest span that the model really produces next; verification accepts
it plus the bonus token. No retrieval drafter (context, documents, suffix index over those
texts) can beat this, whatever its tree — so when the oracle's MAT is below a target, the
target is out of reach for the model, not for the drafter.

    python benchmarks/copy_oracle.py runs/rag-qwen15/outputs.jsonl --tokenizer qwen2.5-coder-1.5b

``outputs.jsonl`` is what ``retrospec bench`` saves (prompt ids, greedy outputs, passages).
Prints the oracle MAT overall and per category; the anchored oracle, which may only copy
right after an occurrence of the last token (what any suffix-matching drafter is limited
to); and the share of output tokens inside a copied span of at least 4 tokens.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def longest_copies(text: np.ndarray, out: np.ndarray, anchored: bool = False) -> np.ndarray:
    """``L[i]``: the longest ``l`` with ``out[i:i+l]`` inside ``text + out[:i]``.

    ``anchored``: only copies that start right after an occurrence of the last token seen
    (what a drafter that matches a suffix of the context can find)."""
    best = np.zeros(out.shape[0], np.int64)
    for i in range(out.shape[0]):
        seen = np.concatenate([text, out[:i]])
        starts = np.flatnonzero(seen == out[i])
        if anchored:
            starts = starts[(starts > 0) & (seen[np.maximum(starts - 1, 0)] == seen[-1])]
        for s in starts.tolist():
            length = 0
            while i + length < out.shape[0] and s + length < seen.shape[0] and seen[s + length] == out[i + length]:
                length += 1
            best[i] = max(best[i], length)
    return best


def covered(best: np.ndarray, min_len: int) -> np.ndarray:
    """Output positions inside some copied span of at least ``min_len`` tokens."""
    mask = np.zeros(best.shape[0], bool)
    for i, length in enumerate(best.tolist()):
        if length >= min_len:
            mask[i : i + length] = True
    return mask


def oracle_steps(best: np.ndarray) -> int:
    """Verification forwards after the prefill when each step accepts the longest copy + 1."""
    i, steps = 1, 0  # the prefill gives the first token
    while i < best.shape[0]:
        i += best[i] + 1
        steps += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outputs", help="outputs.jsonl written by retrospec bench")
    parser.add_argument("--tokenizer", help="tokenize passages with this model's tokenizer (default: prompt only)")
    args = parser.parse_args()
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        from retrospec.models import resolve

        tokenizer = AutoTokenizer.from_pretrained(resolve(args.tokenizer))
    tokens, steps, anchored, copied = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(int)
    for line in Path(args.outputs).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        for prompt, out in zip(rec["prompt_ids"], rec["outputs"]):
            texts = [np.asarray(prompt, np.int64)]
            if tokenizer is not None and rec.get("passages"):
                texts += [np.asarray(tokenizer(p, add_special_tokens=False)["input_ids"], np.int64) for p in rec["passages"]]
            out = np.asarray(out, np.int64)
            if out.shape[0] < 2:
                continue
            text = np.concatenate(texts)
            best = longest_copies(text, out)
            free_steps, anchored_steps = oracle_steps(best), oracle_steps(longest_copies(text, out, anchored=True))
            in_spans = int(covered(best, 4).sum())
            for key in (rec["category"], "overall"):
                tokens[key] += out.shape[0]
                steps[key] += free_steps
                anchored[key] += anchored_steps
                copied[key] += in_spans
    print("| set | oracle copy MAT | anchored oracle MAT | output tokens | in copied spans of >= 4 |")
    print("|---|---:|---:|---:|---:|")
    for key in sorted(tokens, key=lambda k: (k == "overall", k)):
        print(
            f"| {key} | {tokens[key] / max(steps[key], 1):.2f} | {tokens[key] / max(anchored[key], 1):.2f} "
            f"| {tokens[key]} | {copied[key] / tokens[key]:.0%} |"
        )


if __name__ == "__main__":
    main()
