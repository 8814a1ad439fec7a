"""``retrospec bench --batch-size B1,B2,...``: throughput per batch size, side by side.

The first turn of every prompt, in chunks of ``B``: every method generates the same chunk
before the next chunk starts (interleaved, so a noisy neighbour slows all alike), after a
warm-up at that batch size that meets every fixed shape of the run. Methods:

* ``greedy``: plain batched ``generate()`` (eager, dynamic cache);
* ``greedy-static``: plain batched ``generate()`` over a ``StaticCache`` (compiled by
  transformers on GPUs), one cache per batch size;
* ``generate-batch``: transformers' continuous batching (``generate_batch``) over all
  prompts at once, at most ``B`` requests per batch, where this transformers has it;
* ``retrospec`` (or sources joined by ``+``): ``retrospec.generate`` on the same chunks;
* ``cb-<method>``: a retrospec method over all prompts at once with ``batch_size=B``
  (finished rows refilled from the rest, as ``generate_batch`` does).

Reported per batch size and method: tokens/s, the speedup over each plain method, the
seconds spent in prefill forwards and the decoding tokens/s after them (``generate-batch``
interleaves its prefills with decoding: 0 s there), MAT
(tokens per row per step), the mean tree size, the batch forwards and the rows live in
each (a batch runs until its slowest row is done), how many outputs equal the reference's
(``greedy`` at the same batch size, else ``greedy-static``) and, with ``--profile``,
median and mean host and device milliseconds per step (from one more run of the first chunk with
the device synchronised around each forward; the timed runs are not profiled).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import retrospec
from retrospec.compat import pad_token_id
from retrospec.tools.prompts import load_prompts, render

log = logging.getLogger(__name__)

PLAIN = ("greedy", "greedy-static", "generate-batch")


@dataclass
class Cell:
    """One method at one batch size."""

    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    forwards: int = 0
    drafted: int = 0
    prefill: float = 0.0
    """Seconds until each chunk's first tokens (the prompts' prefill forwards)."""
    identical: int = 0
    n: int = 0
    host_ms: list[float] = field(default_factory=list)
    device_ms: list[float] = field(default_factory=list)
    error: str = ""

    def row(self) -> dict:
        out = {
            "tok_s": round(self.tokens / self.seconds, 2) if self.seconds else 0.0,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "prefill_s": round(self.prefill, 3),
            # after the prefill: tokens but each prompt's first, per second of decoding
            "decode_tok_s": round((self.tokens - self.n) / (self.seconds - self.prefill), 2) if self.seconds > self.prefill else 0.0,
            "mat": round(self.tokens / self.steps, 3) if self.steps else 1.0,
            "mean_tree": round(self.drafted / self.steps, 2) if self.steps else 0.0,
            # batch forwards after the prefill and the rows live in each: a batch runs until
            # its slowest row is done, and on a GPU a forward costs about the same for any rows
            "forwards": self.forwards,
            "live_rows": round(self.steps / self.forwards, 2) if self.forwards else 0.0,
            "identical": self.identical,
            "n": self.n,
        }
        if self.host_ms:
            # the median step is one of the tail's, with few rows live; the mean weighs the
            # full batch's steps as much as they cost
            out["host_ms"] = round(float(np.median(self.host_ms)), 3)
            out["device_ms"] = round(float(np.median(self.device_ms)), 3)
            out["host_ms_mean"] = round(float(np.mean(self.host_ms)), 3)
            out["device_ms_mean"] = round(float(np.mean(self.device_ms)), 3)
        if self.error:
            out["error"] = self.error
        return out


def _pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class BatchMethod:
    """Generates a chunk of prompts; returns each prompt's new tokens and the stats."""

    whole = False
    """Runs over all prompts at once (continuous batching) instead of chunk by chunk."""
    prefill = 0.0
    """Seconds the last ``generate`` spent on prefill forwards (plain methods; retrospec's
    stats carry their own)."""

    def __init__(self, name: str, model, tokenizer, max_new_tokens: int):
        self.name, self.model, self.tokenizer, self.max_new = name, model, tokenizer, max_new_tokens
        self.pad = pad_token_id(tokenizer)

    def generate(self, prompts: list[list[int]], batch: int):
        raise NotImplementedError


class Plain(BatchMethod):
    def __init__(self, *args, static: bool = False):
        super().__init__(*args)
        self.static = static
        self.caches: dict[int, object] = {}
        self.cache_len: int | None = None

    def generate(self, prompts, batch):
        ids, mask = _pad(prompts, self.pad, self.model.device)
        kwargs = {}
        if self.static:
            from transformers import StaticCache

            from retrospec.compat import cache_kwarg

            # one cache per batch size (and length): a new shape would recompile
            length = self.cache_len or 1 << max(int(ids.shape[1] + self.max_new).bit_length(), 10)
            cache = self.caches.get((len(prompts), length))
            if cache is None:
                cache = self.caches[(len(prompts), length)] = StaticCache(config=self.model.config, max_cache_len=length)
            cache.reset()
            kwargs = {cache_kwarg(self.model): cache}
        from retrospec.tools.bench import ForwardCounter

        start = time.perf_counter()
        with ForwardCounter(self.model) as counter:
            out = self.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=self.max_new, pad_token_id=self.pad,
                                      **kwargs)
        self.prefill = (counter.first_end or start) - start
        return [_trim(out[b, ids.shape[1] :].tolist(), self.tokenizer, self.pad) for b in range(len(prompts))], None


def _trim(tokens: list[int], tokenizer, pad: int) -> list[int]:
    """A plain batched row without the padding after its EOS (EOS kept)."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens


class GenerateBatch(BatchMethod):
    """transformers' ``generate_batch`` (continuous batching), at most ``batch`` requests at once."""

    whole = True

    def generate(self, prompts, batch):
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=self.max_new, do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
                                  pad_token_id=self.pad)
        kwargs = {}
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            kwargs["continuous_batching_config"] = ContinuousBatchingConfig(max_requests_per_batch=batch)
        except (ImportError, TypeError):
            pass
        results = self.model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False, **kwargs)
        outs = list(results.values())
        if len(outs) != len(prompts):
            raise RuntimeError(f"generate_batch returned {len(outs)} results for {len(prompts)} prompts")
        return [list(o.generated_tokens) for o in outs], None


class Spec(BatchMethod):
    def __init__(self, *args, speculator, verifier, whole: bool = False):
        super().__init__(*args)
        self.speculator, self.verifier, self.whole = speculator, verifier, whole

    def generate(self, prompts, batch, verifier=None):
        """``verifier``: this call's ``VerifierConfig`` (default: the method's own)."""
        verifier = verifier or self.verifier
        if self.whole:
            outs, stats = retrospec.generate_many(self.model, prompts, speculator=self.speculator, batch_size=batch, verifier=verifier,
                                                  progress=False, do_sample=False, max_new_tokens=self.max_new, pad_token_id=self.pad)
            return outs, stats
        ids, mask = _pad(prompts, self.pad, self.model.device)
        out = retrospec.generate(self.model, ids, attention_mask=mask, speculator=self.speculator, verifier=verifier,
                                 do_sample=False, max_new_tokens=self.max_new, pad_token_id=self.pad)
        width = ids.shape[1]
        return [out.sequences[b, width : width + out.lengths[b]].tolist() for b in range(len(prompts))], out.stats


def build(name: str, model, tokenizer, options) -> BatchMethod:
    from retrospec.tools.bench import build_method

    args = (name, model, tokenizer, options.max_new_tokens)
    if name == "greedy":
        return Plain(*args)
    if name == "greedy-static":
        return Plain(*args, static=True)
    if name == "generate-batch":
        return GenerateBatch(*args)
    whole = name.startswith("cb-")
    method = build_method(name[3:] if whole else name, model, tokenizer, options)
    if not hasattr(method, "speculator"):
        raise ValueError(f"method {name!r} does not run batches (transformers' assisted decoding takes batch size 1)")
    return Spec(*args, speculator=method.speculator, verifier=method.verifier, whole=whole)


def fresh_speculator(method: Spec, model, tokenizer, options) -> Spec:
    """``method`` with a new speculator (new sources, nothing learnt), the same verifier."""
    new = build(method.name, model, tokenizer, options)
    new.verifier = method.verifier
    return new


def run_batch_bench(options, model, tokenizer) -> dict:
    """Every method at every batch size of ``options.batch_sizes``; writes ``batch.json``,
    ``batch.md`` and ``batch.png`` under ``options.out`` and returns the document."""
    from retrospec.datastores.files import check_out_folder
    from retrospec.tools.bench import OUTPUTS

    check_out_folder(Path(options.out), OUTPUTS)  # before the run, not after
    records = load_prompts(options.data, options.per_category, list(options.categories) or None)[: options.limit]
    prompts = [render(tokenizer, [{"role": "user", "content": r.turns[0]}], raw=r.raw)[0].tolist() for r in records]
    methods = [build(name, model, tokenizer, options) for name in options.methods]
    # one cache length for the whole run: one compiled step per shape, not one per prompt length
    from retrospec.verify.verifiers import cache_bucket

    capacity = cache_bucket(max(len(p) for p in prompts) + options.max_new_tokens + options.slots + 2)
    for m in methods:
        if isinstance(m, Spec):  # timed unprofiled: profiling syncs the device and stops the overlap
            m.verifier = replace(m.verifier, capacity=capacity, profile=False)
        elif isinstance(m, Plain):
            m.cache_len = capacity
    reference = next((m.name for m in methods if m.name in ("greedy", "greedy-static")), None)
    doc = {"model": options.model, "dtype": options.dtype, "prompts": len(prompts), "max_new_tokens": options.max_new_tokens,
           "reference": reference, "batch_sizes": {}}
    profile = options.profile
    for batch in options.batch_sizes:
        cells = {m.name: Cell() for m in methods}
        chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        # warm-up: the chunk with the longest prompt, full length (every fixed shape this
        # batch size meets: compiled steps, captured graphs, static caches, step costs)
        longest = max(chunks, key=lambda c: max(len(p) for p in c))
        for m in methods:
            try:
                m.generate(longest if not m.whole else prompts[: 2 * batch], batch)
            except Exception as err:
                cells[m.name].error = f"{type(err).__name__}: {err}"[:200]
                log.warning("bench: %s at batch %d: %s", m.name, batch, cells[m.name].error)
        # ...and time a speculator that has seen none of these prompts (the warm-up and the
        # last batch size ran them: Token Recycling, history and the calibration would have
        # learnt their answers)
        methods = [fresh_speculator(m, model, tokenizer, options) if isinstance(m, Spec) else m for m in methods]
        outputs: dict[str, list[list[int]]] = {m.name: [] for m in methods}
        for m in methods:  # continuous batching runs over every prompt in one go
            if m.whole and not cells[m.name].error:
                _timed(m, prompts, batch, cells[m.name], outputs[m.name])
        for chunk in chunks:
            for m in methods:
                if not m.whole and not cells[m.name].error:
                    _timed(m, chunk, batch, cells[m.name], outputs[m.name])
        if profile:  # host and device time per step: one more, profiled run of the first chunk, not timed
            for m in methods:
                if isinstance(m, Spec) and not cells[m.name].error:
                    _profiled(m, chunks[0], batch, cells[m.name])
        ref = outputs.get(reference) or []
        for m in methods:
            cell = cells[m.name]
            cell.n = len(prompts)
            cell.identical = sum(a == b for a, b in zip(outputs[m.name], ref)) if ref else 0
        doc["batch_sizes"][str(batch)] = {name: cell.row() for name, cell in cells.items()}
        log.info("bench: batch %d: %s", batch, ", ".join(f"{n} {c.row()['tok_s']:.0f} tok/s" for n, c in cells.items()))
        write_batch_outputs(doc, options, model)  # after every batch size: a run cut short keeps what it measured
    return doc


def _timed(method: BatchMethod, prompts, batch: int, cell: Cell, outputs: list) -> None:
    cuda = method.model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs, stats = method.generate(prompts, batch)
    if cuda:
        torch.cuda.synchronize()
    cell.seconds += time.perf_counter() - start
    cell.tokens += sum(len(o) for o in outs)
    outputs.extend(outs)
    if stats is None:  # a plain method: timed by its own first forward
        cell.prefill += method.prefill
    else:
        cell.prefill += stats.seconds.get("prefill", 0.0)
        cell.steps += stats.steps
        cell.forwards += stats.forwards
        cell.drafted += stats.drafted_nodes


def _profiled(method: Spec, prompts, batch: int, cell: Cell) -> None:
    """Per-step host and device milliseconds of one profiled run (the device synchronised
    around each forward, the sources' updates not overlapped with it) into ``cell``."""
    _, stats = method.generate(prompts, batch, verifier=replace(method.verifier, profile=True))
    cell.host_ms += [1e3 * (t - d) for t, d in zip(stats.step_seconds, stats.step_device_seconds)]
    cell.device_ms += [1e3 * d for d in stats.step_device_seconds]


def write_batch_outputs(doc: dict, options, model) -> None:
    from retrospec.datastores.files import write_atomic

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "batch.json", json.dumps(doc, indent=1).encode())
    write_atomic(out / "batch.md", batch_markdown(doc, options, model).encode())
    plot_batch(doc, out / "batch.png")
    log.info("bench: wrote %s/batch.md", out)


_PIPELINE = {None: "auto (two halves on GPUs from 16 rows)", True: "on (two halves)", False: "off"}


def batch_markdown(doc: dict, options, model) -> str:
    device = next(model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    methods = list(next(iter(doc["batch_sizes"].values())))
    plain = [m for m in methods if m in PLAIN]
    lines = [
        f"# retrospec bench by batch size: {doc['model']} ({doc['dtype']})",
        "",
        f"- command: `{options.command or 'retrospec bench'}`",
        f"- {doc['prompts']} prompts (first turns of `{options.data}`), max {doc['max_new_tokens']} new tokens, device {device} ({name}), "
        f"torch {torch.__version__}",
        f"- identical = outputs equal to `{doc['reference']}`'s at the same batch size; MAT = tokens per row per step",
        f"- pipeline {_PIPELINE[getattr(options, 'pipeline', None)]}; host and device ms come from a profiled run, "
        "which is never pipelined (its device is synchronised around each forward)",
        "",
        "| batch | method | tok/s | "
        + " | ".join(f"vs {p}" for p in plain)
        + " | decode tok/s | prefill s | MAT | mean tree | forwards | live rows | identical"
        + " | host ms/step (median / mean) | device ms/step (median / mean) |",
        "|---:|---|---:|" + "---:|" * len(plain) + "---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, rows in doc["batch_sizes"].items():
        for method, row in rows.items():
            if row.get("error"):
                lines.append(f"| {batch} | {method} | n/a ({row['error'][:60]}) |" + " |" * (len(plain) + 9))
                continue
            ratios = []
            for p in plain:
                base = rows.get(p, {}).get("tok_s", 0.0)
                ratios.append(f"{row['tok_s'] / base:.2f}×" if base else "")
            lines.append(f"| {batch} | {method} | {row['tok_s']:.1f} | " + " | ".join(ratios) +
                         f" | {row.get('decode_tok_s', 0.0):.1f} | {row.get('prefill_s', 0.0):.2f}"
                         f" | {row['mat']:.2f} | {row['mean_tree']:.1f} | {row.get('forwards') or ''} | {row.get('live_rows') or ''}"
                         f" | {row['identical']}/{row['n']} | "
                         f"{_ms(row, 'host')} | {_ms(row, 'device')} |")
    lines.append("")
    return "\n".join(lines)


def _ms(row: dict, part: str) -> str:
    if f"{part}_ms" not in row:
        return ""
    mean = row.get(f"{part}_ms_mean")
    return f"{row[f'{part}_ms']}" + (f" / {mean}" if mean is not None else "")


def plot_batch(doc: dict, path: Path) -> None:
    """tok/s against batch size, one line per method (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(b) for b in doc["batch_sizes"]]
    methods = list(next(iter(doc["batch_sizes"].values())))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        ys = [doc["batch_sizes"][str(b)][method].get("tok_s") or np.nan for b in sizes]
        ax.plot(sizes, ys, marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{doc['model']} ({doc['dtype']}), {doc['prompts']} prompts")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
