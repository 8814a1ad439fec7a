"""Where a batched retrospec run spends its wall time: phases, slow steps, and a cProfile.

    python benchmarks/gpu/profile_batch.py --model /root/models/smollm2-135m --batch 64 --prompts 64 --out $OUT/prof

One process: the bench's ``retrospec`` method over the first ``--prompts`` Spec-Bench
prompts in chunks of ``--batch``, after a warm-up run of the same chunks (every verifier
shape built, compiled and captured). Then three measured runs of the chunks:

1. plain: wall time and the loop's own phase clocks (unsynchronised laps: ``forward``
   includes the wait for the device's result);
2. cProfile: the same, with the Python profiler on (its overhead inflates host work about
   twofold; the shares are what to read), top functions by cumulative and own time;
3. ``torch.profiler`` of the first chunk (CPU and CUDA activity, by operator), when
   ``--trace`` is given.

Writes ``profile.txt`` under ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import time
from dataclasses import replace
from pathlib import Path

import torch

from retrospec.models import load_model
from retrospec.tools.batch_bench import build, fresh_speculator
from retrospec.tools.bench import BenchOptions
from retrospec.tools.prompts import load_prompts, render
from retrospec.verify.verifiers import cache_bucket


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=".device/bench/question.jsonl")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--verify", default="compile")
    p.add_argument("--method", default="retrospec")
    p.add_argument("--device", default="cuda")
    p.add_argument("--trace", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    options = BenchOptions(model=args.model, data=args.data, per_category=None, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                           methods=(args.method,), device=args.device, verify=args.verify, limit=args.prompts)
    records = load_prompts(args.data, None, None)[: args.prompts]
    prompts = [render(tok, [{"role": "user", "content": r.turns[0]}])[0].tolist() for r in records]
    chunks = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    method = build(args.method, model, tok, options)
    capacity = cache_bucket(max(len(q) for q in prompts) + args.max_new_tokens + options.slots + 2)
    method.verifier = replace(method.verifier, capacity=capacity, profile=False)
    report = io.StringIO()

    def say(line: str) -> None:
        print(line, flush=True)
        report.write(line + "\n")

    def run(label: str):
        nonlocal method
        method = fresh_speculator(method, model, tok, options)
        sync()
        start = time.perf_counter()
        phases, forwards, tokens = {}, 0, 0
        for chunk in chunks:
            outs, stats = method.generate(chunk, args.batch)
            sync()
            for k, v in stats.seconds.items():
                phases[k] = phases.get(k, 0.0) + v
            forwards += stats.forwards
            tokens += sum(len(o) for o in outs)
        wall = time.perf_counter() - start
        say(f"## {label}: {wall:.3f} s, {tokens} tokens, {tokens / wall:.0f} tok/s, {forwards} forwards "
            f"({1e3 * (wall - phases.get('prefill', 0.0)) / max(forwards, 1):.2f} ms each after the prefill)")
        say("   phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()) + f"; outside them {wall - sum(phases.values()):.3f}")

    t = time.perf_counter()
    for chunk in chunks:  # warm-up: every shape of the run
        method.generate(chunk, args.batch)
    say(f"warm-up {time.perf_counter() - t:.1f} s")
    run("plain")
    run("plain, again")
    profiler = cProfile.Profile()
    profiler.enable()
    run("cProfile")
    profiler.disable()
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(45)
        say(f"### cProfile by {key}\n" + buf.getvalue())
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        method = fresh_speculator(method, model, tok, options)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])) as prof:
            method.generate(chunks[0], args.batch)
            sync()
        for key in ("cpu_time_total", "self_cpu_time_total"):
            say(f"### torch.profiler, first chunk, by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=30))
    (out / "profile.txt").write_text(report.getvalue())


if __name__ == "__main__":
    main()
