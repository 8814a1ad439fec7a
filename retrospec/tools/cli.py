"""The ``retrospec`` command line: models, generate, bench, demo, simulate, index."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

log = logging.getLogger("retrospec")


def _numeric(cell: str) -> bool:
    try:
        float(cell.rstrip("×").split("/")[0])
    except ValueError:
        return False
    return True


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table; numbers right-aligned, floats with two decimals.

    >>> print(format_table(["a", "b"], [["x", 1.5]]))
    a |    b
    --+-----
    x | 1.50
    """
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    numeric = [bool(cells) and all(_numeric(r[i]) or not r[i] for r in cells) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return " | ".join(v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), "-+-".join("-" * w for w in widths), *(line(r) for r in cells)])


# ----------------------------------------------------------------------------- models
def cmd_models(args) -> int:
    from retrospec.models import MODELS, fetch, is_fetched

    if args.action == "list":
        rows = [[s.name, "yes" if is_fetched(s.name) else "no", f"{s.size / 1e6:.0f} MB", s.title] for s in MODELS.values()]
        print(format_table(["name", "fetched", "gguf", "model"], rows))
        return 0
    for name in args.names:
        path = fetch(name)
        print(f"{name}: {path}")
    return 0


# ----------------------------------------------------------------------------- generate
def _stores(args):
    from retrospec.sources.registry import STORE_KEYS, Datastores

    return Datastores(**{key: getattr(args, key, None) for key in STORE_KEYS})


def _verifier(args):
    from retrospec.verify.verifiers import VerifierConfig

    return VerifierConfig(mode=getattr(args, "verify", "auto"), slots=getattr(args, "slots", 64),
                          pipeline=PIPELINE_CHOICES[getattr(args, "pipeline", "auto")])


PIPELINE_CHOICES = {"auto": None, "on": True, "off": False}
PIPELINE_HELP = ("verify the batch as two halves in turn, drafting one while the device verifies the other "
                 "(auto: on GPUs from 16 rows; default: %(default)s)")


def cmd_generate(args) -> int:
    import torch

    import retrospec
    from retrospec.sources.registry import default_sources

    torch.set_num_threads(args.threads)
    given = [x for x in (args.prompt, args.file, args.prompts) if x is not None]
    if len(given) != 1:
        raise SystemExit("give exactly one of --prompt TEXT, --file PATH or --prompts FILE.jsonl")
    model, tokenizer = retrospec.load_model(args.model, args.dtype)
    if args.remeasure:
        from retrospec.verify.step_cost import forget_costs

        forget_costs(model)
    speculator = retrospec.Speculator(
        default_sources(model, tokenizer, _stores(args)),
        budget=args.budget if args.budget == "auto" else int(args.budget),
    )
    code = _generate_list(args, model, tokenizer, speculator) if args.prompts else _generate_one(args, model, tokenizer, speculator)
    if args.recycling:  # keep what Token Recycling learned for the next run
        for source in speculator.sources:
            if isinstance(source, retrospec.TokenRecycling):
                source.save(args.recycling)
    if args.history:  # and the requests the history source saw
        for source in speculator.sources:
            if isinstance(source, retrospec.HistorySource):
                source.save(args.history)
    return code


def _generate_one(args, model, tokenizer, speculator) -> int:
    import torch
    from transformers import TextStreamer

    import retrospec
    from retrospec.compat import pad_token_id
    from retrospec.tools.demo import warm_up
    from retrospec.tools.prompts import render

    text = args.prompt if args.prompt is not None else Path(args.file).read_text(encoding="utf-8")
    ids = render(tokenizer, [{"role": "user", "content": text}], raw=args.raw)
    common = dict(
        attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=pad_token_id(tokenizer)
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
    if args.compare is not False:  # both timed warm, as in the demo (else only the first one run pays the one-off costs)
        warm_up(model, tokenizer, speculator, _verifier(args))
    start = time.perf_counter()
    out = retrospec.generate(model, ids, speculator=speculator, streamer=streamer, verifier=_verifier(args), **common)
    spec_s = time.perf_counter() - start
    new = out.sequences[0, ids.shape[1] :]
    if not args.stream:
        print(tokenizer.decode(new, skip_special_tokens=True))
    stats = out.stats
    n = int(new.shape[0])
    summary = f"\n{n} tokens, MAT {stats.mean_accepted:.2f}, {n / spec_s:.1f} tok/s"
    if args.compare is not False:
        start = time.perf_counter()
        reference = model.generate(ids, **common)
        plain_s = time.perf_counter() - start
        plain_n = reference.shape[1] - ids.shape[1]
        summary += (
            f"; plain greedy {plain_n / plain_s:.1f} tok/s → speedup {(n / spec_s) / (plain_n / plain_s):.2f}×, "
            f"identical: {'yes' if torch.equal(reference, out.sequences) else 'NO'}"
        )
    print(summary)
    if args.json:
        print(json.dumps(stats.as_dict()))
    return 0


def _generate_list(args, model, tokenizer, speculator) -> int:
    """``--prompts FILE``: every record, ``--batch-size`` rows at a time, finished rows
    refilled from the rest (continuous batching); outputs in order to ``--out``."""
    from pathlib import Path

    import torch

    import retrospec
    from retrospec.compat import pad_token_id
    from retrospec.tools.prompts import load_prompts, render

    records = load_prompts(args.prompts)
    prompts = [render(tokenizer, [{"role": "user", "content": r.turns[0]}], raw=r.raw)[0].tolist() for r in records]
    pad = pad_token_id(tokenizer)
    start = time.perf_counter()
    outputs, stats = retrospec.generate_many(model, prompts, speculator=speculator, batch_size=args.batch_size, verifier=_verifier(args),
                                             do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=pad)
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    summary = (f"{len(records)} prompts, {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.1f} tok/s), "
               f"MAT {stats.mean_accepted:.2f}, batch {args.batch_size}")
    if args.compare:  # plain batched greedy on the same prompts, chunk by chunk
        start, same = time.perf_counter(), 0
        for i in range(0, len(prompts), args.batch_size):
            chunk = prompts[i : i + args.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad)
            mask = torch.zeros_like(ids)
            for b, p in enumerate(chunk):
                ids[b, width - len(p) :], mask[b, width - len(p) :] = torch.tensor(p), 1
            ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=pad)
            for b, out in enumerate(outputs[i : i + args.batch_size]):
                same += ref[b, width : width + len(out)].tolist() == out
        plain_s = time.perf_counter() - start
        summary += f"; plain batched greedy {tokens / plain_s:.1f} tok/s → {plain_s / seconds:.2f}×, identical {same}/{len(outputs)}"
    if args.out:
        from retrospec.datastores.files import write_atomic

        lines = [
            json.dumps({"id": r.id, "output": tokenizer.decode(o, skip_special_tokens=True), "tokens": o}) for r, o in zip(records, outputs)
        ]
        write_atomic(Path(args.out), ("\n".join(lines) + "\n").encode())
        summary += f"; outputs: {args.out}"
    print(summary)
    if args.json:
        print(json.dumps(stats.as_dict()))
    return 0


# ----------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from retrospec.extras import require
    from retrospec.tools.bench import BenchOptions, run_bench

    require("plots", "retrospec bench (it draws speedup.png)")  # before the run, not after it

    options = BenchOptions(
        model=args.model,
        data=args.data,
        per_category=args.per_category,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        out=args.out,
        budget=args.budget,
        threads=args.threads,
        device=args.device,
        index=args.index,
        drafter=args.drafter,
        documents=args.documents,
        recycling=args.recycling,
        history=args.history,
        categories=tuple(c for c in (args.categories or "").split(",") if c),
        warmup=args.warmup,
        verify=args.verify,
        profile=args.profile,
        slots=args.slots,
        pipeline=PIPELINE_CHOICES[args.pipeline],
        remeasure=args.remeasure,
        limit=args.limit,
        batch_sizes=tuple(int(b) for b in (args.batch_size or "").split(",") if b),
        command="retrospec " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    if options.batch_sizes:
        return _bench_batches(options)
    result = run_bench(options)
    doc = result.to_json()
    rows = [
        [
            name,
            m["overall"]["mat"],
            m["overall"]["tok_s"],
            f"{m['overall']['speedup']:.2f}×",
            f"{m['overall']['identical']}/{m['overall']['n']}",
        ]
        for name, m in doc["methods"].items()
    ]
    print(format_table(["method", "MAT", "tok/s", "speedup", "identical"], rows))
    print(f"\nreport: {options.out}/report.md")
    return 0


def _bench_batches(options) -> int:
    import torch

    import retrospec
    from retrospec.tools.batch_bench import run_batch_bench

    if not any(m in ("greedy", "greedy-static") for m in options.methods):
        raise ValueError("batch sizes need a plain reference method: greedy or greedy-static")
    torch.set_num_threads(options.threads)
    model, tokenizer = retrospec.load_model(options.model, options.dtype, device=options.device)
    doc = run_batch_bench(options, model, tokenizer)
    rows = [
        [batch, name, row.get("tok_s", 0.0), row.get("mat", 0.0), row.get("mean_tree", 0.0), f"{row.get('identical', 0)}/{row.get('n', 0)}"]
        for batch, cells in doc["batch_sizes"].items()
        for name, row in cells.items()
    ]
    print(format_table(["batch", "method", "tok/s", "MAT", "mean tree", "identical"], rows))
    print(f"\nreport: {options.out}/batch.md")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from retrospec.tools.demo import run_demo

    rows = run_demo(args.model, args.dtype, args.max_new_tokens, args.threads, args.budget if args.budget == "auto" else int(args.budget),
                    remeasure=args.remeasure)
    for row in rows:
        print(f"\n=== {row.kind} ===\n{row.text.strip()}")
    print()
    table = [[r.kind, r.tokens, r.mat, r.tree, r.plain_tok_s, r.spec_tok_s, f"{r.speedup:.2f}×", "yes" if r.identical else "NO"]
             for r in rows]
    tokens = sum(r.tokens for r in rows)
    plain_s = sum(r.tokens / r.plain_tok_s for r in rows if r.plain_tok_s)
    spec_s = sum(r.tokens / r.spec_tok_s for r in rows if r.spec_tok_s)
    table.append(
        [
            "all",
            tokens,
            "",
            "",
            tokens / plain_s,
            tokens / spec_s,
            f"{plain_s / spec_s:.2f}×",
            "yes" if all(r.identical for r in rows) else "NO",
        ]
    )
    print(format_table(["prompt", "tokens", "MAT", "mean tree", "plain tok/s", "retrospec tok/s", "speedup", "identical"], table))
    return 0 if all(r.identical for r in rows) else 1


# ----------------------------------------------------------------------------- simulate
def cmd_simulate(args) -> int:
    import retrospec
    from retrospec.sources.registry import make_source
    from retrospec.tools.bench import arrival_quarters
    from retrospec.tools.simulate import simulate

    sources = {}
    for name in (m.strip() for m in args.methods.split(",") if m.strip()):
        if name in ("arctic", "arctic-local"):  # the optional peer (retrospec.tools.arctic)
            from retrospec.tools.arctic import ArcticSource

            sources[name] = [ArcticSource(args.budget, max_cached_requests=-1 if name == "arctic" else 0)]
        else:
            sources[name] = [make_source(part, None, None) for part in name.split("+")]
    if args.index:
        from retrospec.datastores.suffix_index import SuffixIndex

        index = SuffixIndex.open(args.index)
        sources["suffix-index"] = [index]
        sources["context+suffix-index"] = [retrospec.ContextSource(), index]
    rows = []
    for name, srcs in sources.items():
        result = simulate(args.outputs, retrospec.Speculator(srcs, budget=args.budget))
        quarters = [q["mat"] for q in arrival_quarters([(t, s, 0) for t, s in result.by_record])]
        rows.append([name, round(result.mat, 3)] + [round(v, 2) for v in result.category_mat().values()] + quarters)
        cats = list(result.category_mat())
    print(format_table(["sources", "MAT", *cats, "Q1", "Q2", "Q3", "Q4"], rows))
    return 0


# ----------------------------------------------------------------------------- parser
def _add_model_args(p, dtype="float32") -> None:
    from retrospec.models import DEFAULT_MODEL

    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="short name (see `retrospec models list`), local directory or hub id (default: %(default)s)"
    )
    p.add_argument("--dtype", default=dtype, help="float32, bfloat16 or float16 (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--budget", default="auto", help="draft nodes verified per step: an integer or 'auto' (default: %(default)s)")
    p.add_argument("--remeasure", action="store_true", help="measure this machine's step cost again instead of reading the cached one")


def _add_store_args(p, keys=None) -> None:
    """One flag per datastore a registered source reads (retrospec.sources.registry)."""
    from retrospec.sources.registry import SOURCES

    seen = set()
    for entry in SOURCES.values():
        if entry.store and entry.store not in seen and (keys is None or entry.store in keys):
            seen.add(entry.store)
            p.add_argument(f"--{entry.store}", help=entry.store_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrospec", description="Lossless speculative decoding for HuggingFace transformers, drafted from retrieval and caches."
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list or fetch the embedded real models")
    msub = p.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="the short names, and whether each is fetched")
    f = msub.add_parser("fetch", help="download, check and convert models into the cache")
    f.add_argument("names", nargs="+", help="short names")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="generate from a prompt with retrospec and report the speedup")
    _add_model_args(p)
    p.add_argument("--prompt", help="the user message")
    p.add_argument("--file", help="read the user message from a file")
    p.add_argument(
        "--prompts", help='a JSONL file of prompts (Spec-Bench turns, HumanEval prompt, or {"prompt": ...}), decoded --batch-size at a time'
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="rows decoded at once with --prompts; finished rows are refilled (default: %(default)s)"
    )
    p.add_argument("--out", help="with --prompts: write the outputs as JSONL here")
    p.add_argument(
        "--verify",
        default="auto",
        choices=["auto", "dynamic", "static", "graph", "compile"],
        help="the verifier (default: graph on GPUs, dynamic on CPUs)",
    )
    p.add_argument("--pipeline", default="auto", choices=list(PIPELINE_CHOICES), help=PIPELINE_HELP)
    p.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stream", action="store_true", help="print tokens as they are committed")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also run plain greedy and compare speed and output (default: on for one prompt, off for --prompts)")
    _add_store_args(p, {"index", "recycling", "documents", "drafter", "history"})
    p.add_argument("--json", action="store_true", help="print the statistics as JSON too")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="MAT, tok/s, speedup and identity of methods side by side")
    _add_model_args(p)
    p.add_argument(
        "--data",
        default="../shared/bench/specbench/question.jsonl",
        help="JSONL prompts: Spec-Bench (turns) or HumanEval (task_id + prompt) (default: %(default)s)",
    )
    p.add_argument("--per-category", type=int, default=5, help="prompts per category (default: %(default)s)")
    p.add_argument("--categories", help="comma-separated categories to keep (default: all)")
    p.add_argument("--limit", type=int, help="keep only the first N prompts (after --per-category)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--methods",
        default="greedy,pld,retrospec",
        help="comma-separated: greedy, greedy-static, pld, assistant, retrospec, retrospec+history, retrospec-history, "
        "arctic (ArcticInference's suffix decoding with its global cache, optional), arctic-local, or sources joined by '+' "
        "(context, suffix-index, recycling, documents, drafter, history); NAME@N gives a method its own budget (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default="runs/bench",
        help="output directory: absent, or holding only an earlier run's "
        "results.json, outputs.jsonl, report.md, details.json and speedup.png (replaced); anything else is refused (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu")
    _add_store_args(p)
    p.add_argument("--batch-size", help="comma-separated batch sizes: throughput per batch size (the first turn of each prompt), "
                   "plain batched greedy against retrospec with every method in one process")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds before timing (default: %(default)s)")
    p.add_argument("--verify", default="auto", choices=["auto", "dynamic", "static", "graph", "compile"],
                   help="verifier: graph (CUDA graph, the default on GPUs), static, dynamic (the default on CPUs)")
    p.add_argument(
        "--slots",
        type=int,
        default=64,
        help="tree nodes per step of the static/graph/compile verifiers when the budget is auto (default 64)",
    )
    p.add_argument("--pipeline", default="auto", choices=list(PIPELINE_CHOICES), help=PIPELINE_HELP)
    p.add_argument("--profile", action="store_true",
                   help="report per-step host and device time, the device synchronised around each verification "
                        "(with --batch-size, in one more run of the first chunk: the timed runs stay unprofiled)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="plain vs retrospec on bundled prompts, on a real model (the README's first command)")
    _add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="model-free MAT of sources, replaying the greedy outputs that bench saved")
    p.add_argument("outputs", help="outputs.jsonl written by `retrospec bench`")
    p.add_argument("--budget", type=int, default=32, help="nodes per step (default: %(default)s)")
    p.add_argument("--index", help="also simulate with this suffix index")
    p.add_argument("--methods", default="context",
                   help="comma-separated sources joined by '+' that need no model (context, history, ...), or arctic / "
                   "arctic-local (ArcticInference's suffix decoding, optional); each gets one speculator for the whole "
                   "file, replayed in order, with MAT per arrival quarter (default: %(default)s)")
    p.set_defaults(func=cmd_simulate)

    try:
        from retrospec.tools.index_cli import add_index_parser
    except ImportError:
        pass
    else:
        add_index_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    from retrospec.models import FetchError

    try:
        return args.func(args) or 0
    except (ValueError, OSError, FetchError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
