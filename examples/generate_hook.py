"""retrospec through transformers' own generate(): the custom_generate seam, with streaming.

    python examples/generate_hook.py --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import TextStreamer

import retrospec

PROMPT = """Here is a function:

def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)

Rewrite it so that it returns 0.0 for an empty list, and add a docstring. Show the whole function."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    model, tokenizer = retrospec.load_model(args.model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.max_new_tokens,
                  pad_token_id=tokenizer.eos_token_id)
    # one Speculator, reused across requests: it keeps what it learns (calibration, recycling)
    speculator = retrospec.Speculator([retrospec.ContextSource()], budget="auto")

    start = time.perf_counter()
    plain = model.generate(ids, **kwargs)
    plain_s = time.perf_counter() - start

    start = time.perf_counter()
    fast = model.generate(ids, custom_generate=retrospec.custom_generate, speculator=speculator,
                          retrospec_streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **kwargs)
    fast_s = time.perf_counter() - start

    stats = speculator.last_stats
    n = fast.shape[1] - ids.shape[1]
    print(f"\nidentical to plain generate(): {torch.equal(plain, fast)}; {n} tokens, MAT {stats.mean_accepted:.2f}, "
          f"speedup {plain_s / fast_s:.2f}x")
    return 0 if torch.equal(plain, fast) else 1


if __name__ == "__main__":
    raise SystemExit(main())
