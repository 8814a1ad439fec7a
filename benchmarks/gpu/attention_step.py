"""One verification forward with transformers' sdpa against ``retrospec_sdpa``.

    python benchmarks/gpu/attention_step.py --config ~/.cache/retrospec/models/smollm2-135m/config.json \
        --device cuda --dtype bfloat16 --batch 16 64 --queries 1 9 33 --cache 1024

A randomly initialised model of the config's shape (the cost does not depend on the weights),
``B`` rows behind ``--cache`` cached tokens, ``N`` new tokens a row under a float additive
tree mask: median of ``--repeats`` synchronised forwards (eager, no CUDA graph), and whether
the two attentions give the same logits. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from retrospec.compat import cache_kwarg
from retrospec.verify.attention import NAME


def forward_ms(model, cache, batch: int, context: int, queries: int, repeats: int) -> tuple[float, torch.Tensor]:
    device, dtype = model.device, model.dtype
    ids = torch.randint(0, model.config.vocab_size, (batch, queries), device=device)
    pos = torch.arange(context, context + queries, device=device)[None].expand(batch, queries)
    mask = torch.zeros(batch, 1, queries, context + queries, dtype=dtype, device=device)
    mask[..., context:] = torch.full((queries, queries), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    times, logits = [], None
    for _ in range(repeats + 2):  # two warm-ups
        step = DynamicCache()
        for i, layer in enumerate(cache.layers):
            step.update(layer.keys.clone(), layer.values.clone(), i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kwarg(model): step}).logits
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])
    return times[len(times) // 2] * 1e3, logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a model's config.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--queries", type=int, nargs="+", default=[1, 9, 33])
    p.add_argument("--cache", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    print(f"{type(model).__name__}, {config.num_attention_heads} query heads on {config.num_key_value_heads} key-value heads, "
          f"{args.dtype} on {args.device}, {args.cache} cached tokens\n")
    print("| B | N | sdpa ms | retrospec_sdpa ms | ratio | same logits |")
    print("|---:|---:|---:|---:|---:|---|")
    for batch in args.batch:
        ids = torch.randint(0, config.vocab_size, (batch, args.cache), device=args.device)
        with torch.no_grad():
            cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
        for queries in args.queries:
            out = {}
            for impl in ("sdpa", NAME):
                model.set_attn_implementation(impl)
                torch.manual_seed(1)
                out[impl] = forward_ms(model, cache, batch, args.cache, queries, args.repeats)
            model.set_attn_implementation("sdpa")
            (a, la), (b, lb) = out["sdpa"], out[NAME]
            print(f"| {batch} | {queries} | {a:.2f} | {b:.2f} | {b / a:.2f} | {torch.equal(la, lb)} |", flush=True)
        del cache


if __name__ == "__main__":
    main()
