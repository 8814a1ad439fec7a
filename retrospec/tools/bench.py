"""``retrospec bench``: speed and identity, side by side, on your model and prompts.

Every method runs on the same prompts in the same process, interleaved per prompt (so a
noisy neighbour slows all methods alike), after a warm-up, with torch threads fixed.
Multi-turn records are run turn by turn with each method's own previous answers.

Per method and category it reports MAT (new tokens per target forward after the
prefill — for methods that go through ``model.generate`` the forwards are counted with a
forward hook), tokens per second, the speedup over plain greedy in the same run, and how
many prompts gave output identical to greedy's.
"""

from __future__ import annotations

import itertools
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

import retrospec
from retrospec.buffers import layer_windows
from retrospec.compat import pad_token_id
from retrospec.datastores.files import check_out_folder, write_atomic
from retrospec.drafting.speculator import AUTO, Speculator
from retrospec.tools.arctic import MissingPeer
from retrospec.tools.prompts import PromptRecord, load_prompts, render
from retrospec.verify.step_cost import dynamic_cost
from retrospec.verify.verifiers import VerifierConfig, cache_bucket

log = logging.getLogger(__name__)

REFERENCE = "greedy"


@dataclass
class Run:
    """One generation: its new tokens, target forwards after the prefill, and wall time."""

    tokens: list[int]
    steps: int
    seconds: float
    stats: retrospec.SpecStats | None = None
    prefill_seconds: float = 0.0
    """Wall time until the end of the first target forward (the prompt's prefill)."""


class ForwardCounter:
    """Counts calls of ``model.forward`` (forward pre-hook) and times the end of the first
    one (forward hook): the prefill, the same for every method. Attached only while a
    plain method runs (``with counter:``): a hook on the model would split a compiled
    verification step into frames that every static verifier shares and recompiles."""

    def __init__(self, model):
        self.model = model
        self.calls = 0
        self.first_end: float | None = None
        self._cuda = next(model.parameters()).device.type == "cuda"
        self._handles: list = []

    def __enter__(self) -> ForwardCounter:
        self.first_end = None
        self._handles = [self.model.register_forward_pre_hook(self._hook), self.model.register_forward_hook(self._end)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.compiler.disable  # an int counter traced by torch.compile would force a recompile per call
    def _hook(self, module, args):
        self.calls += 1

    @torch.compiler.disable
    def _end(self, module, args, output):
        if self.first_end is None:
            if self._cuda:
                torch.cuda.synchronize()
            self.first_end = time.perf_counter()


def _new_tokens(sequences: torch.Tensor, prompt_len: int) -> list[int]:
    return sequences[0, prompt_len:].tolist()


class Method:
    """A way of generating; subclasses implement ``_generate``."""

    name: str = ""
    speculates = False
    """A retrospec method (its statistics count its steps), not a plain ``generate``."""

    def __init__(self, name: str, model, tokenizer):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.counter = ForwardCounter(model)

    def run(self, ids: torch.Tensor, record: PromptRecord, max_new_tokens: int) -> Run:
        start = time.perf_counter()
        if self.speculates:  # its own statistics count the steps and time the prefill
            tokens, stats = self._generate(ids, record, max_new_tokens)
            return Run(tokens, stats.steps, time.perf_counter() - start, stats, stats.seconds.get("prefill", 0.0))
        calls = self.counter.calls
        with self.counter:
            tokens, stats = self._generate(ids, record, max_new_tokens)
        seconds = time.perf_counter() - start
        prefill = (self.counter.first_end - start) if self.counter.first_end is not None else 0.0
        forwards = self.counter.calls - calls
        # The prefill forward is not a step. Assisted generation (pld, assistant) has no
        # separate prefill: its first forward also verifies a draft, whose tokens thus come
        # free, which favours those baselines slightly; at least one step when it made tokens.
        steps = stats.steps if stats is not None else max(forwards - 1, 1 if tokens else 0)
        return Run(tokens, steps, seconds, stats, prefill)

    def _generate(self, ids, record, max_new_tokens):
        raise NotImplementedError


class PlainMethod(Method):
    """``model.generate`` with fixed extra arguments (greedy, PLD, static cache...)."""

    def __init__(self, name, model, tokenizer, **kwargs):
        super().__init__(name, model, tokenizer)
        self.kwargs = kwargs

    def _generate(self, ids, record, max_new_tokens):
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id(self.tokenizer), **self.kwargs,
        )
        return _new_tokens(out, ids.shape[1]), None


class SpecMethod(Method):
    """``retrospec.generate`` with one Speculator kept for the whole run (it learns online)."""

    speculates = True

    def __init__(self, name, model, tokenizer, speculator: Speculator, verifier: VerifierConfig, use_documents: bool = False):
        super().__init__(name, model, tokenizer)
        self.speculator, self.verifier = speculator, verifier
        self.use_documents = use_documents

    def _generate(self, ids, record, max_new_tokens):
        out = retrospec.generate(
            self.model, ids, speculator=self.speculator, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(self.tokenizer),
            documents=list(record.passages) if self.use_documents else None, verifier=self.verifier,
        )
        return _new_tokens(out.sequences, ids.shape[1]), out.stats


def forget_learnt(speculator: Speculator) -> None:
    """Sources that learn across requests (history, the Arctic peer) forget what they
    learnt: a benchmark's warm-up replays prompts it then times."""
    for source in speculator.sources:
        if callable(getattr(source, "forget", None)):
            source.forget()


@dataclass
class BenchOptions:
    """What ``retrospec bench`` was asked for (the CLI flags)."""

    model: str = "smollm2-135m"
    data: str = "../shared/bench/specbench/question.jsonl"
    per_category: int | None = 5
    max_new_tokens: int = 128
    dtype: str = "float32"
    methods: tuple[str, ...] = ("greedy", "pld", "retrospec")
    out: str = "runs/bench"
    budget: str = "auto"
    threads: int = 2
    device: str = "cpu"
    index: str | None = None
    drafter: str | None = None
    documents: str | None = None
    recycling: str | None = None
    history: str | None = None
    categories: tuple[str, ...] = ()
    warmup: int = 1
    verify: str = "auto"
    profile: bool = False
    remeasure: bool = False
    """Measure the step cost again instead of reading the cached one."""
    slots: int = 64
    """Tree nodes per step of the static verifiers with ``budget="auto"``."""
    pipeline: bool | None = None
    """``VerifierConfig.pipeline``: batches as two pipelined halves (``None``: on GPUs from 16 rows)."""
    limit: int | None = None
    """Keep only the first this many prompts (after ``per_category``)."""
    batch_sizes: tuple[int, ...] = ()
    """Batch sizes to measure throughput at (see :mod:`retrospec.tools.batch_bench`); empty:
    one prompt at a time, turn by turn."""
    command: str = ""


MethodBuilder = Callable[[str, object, object, BenchOptions], Method]
METHODS: dict[str, MethodBuilder] = {}


def method(name: str):
    """Register a method builder under ``name``."""

    def register(builder: MethodBuilder) -> MethodBuilder:
        METHODS[name] = builder
        return builder

    return register


def _budget(options: BenchOptions):
    return options.budget if options.budget == "auto" else int(options.budget)


@method("greedy")
def _greedy(name, model, tokenizer, options):
    return PlainMethod(name, model, tokenizer)


class StaticGreedy(PlainMethod):
    """Plain greedy ``generate()`` with one fixed-size ``StaticCache`` for every prompt, so
    transformers compiles its decoding step once (a per-prompt cache size would recompile)."""

    def __init__(self, name, model, tokenizer, max_cache_len: int = 4096):
        from transformers import StaticCache

        from retrospec.compat import cache_kwarg

        super().__init__(name, model, tokenizer)
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.cache_name = "cache" if cache_kwarg(model) == "cache" else "past_key_values"

    def _generate(self, ids, record, max_new_tokens):
        self.cache.reset()
        self.kwargs = {self.cache_name: self.cache}
        return super()._generate(ids, record, max_new_tokens)


@method("greedy-static")
def _greedy_static(name, model, tokenizer, options):
    return StaticGreedy(name, model, tokenizer)


@method("assistant")
def _assistant(name, model, tokenizer, options):
    """transformers' own assisted decoding with the draft model (``--drafter``)."""
    if not options.drafter:
        raise ValueError("method 'assistant' needs a draft model (--drafter NAME)")
    dtype = next(model.parameters()).dtype
    assistant, _ = retrospec.load_model(options.drafter, dtype, device=next(model.parameters()).device)
    return PlainMethod(name, model, tokenizer, assistant_model=assistant)


@method("pld")
def _pld(name, model, tokenizer, options):
    return PlainMethod(name, model, tokenizer, prompt_lookup_num_tokens=10)


def _verifier(options: BenchOptions) -> VerifierConfig:
    return VerifierConfig(mode=options.verify, profile=options.profile, slots=options.slots, pipeline=options.pipeline)


def _stores(options: BenchOptions):
    from retrospec.sources.registry import Datastores

    return Datastores(index=options.index, recycling=options.recycling, documents=options.documents, drafter=options.drafter,
                      history=options.history)


@method("retrospec")
def _retrospec(name, model, tokenizer, options):
    from retrospec.sources.registry import default_sources

    sources = default_sources(model, tokenizer, _stores(options))
    return SpecMethod(name, model, tokenizer, Speculator(sources, budget=_budget(options)), _verifier(options), use_documents=True)


@method("retrospec+history")
def _retrospec_history(name, model, tokenizer, options):
    """The default mix with the history source added (if the default lacks it)."""
    return _default_with(name, model, tokenizer, options, history=True)


@method("retrospec-history")
def _retrospec_no_history(name, model, tokenizer, options):
    """The default mix without the history source (if the default has it)."""
    return _default_with(name, model, tokenizer, options, history=False)


def _default_with(name, model, tokenizer, options, history: bool):
    from retrospec.sources.registry import default_sources, make_source

    sources = [s for s in default_sources(model, tokenizer, _stores(options)) if s.name != "history"]
    if history:
        sources.append(make_source("history", model, tokenizer, _stores(options)))
    return SpecMethod(name, model, tokenizer, Speculator(sources, budget=_budget(options)), _verifier(options), use_documents=True)


def _arctic_budget(options: BenchOptions) -> int:
    budget = _budget(options)
    return 16 if budget == AUTO else int(budget)


@method("arctic")
def _arctic(name, model, tokenizer, options):
    """ArcticInference's SuffixDecodingCache with its global cache of earlier responses
    (optional: see :mod:`retrospec.tools.arctic`); ``auto`` means 16 tokens."""
    from retrospec.tools.arctic import ArcticSource

    budget = _arctic_budget(options)
    return SpecMethod(name, model, tokenizer, Speculator([ArcticSource(budget)], budget=budget), _verifier(options))


@method("arctic-local")
def _arctic_local(name, model, tokenizer, options):
    """ArcticInference's suffix decoding of each request's own prompt and output only."""
    from retrospec.tools.arctic import ArcticSource

    budget = _arctic_budget(options)
    return SpecMethod(name, model, tokenizer, Speculator([ArcticSource(budget, max_cached_requests=0)], budget=budget),
                      _verifier(options))


def _sources_method(name, model, tokenizer, options):
    """``a+b+...``: a speculator over the named sources (``recycling`` alone verifies the
    paper's full static tree, as Token Recycling does)."""
    from retrospec.sources.registry import make_source

    names = split_budget(name)[0].split("+")
    sources = [make_source(n, model, tokenizer, _stores(options)) for n in names]
    budget = _budget(options)
    if names == ["recycling"] and budget == "auto":
        budget = len(sources[0].template)
    return SpecMethod(name, model, tokenizer, Speculator(sources, budget=budget), _verifier(options), use_documents="documents" in names)


def split_budget(name: str) -> tuple[str, str | None]:
    """``"retrospec@16"`` -> ``("retrospec", "16")``: a method with its own budget."""
    base, _, budget = name.partition("@")
    if budget and budget != "auto" and not budget.isdigit():
        raise ValueError(f"method {name!r}: the budget after '@' must be an integer or 'auto'")
    return base, budget or None


def check_method(name: str) -> None:
    """``ValueError`` naming the known methods unless ``name`` is one."""
    from retrospec.sources.registry import SOURCE_NAMES

    base, _ = split_budget(name)
    if base not in METHODS and not all(part in SOURCE_NAMES for part in base.split("+")):
        raise ValueError(
            f"unknown method {name!r}; known: {', '.join(METHODS)}, or sources joined by '+' "
            f"({', '.join(SOURCE_NAMES)}), optionally with '@BUDGET'"
        )


def build_method(name: str, model, tokenizer, options: BenchOptions) -> Method:
    check_method(name)
    base, budget = split_budget(name)
    if budget is not None:
        options = replace(options, budget=budget)
    method = METHODS[base](name, model, tokenizer, options) if base in METHODS else _sources_method(name, model, tokenizer, options)
    return method


@dataclass
class Tally:
    new_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    identical: int = 0
    n: int = 0
    prefills: int = 0
    prefill_seconds: float = 0.0

    def add(self, other: Tally) -> None:
        self.new_tokens += other.new_tokens
        self.steps += other.steps
        self.seconds += other.seconds
        self.identical += other.identical
        self.n += other.n
        self.prefills += other.prefills
        self.prefill_seconds += other.prefill_seconds

    def decode_tok_s(self) -> float:
        """Tokens after the first of each turn per second after its prefill."""
        seconds = self.seconds - self.prefill_seconds
        return (self.new_tokens - self.prefills) / seconds if seconds > 0 else 0.0

    def row(self, reference: Tally | None) -> dict:
        tok_s = self.new_tokens / self.seconds if self.seconds else 0.0
        ref_tok_s = (reference.new_tokens / reference.seconds) if reference and reference.seconds else 0.0
        return {
            "mat": round(self.new_tokens / self.steps, 4) if self.steps else 0.0,
            "tok_s": round(tok_s, 3),
            "speedup": round(tok_s / ref_tok_s, 4) if ref_tok_s else 0.0,
            "identical": self.identical,
            "n": self.n,
        }


@dataclass
class BenchResult:
    model: str
    dtype: str
    tallies: dict[str, dict[str, Tally]] = field(default_factory=dict)  # method -> category -> tally
    details: dict[str, dict] = field(default_factory=dict)  # method -> extra (source attribution, timings)
    outputs: list[dict] = field(default_factory=list)
    arrival: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    """method -> (new tokens, steps, identical) per prompt, in the order they ran."""

    def overall(self, method: str) -> Tally:
        total = Tally()
        for tally in self.tallies[method].values():
            total.add(tally)
        return total

    def to_json(self) -> dict:
        """The ``results.json`` document (schema fixed by the bench contract)."""
        methods = {}
        for name, cats in self.tallies.items():
            ref_cats = self.tallies.get(REFERENCE, {})
            methods[name] = {
                "overall": self.overall(name).row(self.overall(REFERENCE) if REFERENCE in self.tallies else None),
                "categories": {cat: tally.row(ref_cats.get(cat)) for cat, tally in cats.items()},
            }
        return {"model": self.model, "dtype": self.dtype, "methods": methods}


def run_bench(options: BenchOptions, model=None, tokenizer=None) -> BenchResult:
    """Run the benchmark and write ``results.json``, ``report.md``, ``speedup.png``,
    ``details.json`` (per-method timings and attribution) and ``outputs.jsonl`` under
    ``options.out``. ``model``/``tokenizer`` may be passed in.

    ``options.out`` may be absent or a folder holding only those files (an earlier run's,
    replaced file by file); anything else there is refused before the run starts."""
    if options.batch_sizes:
        raise ValueError("batch sizes are measured by run_batch_bench (retrospec.tools.batch_bench)")
    if REFERENCE not in options.methods:
        raise ValueError(f"methods must include {REFERENCE!r}: it is the reference for speedup and identity")
    for name in options.methods:
        check_method(name)
    check_out_folder(Path(options.out), OUTPUTS)  # before hours of benchmarking, not after
    torch.set_num_threads(options.threads)
    if model is None:
        model, tokenizer = retrospec.load_model(options.model, options.dtype, device=options.device)
    records = load_prompts(options.data, options.per_category, list(options.categories) or None)[: options.limit]
    methods = []
    for name in options.methods:
        try:
            methods.append(build_method(name, model, tokenizer, options))
        except MissingPeer as err:  # an optional peer (ArcticInference) that is not installed
            log.warning("bench: skipping method %r: %s", name, err)
    # static verifiers (and their graphs) are kept per model, so every shape is captured once
    # per run, not once per method; the dynamic verifier's step cost is measured here, not
    # inside a timed run
    auto = any(isinstance(m, SpecMethod) and m.speculator.budget == AUTO for m in methods)
    if auto and _verifier(options).resolved(model, layer_windows(model.config)) == "dynamic":
        dynamic_cost(model, refresh=options.remeasure).prior(1)
    result = BenchResult(model=options.model, dtype=options.dtype)
    for m in methods:
        result.tallies[m.name] = {}
    log.info("bench: %d prompts x %d methods on %s (%s)", len(records), len(methods), options.model, options.dtype)

    # warm-up: kernels, allocator, compiled graphs and numba kernels, the step-cost profile
    # of budget="auto" — long enough that every code path of a step has run once
    for _ in range(options.warmup):
        ids = render(tokenizer, [{"role": "user", "content": records[0].turns[0]}], raw=records[0].raw).to(model.device)
        for m in methods:
            m.run(ids, records[0], min(48, options.max_new_tokens))
    # sources that learn across requests (history, the Arctic peer) forget the warm-up: it
    # replays the first prompt, which would then be drafted from its own earlier answer
    for m in methods:
        if isinstance(m, SpecMethod) and not options.history:
            forget_learnt(m.speculator)
    # static verifiers hold one cache length per bucket of request sizes, each captured (and
    # compiled) on first use: meet every bucket of the run here, or the first method to need
    # a longer one pays its capture inside its timing
    static = options.verify in ("static", "graph", "compile") or (options.verify == "auto" and model.device.type == "cuda")
    if options.warmup and static:
        for record in _bucket_representatives(records, tokenizer, options.max_new_tokens):
            for m in methods:
                _run_turns(m, record, tokenizer, options.max_new_tokens, model.device)

    for record in tqdm(records, desc="bench", unit="prompt"):
        reference_tokens: list[list[int]] | None = None
        for m in methods:
            tally = Tally(n=1)
            turns = _run_turns(m, record, tokenizer, options.max_new_tokens, model.device)
            for _, run in turns:
                tally.new_tokens += len(run.tokens)
                tally.steps += run.steps
                tally.seconds += run.seconds
                tally.prefills += 1
                tally.prefill_seconds += run.prefill_seconds
                if run.stats is not None:
                    _accumulate_details(result.details.setdefault(m.name, {}), run.stats)
            produced = [run.tokens for _, run in turns]
            prompts = [ids for ids, _ in turns]
            if m.name == REFERENCE:
                reference_tokens = produced
                result.outputs.append(
                    {"id": record.id, "category": record.category, "turns": list(record.turns),
                     "raw": record.raw, "prompt_ids": prompts, "outputs": produced, "passages": list(record.passages)}
                )
            tally.identical = int(produced == reference_tokens)
            result.tallies[m.name].setdefault(record.category, Tally()).add(tally)
            result.arrival.setdefault(m.name, []).append((tally.new_tokens, tally.steps, tally.identical))
    for m in methods:
        total = result.overall(m.name)
        result.details.setdefault(m.name, {})["arrival"] = arrival_quarters(result.arrival.get(m.name, []))
        result.details.setdefault(m.name, {})["decode"] = {
            "prefill_seconds": round(total.prefill_seconds, 3),
            "prefills": total.prefills,
            "tok_s": round(total.decode_tok_s(), 3),
        }
    write_outputs(result, options, model)
    return result


def arrival_quarters(runs: list[tuple[int, int, int]]) -> list[dict]:
    """MAT and identity per quarter of the prompts in arrival order (sources that learn
    across requests warm up as the run goes: the last quarter shows what they learnt).

    >>> [q["mat"] for q in arrival_quarters([(4, 2, 1), (6, 2, 1), (8, 2, 1), (9, 1, 0)])]
    [2.0, 3.0, 4.0, 9.0]
    """
    bounds = np.linspace(0, len(runs), 5).round().astype(int)
    quarters = []
    for lo, hi in itertools.pairwise(bounds.tolist()):
        part = runs[lo:hi]
        tokens, steps = sum(r[0] for r in part), sum(r[1] for r in part)
        quarters.append({"prompts": int(hi - lo), "mat": round(tokens / steps, 4) if steps else 0.0,
                         "identical": sum(r[2] for r in part)})
    return quarters


def _run_turns(m: Method, record: PromptRecord, tokenizer, max_new_tokens: int, device) -> list[tuple[list[int], Run]]:
    """All turns of ``record`` with method ``m``, each reply fed back into the conversation:
    (prompt ids, run) per turn."""
    conversation: list[dict] = []
    turns = []
    for turn in record.turns:
        conversation.append({"role": "user", "content": turn})
        ids = render(tokenizer, conversation, raw=record.raw).to(device)
        run = m.run(ids, record, max_new_tokens)
        turns.append((ids[0].tolist(), run))
        conversation.append({"role": "assistant", "content": tokenizer.decode(run.tokens, skip_special_tokens=True)})
    return turns


def _bucket_representatives(records: list[PromptRecord], tokenizer, max_new_tokens: int) -> list[PromptRecord]:
    """The longest record of each static-cache bucket the run may need (an upper bound of
    each record's longest request: all its turns as one prompt plus every turn's reply)."""
    longest: dict[int, tuple[int, PromptRecord]] = {}
    for record in records:
        prompt = render(tokenizer, [{"role": "user", "content": "\n".join(record.turns)}], raw=record.raw).shape[1]
        size = prompt + max_new_tokens * len(record.turns) + 256  # 256: room for the tree slots
        bucket = cache_bucket(size)
        if size > longest.get(bucket, (-1, None))[0]:
            longest[bucket] = (size, record)
    return [record for _, record in sorted(longest.values(), key=lambda x: x[0])]


def _accumulate_details(details: dict, stats: retrospec.SpecStats) -> None:
    for key, value in stats.accepted_by_source.items():
        details.setdefault("accepted_by_source", {})
        details["accepted_by_source"][key] = details["accepted_by_source"].get(key, 0) + value
    details["accepted_by_several"] = details.get("accepted_by_several", 0) + stats.accepted_by_several
    details["accepted_drafts"] = details.get("accepted_drafts", 0) + stats.accepted_drafts
    details["drafted_nodes"] = details.get("drafted_nodes", 0) + stats.drafted_nodes
    if stats.step_seconds:
        details.setdefault("step_seconds", []).extend(stats.step_seconds)
        details.setdefault("step_device_seconds", []).extend(stats.step_device_seconds)
    details["steps"] = details.get("steps", 0) + stats.steps
    for key, value in stats.seconds.items():
        details.setdefault("seconds", {})
        details["seconds"][key] = details["seconds"].get(key, 0.0) + value


OUTPUTS = ("results.json", "outputs.jsonl", "report.md", "details.json", "speedup.png", "batch.json", "batch.md", "batch.png")
"""What a bench output folder holds (``--out`` holding anything else is refused)."""


def write_outputs(result: BenchResult, options: BenchOptions, model) -> None:
    out = Path(options.out)
    check_out_folder(out, OUTPUTS)
    doc = result.to_json()
    write_atomic(out / "results.json", json.dumps(doc, indent=1).encode())
    write_atomic(out / "outputs.jsonl", "".join(json.dumps(row) + "\n" for row in result.outputs).encode())
    write_atomic(out / "report.md", report_markdown(doc, result, options, model).encode())
    write_atomic(out / "details.json", json.dumps(result.details).encode())
    plot_speedup(doc, out / "speedup.png")
    log.info("bench: wrote %s", out)


def _table(rows: dict[str, dict]) -> list[str]:
    lines = ["| method | MAT | tok/s | speedup | identical |", "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['mat']:.2f} | {row['tok_s']:.2f} | {row['speedup']:.2f}× | {row['identical']}/{row['n']} |")
    return lines


def report_markdown(doc: dict, result: BenchResult, options: BenchOptions, model) -> str:
    device = next(model.parameters()).device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        f"# retrospec bench: {doc['model']} ({doc['dtype']})",
        "",
        f"- command: `{options.command or 'retrospec bench'}`",
        f"- data: `{options.data}`, {options.per_category or 'all'} per category, max {options.max_new_tokens} new tokens",
        f"- device: {device} ({device_name}), torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"transformers {transformers.__version__}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "MAT = new tokens / target forwards after the prefill (for `pld` and `assistant` the first forward, which is",
        "also their first verification, is left out); speedup = tok/s over `greedy` in this run;",
        "identical = prompts whose output equals `greedy`'s token for token.",
        "",
        "## Overall",
        "",
        *_table({name: m["overall"] for name, m in doc["methods"].items()}),
        "",
    ]
    categories = list(next(iter(doc["methods"].values()))["categories"])
    for cat in categories:
        lines += [
            f"## {cat}",
            "",
            *_table({name: m["categories"][cat] for name, m in doc["methods"].items() if cat in m["categories"]}),
            "",
        ]
    ref = result.overall(REFERENCE)
    lines += [
        "## Decode only (prefill excluded)",
        "",
        "Every method reads the same prompt at the same cost, so short generations dilute every",
        "speedup; these columns leave each turn's first forward (and its token) out.",
        "",
        "| method | decode tok/s | decode speedup | prefill s/turn | prefill share |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in result.tallies:
        t = result.overall(name)
        speed = t.decode_tok_s() / ref.decode_tok_s() if ref.decode_tok_s() else 0.0
        lines.append(f"| {name} | {t.decode_tok_s():.2f} | {speed:.2f}× | {t.prefill_seconds / max(t.prefills, 1):.2f} | "
                     f"{t.prefill_seconds / t.seconds if t.seconds else 0.0:.0%} |")
    lines.append("")
    lines += [
        "## Arrival order",
        "",
        "MAT per quarter of the prompts, in the order they ran through each method's one speculator",
        "(sources that learn across requests warm up as the run goes).",
        "",
        "| method | Q1 | Q2 | Q3 | Q4 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, runs in result.arrival.items():
        lines.append(f"| {name} | " + " | ".join(f"{q['mat']:.2f}" for q in arrival_quarters(runs)) + " |")
    lines.append("")
    stepped = {name: d for name, d in result.details.items() if "steps" in d}  # retrospec's own methods
    if stepped:
        lines += [
            "## Where accepted tokens came from",
            "",
            "| method | accepted drafts | by source | by several | mean tree | host ms/step |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for name, d in stepped.items():
            steps = max(d.get("steps", 0), 1)
            host = sum(v for k, v in d.get("seconds", {}).items() if k not in ("forward", "prefill"))
            by_source = ", ".join(f"{k} {v}" for k, v in d.get("accepted_by_source", {}).items())
            lines.append(
                f"| {name} | {d.get('accepted_drafts', 0)} | {by_source} | {d.get('accepted_by_several', 0)} | "
                f"{d.get('drafted_nodes', 0) / steps:.1f} | {1e3 * host / steps:.2f} |"
            )
        lines.append("")
        profiled = {n: d for n, d in result.details.items() if d.get("step_seconds")}
        if profiled:
            lines += [
                "## Step time (profiled: device synchronised after each verification)",
                "",
                "| method | steps | median step ms | median device ms | median host ms | host share |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for name, d in profiled.items():
                total = np.asarray(d["step_seconds"])
                device = np.asarray(d["step_device_seconds"])
                host = total - device
                lines.append(f"| {name} | {total.size} | {1e3 * np.median(total):.2f} | {1e3 * np.median(device):.2f} | "
                             f"{1e3 * np.median(host):.2f} | {np.median(host / total):.0%} |")
            lines.append("")
    return "\n".join(lines)


def plot_speedup(doc: dict, path: Path) -> None:
    """Grouped bars: speedup over greedy per category and overall, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in doc["methods"] if m != REFERENCE]
    categories = list(next(iter(doc["methods"].values()))["categories"]) + ["overall"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(categories)), 4))
    x = np.arange(len(categories))
    for i, name in enumerate(methods):
        rows = doc["methods"][name]
        values = [rows["categories"].get(c, {}).get("speedup", 0.0) for c in categories[:-1]] + [rows["overall"]["speedup"]]
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
        mats = [rows["categories"].get(c, {}).get("mat", 0.0) for c in categories[:-1]] + [rows["overall"]["mat"]]
        for bar, mat in zip(bars, mats):
            ax.annotate(f"{mat:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, categories, rotation=20)
    ax.set_ylabel("speedup over greedy (tok/s ratio)")
    ax.set_title(f"{doc['model']} ({doc['dtype']}) — bar labels: MAT")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, write=lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
