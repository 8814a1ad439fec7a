"""Our decoding loop against transformers' generate() on one batch of equal prompts: plain
(budget 0), the auto budget and a fixed budget, so that the budget's choices are judged
against our own plain loop as well as transformers'.

    python benchmarks/budget_vs_plain.py

SmolLM2-135M fp32, 4 Spec-Bench prompts cut to their last 40 tokens, 64 new tokens, no EOS
stop (every row runs to the end), two rounds interleaved; prints each run and the best of two.
"""

from __future__ import annotations

import time

import torch

import retrospec
from retrospec.compat import pad_token_id
from retrospec.sources.registry import Datastores, default_sources
from retrospec.tools.prompts import load_prompts, render

ROWS, LENGTH, NEW = 4, 40, 64


def main() -> None:
    torch.set_num_threads(2)
    model, tok = retrospec.load_model("smollm2-135m", "float32")
    records = load_prompts("../shared/bench/specbench/question.jsonl", per_category=11)[:64]
    prompts = [render(tok, [{"role": "user", "content": r.turns[0]}])[0].tolist()[-LENGTH:] for r in records]
    ids = torch.tensor([p for p in prompts if len(p) == LENGTH][:ROWS])
    mask, pad = torch.ones_like(ids), pad_token_id(tok)
    common = {"attention_mask": mask, "do_sample": False, "max_new_tokens": NEW, "pad_token_id": pad, "eos_token_id": None}

    def plain():
        return model.generate(ids, **common)

    def ours(budget):
        spec = retrospec.Speculator(default_sources(model, tok, Datastores()), budget=budget)
        return retrospec.generate(model, ids, speculator=spec, **common)

    methods = {"hf": plain, "ours-0": lambda: ours(0), "ours-auto": lambda: ours("auto"), "ours-4": lambda: ours(4)}
    for run in methods.values():  # warm-up: kernels, numba, the step-cost prior
        run()
    best: dict[str, float] = {}
    for _ in range(2):
        for name, run in methods.items():
            start = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - start
            best[name] = min(best.get(name, seconds), seconds)
            if name != "hf":
                st = out.stats
                print(f"{name}: {seconds:.2f} s, {st.forwards} forwards, MAT {st.mean_accepted:.2f}, tree {st.mean_tree_size:.1f}")
    for name, seconds in best.items():
        print(f"{name}: best {seconds:.2f} s = {ROWS * NEW / seconds:.1f} tok/s")


if __name__ == "__main__":
    main()
