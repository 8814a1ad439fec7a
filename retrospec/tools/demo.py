"""``retrospec demo``: plain vs speculative generation on a real model, side by side.

A handful of bundled prompts of different kinds (summarising, answering over given
passages, editing code, chatting) run with plain greedy ``generate()`` and with retrospec;
each row reports tokens, MAT, tok/s both ways, the speedup and whether the outputs are
identical token for token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib import resources

import torch

import retrospec
from retrospec.compat import pad_token_id
from retrospec.models import DEFAULT_MODEL
from retrospec.sources.registry import default_sources
from retrospec.tools.prompts import PromptRecord, load_prompts, render

log = logging.getLogger(__name__)


@dataclass
class DemoRow:
    kind: str
    tokens: int
    mat: float
    tree: float
    """Mean draft nodes verified per step."""
    plain_tok_s: float
    spec_tok_s: float
    identical: bool
    text: str

    @property
    def speedup(self) -> float:
        return self.spec_tok_s / self.plain_tok_s if self.plain_tok_s else 0.0


def demo_prompts() -> list[PromptRecord]:
    """The bundled demo prompts."""
    with resources.as_file(resources.files("retrospec") / "assets" / "demo_prompts.jsonl") as path:
        return load_prompts(path)


def warm_up(model, tokenizer, speculator, verifier=None) -> None:
    """A few tokens of a short unrelated prompt, plain and with ``speculator``: the process's
    first forwards, the drafting kernels' first calls and the one-off step-cost measurement
    of ``budget="auto"`` are paid before anything is timed (by both methods alike)."""
    pad = pad_token_id(tokenizer)
    warm = render(tokenizer, [{"role": "user", "content": "Hello"}])
    common = dict(attention_mask=torch.ones_like(warm), do_sample=False, max_new_tokens=4, pad_token_id=pad)
    model.generate(warm, **common)
    retrospec.generate(model, warm, speculator=speculator, verifier=verifier, **common)


def run_demo(
    model_name: str = DEFAULT_MODEL,
    dtype: str = "float32",
    max_new_tokens: int = 160,
    threads: int = 2,
    budget: str | int = "auto",
    remeasure: bool = False,
) -> list[DemoRow]:
    """Run every bundled prompt plain and with retrospec; return one row per prompt
    (``remeasure``: measure the step cost again instead of reading the cached one)."""
    torch.set_num_threads(threads)
    model, tokenizer = retrospec.load_model(model_name, dtype)
    if remeasure:
        from retrospec.verify.step_cost import forget_costs

        forget_costs(model)
    speculator = retrospec.Speculator(default_sources(model, tokenizer), budget=budget)
    pad = pad_token_id(tokenizer)
    records = demo_prompts()

    def plain(ids):
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)

    def spec(ids, record):
        return retrospec.generate(
            model, ids, speculator=speculator, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=pad, documents=list(record.passages),
        )

    warm_up(model, tokenizer, speculator)

    rows = []
    for record in records:
        ids = render(tokenizer, [{"role": "user", "content": record.turns[0]}], raw=record.raw)
        start = time.perf_counter()
        reference = plain(ids)
        plain_s = time.perf_counter() - start
        start = time.perf_counter()
        out = spec(ids, record)
        spec_s = time.perf_counter() - start
        new = out.sequences[0, ids.shape[1] :]
        n = int(new.shape[0])
        rows.append(
            DemoRow(
                kind=record.category,
                tokens=n,
                mat=out.stats.mean_accepted,
                tree=out.stats.mean_tree_size,
                plain_tok_s=(reference.shape[1] - ids.shape[1]) / plain_s,
                spec_tok_s=n / spec_s,
                identical=torch.equal(reference, out.sequences),
                text=tokenizer.decode(new, skip_special_tokens=True),
            )
        )
        log.info("demo %s: MAT %.2f, %.2fx", record.category, rows[-1].mat, rows[-1].speedup)
    return rows
