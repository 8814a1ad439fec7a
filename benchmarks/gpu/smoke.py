"""GPU smoke test of the verifiers: every mode, one row and a batch, against plain greedy.

Run on the GPU machine (after setup.sh): ``python3 benchmarks/gpu/smoke.py [MODEL_DIR]``
(``--pipeline MODEL_DIR``: only the pipelined batch of the real model against the serial one).
Prints, per verifier mode and batch size, how many rows equal plain ``generate()`` of that
row alone (fp32), the MAT, and the time per step; and how long building a static verifier
(graph capture, compile) took.
"""

from __future__ import annotations

import sys
import time

import torch

import retrospec
from retrospec.compat import pad_token_id
from retrospec.tools.prompts import load_prompts, render

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # a CPU dry run checks the script itself


def tiny():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(cfg).to(DEVICE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def padded(prompts, pad):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :], mask[b, width - len(p) :] = torch.tensor(p), 1
    return ids.to(DEVICE), mask.to(DEVICE)


def references(model, prompts, pad, max_new) -> list[list[int]]:
    """Plain greedy ``generate()`` of each prompt alone: its new tokens."""
    refs = []
    for p in prompts:
        ids = torch.tensor([p]).to(DEVICE)
        refs.append(
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new, pad_token_id=pad)[
                0, len(p) :
            ].tolist()
        )
    return refs


def check(model, prompts, pad, modes, sources, max_new, budget="auto"):
    refs = references(model, prompts, pad, max_new)
    for mode in modes:
        for batch in (1, len(prompts)):
            spec = retrospec.Speculator(sources(), budget=budget)
            same, tokens, steps, forwards, seconds, build = 0, 0, 0, 0, 0.0, 0.0
            for i in range(0, len(prompts), batch):
                chunk = prompts[i : i + batch]
                ids, mask = padded(chunk, pad)
                sync()
                start = time.perf_counter()
                out = retrospec.generate(model, ids, attention_mask=mask, speculator=spec, verifier=retrospec.VerifierConfig(mode=mode),
                                         do_sample=False, max_new_tokens=max_new, pad_token_id=pad)
                sync()
                took = time.perf_counter() - start
                if i == 0:
                    build = took
                else:
                    seconds += took
                    forwards += out.stats.forwards
                w = ids.shape[1]
                for b in range(len(chunk)):
                    row = out.sequences[b, w : w + out.lengths[b]].tolist()
                    same += row == refs[i + b]
                tokens += out.stats.new_tokens
                steps += out.stats.steps
            per_step = 1e3 * seconds / max(forwards, 1)
            print(f"{mode:8s} B={batch:2d}: identical {same}/{len(prompts)}, MAT {tokens / max(steps, 1):.2f}, "
                  f"{per_step:.2f} ms/step after the first call ({build:.1f} s, builds included)", flush=True)


def pipelined(path: str, rows: int = 16, max_new: int = 64) -> None:
    """fp32, ``rows`` prompts in one batch, graph mode: the two pipelined halves (their
    results waited for by events, not by a device-wide copy) against the serial batch, each
    row against plain ``generate()`` of it alone."""
    model, tok = retrospec.load_model(path, "float32", device=DEVICE)
    pad = pad_token_id(tok)
    records = load_prompts(".device/bench/question.jsonl", per_category=3)[:rows]
    prompts = [render(tok, [{"role": "user", "content": r.turns[0]}])[0].tolist() for r in records]
    refs = references(model, prompts, pad, max_new)
    ids, mask = padded(prompts, pad)
    for pipeline in (True, False, True):  # the first call builds (captures) the verifiers
        spec = retrospec.Speculator([retrospec.ContextSource(), retrospec.TokenRecycling.for_model(model)], budget="auto")
        sync()
        start = time.perf_counter()
        config = retrospec.VerifierConfig(mode="graph" if DEVICE == "cuda" else "static", pipeline=pipeline)
        out = retrospec.generate(model, ids, attention_mask=mask, speculator=spec, do_sample=False, max_new_tokens=max_new,
                                 pad_token_id=pad, verifier=config)
        sync()
        took = time.perf_counter() - start
        w = ids.shape[1]
        same = sum(out.sequences[b, w : w + out.lengths[b]].tolist() == refs[b] for b in range(len(prompts)))
        print(f"pipeline={pipeline}: identical {same}/{len(prompts)}, MAT {out.stats.new_tokens / max(out.stats.steps, 1):.2f}, "
              f"{out.stats.forwards} forwards, {took:.2f} s", flush=True)


def main() -> None:
    if "--pipeline" in sys.argv:
        sys.argv.remove("--pipeline")
        return pipelined(sys.argv[1])
    if "--real-only" in sys.argv:
        sys.argv.remove("--real-only")
        return real(sys.argv[1])
    print("tiny llama fp32")
    model = tiny()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() * 3 for n in (7, 11, 5, 9)]
    modes = ["dynamic", "static", "graph", "compile"] if DEVICE == "cuda" else ["dynamic", "static"]
    check(model, prompts, 0, modes, lambda: [retrospec.ContextSource()], 40, budget=12)
    if len(sys.argv) > 1:
        real(sys.argv[1])


def real(path: str) -> None:
    if True:
        print("real model fp32")
        model, tok = retrospec.load_model(path, "float32", device=DEVICE)
        records = load_prompts(".device/bench/question.jsonl", per_category=1)
        prompts = [render(tok, [{"role": "user", "content": r.turns[0]}])[0].tolist() for r in records]
        check(model, prompts, pad_token_id(tok), ["graph", "compile"] if DEVICE == "cuda" else ["dynamic"],
              lambda: [retrospec.ContextSource(), retrospec.TokenRecycling.for_model(model)], 64)


if __name__ == "__main__":
    main()
