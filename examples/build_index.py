"""Build a suffix index from a chat corpus, query it, and draft from it.

    python examples/build_index.py --conversations 2000 --out runs/sharegpt-smollm2

The same as `retrospec index build --tokenizer smollm2-135m --chat-template --input
../shared/bench/datastore/sharegpt_chat_corpus.jsonl.gz --out DIR`, from Python.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import retrospec
from retrospec.datastores.corpus import ReadOptions
from retrospec.datastores.suffix_build import build_index
from retrospec.datastores.suffix_index import SuffixIndex

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "datastore" / "sharegpt_chat_corpus.jsonl.gz"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--conversations", type=int, default=2000, help="how many conversations to index (0: all)")
    parser.add_argument("--out", default="runs/example-index")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    model, tokenizer = retrospec.load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus)
        if args.conversations:  # a slice of the corpus, as its own JSONL file
            corpus = Path(tmp) / "slice.jsonl"
            with gzip.open(args.corpus, "rt", encoding="utf-8") as src, open(corpus, "w", encoding="utf-8") as dst:
                dst.writelines(itertools.islice(src, args.conversations))
        report = build_index([corpus], tokenizer, args.out, read=ReadOptions(chat_template=True))
    print(report.summary())

    index = SuffixIndex.open(args.out, tokenizer=tokenizer)
    context = np.asarray(tokenizer("Sure! Here is an example of how to", add_special_tokens=False).input_ids)
    start = time.perf_counter()
    tree = index.query(context, max_nodes=16)
    print(f"query: {len(tree)} nodes in {(time.perf_counter() - start) * 1e6:.0f} µs; best continuations:")
    for path in tree.paths()[:5]:
        print("   ", repr(tokenizer.decode(path)))

    ids = tokenizer.apply_chat_template([{"role": "user", "content": "How do I read a CSV file in Python?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    speculator = retrospec.Speculator([retrospec.ContextSource(), index], budget="auto")
    out = retrospec.generate(model, ids, speculator=speculator, max_new_tokens=64, do_sample=False,
                             attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.eos_token_id)
    print(f"generate with context + index: MAT {out.stats.mean_accepted:.2f}, accepted by source {out.stats.accepted_by_source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
