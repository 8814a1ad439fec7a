"""Host time per decoding step against the batch size: what the loop costs besides the forward.

    python benchmarks/host_step.py --batch-sizes 1,16,64 --index runs/idx/sharegpt-smollm2

Runs the real loop on SmolLM2 (profiled: the forward is timed apart, device synchronised),
a fixed tree size so every batch drafts the same trees, and prints per batch size the median
host milliseconds per step, split by phase (draft, accept, commit, update), and per row.
On a GPU the host time must stay below the device time of a step for the batch to pay.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import retrospec
from retrospec.compat import pad_token_id
from retrospec.sources.registry import Datastores, default_sources
from retrospec.tools.prompts import load_prompts, render


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default="../shared/bench/specbench/question.jsonl")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--budget", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--index", help="a suffix index directory (adds the suffix-index source)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verify", default="auto")
    p.add_argument("--clip", type=int, default=0, help="keep only the last N tokens of each prompt (a quicker prefill on a CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = retrospec.load_model(args.model, args.dtype, device=args.device)
    records = load_prompts(args.data, per_category=11)[:64]
    prompts = [render(tok, [{"role": "user", "content": r.turns[0]}])[0].tolist() for r in records]
    if args.clip:
        prompts = [q[-args.clip :] for q in prompts]
    pad = pad_token_id(tok)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        spec = retrospec.Speculator(default_sources(model, tok, Datastores(index=args.index)), budget=args.budget)
        chunk = prompts[:batch]
        width = max(len(q) for q in chunk)
        ids = torch.full((batch, width), pad)
        mask = torch.zeros_like(ids)
        for b, q in enumerate(chunk):
            ids[b, width - len(q) :], mask[b, width - len(q) :] = torch.tensor(q), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        config = retrospec.VerifierConfig(mode=args.verify, profile=True)
        retrospec.generate(model, ids, attention_mask=mask, speculator=spec, verifier=config, do_sample=False,
                           max_new_tokens=4, pad_token_id=pad)  # warm-up: kernels, numba, graphs
        start = time.perf_counter()
        out = retrospec.generate(model, ids, attention_mask=mask, speculator=spec, verifier=config, do_sample=False,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=pad)
        wall = time.perf_counter() - start
        st = out.stats
        total, device = np.asarray(st.step_seconds), np.asarray(st.step_device_seconds)
        host = total - device
        phases = {k: round(1e3 * v / max(st.forwards, 1), 3) for k, v in st.seconds.items() if k not in ("forward", "prefill")}
        row = {"batch": batch, "steps": st.forwards, "MAT": round(st.mean_accepted, 2), "mean_tree": round(st.mean_tree_size, 1),
               "host_ms": round(1e3 * float(np.median(host)), 3), "device_ms": round(1e3 * float(np.median(device)), 3),
               "host_us_per_row": round(1e6 * float(np.median(host)) / batch, 1), "phases_ms": phases, "wall_s": round(wall, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
