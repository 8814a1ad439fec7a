"""One verification step on the GPU: graph-captured vs compiled + captured, against the
plain compiled static-cache step of transformers, per batch size (median ms).

    python benchmarks/gpu/step_compile.py --model /root/models/smollm2-135m --batch-sizes 64,16 --nodes 0,8

Prints, per batch size and tree size, the captured step's time with and without
``torch.compile`` (one dynamic-shape compile serves them all; the compile time is printed
as it happens), and the time per token of plain greedy ``generate()`` over a
``StaticCache`` (transformers compiles it) at the same batch size.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, StaticCache

from retrospec.verify.step_cost import time_static_steps
from retrospec.verify.verifiers import StaticVerifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch-sizes", default="64,16")
    p.add_argument("--nodes", default="0,8")
    p.add_argument("--capacity", type=int, default=1024)
    args = p.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    nodes = tuple(int(n) for n in args.nodes.split(","))
    windows = {"full_attention": None}
    torch.set_grad_enabled(False)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for compile in (False, True):
            start = time.perf_counter()
            v = StaticVerifier(model, windows, batch, args.capacity, nodes, graph=True, compile=compile, topk=8)
            v.warm()
            built = time.perf_counter() - start
            cost = time_static_steps(v, repeats=20)
            ms = ", ".join(f"{n - 1} nodes {1e3 * s:.2f} ms" for n, s in zip(cost.sizes, cost.seconds))
            print(f"B={batch} {'compiled' if compile else 'graph   '}: {ms}  (built in {built:.0f} s)", flush=True)
        ids = torch.randint(0, 1000, (batch, 200), device="cuda")
        cache = StaticCache(config=model.config, max_cache_len=args.capacity)
        for new in (8, 72):  # the difference: 64 steps, prefill and compile excluded
            cache.reset()
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
            torch.cuda.synchronize()
            if new == 8:
                short = time.perf_counter() - start
                cache.reset()  # once more, compiled now
                torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False,
                               max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
                torch.cuda.synchronize()
                short = time.perf_counter() - start
            else:
                long = time.perf_counter() - start
        print(f"B={batch} greedy-static: {1e3 * (long - short) / 64:.2f} ms per step", flush=True)


if __name__ == "__main__":
    main()
