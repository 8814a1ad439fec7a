"""Suffix-index measurements: query latency, and a synthetic large index for scale.

    # query latency of an index (contexts: Spec-Bench prompts cut at random points): a first
    # pass in a fresh process (pages and block checksums first touched), then a second pass
    python benchmarks/index_bench.py latency runs/idx/sharegpt-smollm2 --tokenizer smollm2-135m

    # build a synthetic index of N tokens (the source index's documents repeated in shuffled
    # order), then measure a fresh query process's resident memory and latency
    python benchmarks/index_bench.py scale runs/idx/sharegpt-smollm2 --tokens 500000000 --out runs/idx/synthetic-500m

    # `index verify` on repeated text (one document of the source index repeated up to N tokens:
    # the worst case of a suffix-order check that compares neighbouring suffixes)
    python benchmarks/index_bench.py repetitive runs/idx/sharegpt-smollm2 --tokens 10000000 --out runs/idx/repetitive-10m

    # resident memory of lean query processes (no torch) on an existing index; --no-jit runs
    # them with RETROSPEC_JIT=0 (interpreted kernels, numba never imported)
    python benchmarks/index_bench.py memory runs/idx/synthetic-500m --tokenizer smollm2-135m --release-every 1 8 64

    # distributed builds (benchmarks/cluster-build/README.md): the ShareGPT corpus tokenized by
    # 1 and 2 workers, then a synthetic 1B-token index (its documents repeated in shuffled
    # order) built by 1 and 2 workers on the process pool and on a local Ray instance, then
    # query latency and memory on it; prints markdown tables with the load average of each run
    PYTHONPATH=$PWD python benchmarks/index_bench.py cluster --work /tmp/cluster-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from retrospec.datastores.corpus import Document
from retrospec.datastores.suffix_build import BuildOptions, write_index
from retrospec.datastores.suffix_index import READS, SuffixConfig, SuffixIndex

SHARED = Path(__file__).resolve().parents[2] / "shared"
SPECBENCH = SHARED / "bench" / "specbench" / "question.jsonl"
SHAREGPT = SHARED / "bench" / "datastore" / "sharegpt_chat_corpus.jsonl.gz"
CHATS = SHARED / "bench" / "chat" / "sharegpt_multiturn.jsonl"


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process from /proc (VmRSS = RssAnon + RssFile + RssShmem; VmHWM
    = the highest VmRSS so far, transients inside a query included), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def contexts(tokenizer, n_cuts: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    with open(SPECBENCH, encoding="utf-8") as f:
        for line in f:
            ids = np.asarray(tokenizer(json.loads(line)["turns"][0], add_special_tokens=False).input_ids, np.int64)
            if ids.shape[0] < 4:
                continue
            for cut in rng.integers(2, ids.shape[0] + 1, n_cuts):
                out.append(ids[:cut])
    return out


def measure(index: SuffixIndex, queries: list[np.ndarray], max_nodes: int) -> dict:
    index.query(queries[0], max_nodes)  # compile the numba kernels
    first = []  # the first pass of a fresh process: pages faulted in, blocks checked for the first time
    for q in queries:
        start = time.perf_counter()
        index.query(q, max_nodes)
        first.append(time.perf_counter() - start)
    times, nodes, peak = [], [], 0.0
    for q in queries:
        start = time.perf_counter()
        tree = index.query(q, max_nodes)
        times.append(time.perf_counter() - start)
        nodes.append(len(tree))
        peak = max(peak, rss_mb())
    passes = []  # whole warm passes: the least noisy figure on a shared machine is the best one
    for _ in range(4):
        start = time.perf_counter()
        for q in queries:
            index.query(q, max_nodes)
        passes.append((time.perf_counter() - start) / len(queries))
    t = np.asarray(times) * 1e6
    f = np.asarray(first) * 1e6
    return {
        "queries": len(queries),
        "first_pass_p50_us": round(float(np.percentile(f, 50)), 1),
        "first_pass_p99_us": round(float(np.percentile(f, 99)), 1),
        "first_pass_mean_us": round(float(f.mean()), 1),
        "max_nodes": max_nodes,
        "p50_us": round(float(np.percentile(t, 50)), 1),
        "p99_us": round(float(np.percentile(t, 99)), 1),
        "mean_us": round(float(t.mean()), 1),
        "best_pass_mean_us": round(min(passes) * 1e6, 1),
        "mean_nodes": round(float(np.mean(nodes)), 1),
        "nonempty": round(float(np.mean(np.asarray(nodes) > 0)), 3),
        "rss_mb": round(rss_mb(), 1),
        "peak_rss_mb": round(peak, 1),
        "hwm_mb": round(rss_mb("VmHWM"), 1),
        "rss_anon_mb": round(rss_mb("RssAnon"), 1),
        "rss_file_mb": round(rss_mb("RssFile"), 1),
    }


def cmd_latency(args) -> None:
    from retrospec.tools.index_cli import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    index = SuffixIndex.open(args.index, tokenizer=tokenizer)
    result = measure(index, contexts(tokenizer, args.cuts), args.max_nodes)
    result.update({"index": args.index, "tokens": index.n_tokens, "bytes_per_token": index.describe()["bytes_per_token"]})
    print(json.dumps(result, indent=1))


def cmd_scale(args) -> None:
    source = SuffixIndex.open(args.index)
    # the source's documents, as global token ids
    docs = []
    for shard in source.shards:
        ids = shard.token_ids()
        cuts = np.flatnonzero(ids == shard.sep)
        start = 0
        for cut in cuts.tolist():
            docs.append(shard.vocab[ids[start:cut]].astype(np.int64))
            start = cut + 1
    per_round = sum(d.shape[0] for d in docs)
    rounds = -(-args.tokens // per_round)
    rng = np.random.default_rng(0)

    def token_docs(report):
        produced = 0
        for r in range(rounds):
            for i in rng.permutation(len(docs)):
                if produced >= args.tokens:
                    return
                produced += docs[i].shape[0]
                yield docs[i], Document("", f"synthetic:{r}:{i}", {})

    start = time.perf_counter()
    report = write_index(token_docs, source.manifest["tokenizer"], args.out, BuildOptions(shard_tokens=args.shard_tokens),
                         {"synthetic_from": args.index})
    build_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": report.tokens, "shards": report.shards, "build_seconds": round(build_s, 1),
                      "index_tokens_per_second": round(report.index_tokens_per_second), "bytes_per_token": round(report.bytes_per_token, 3),
                      "build_peak_rss_mb": round(peak_mb)}, indent=1))
    memory(args.out, args.tokenizer, (8, 64))


def cmd_repetitive(args) -> None:
    from retrospec.datastores.suffix_index import verify_index

    source = SuffixIndex.open(args.index)
    shard = source.shards[0]
    ids = shard.token_ids()
    cuts = np.flatnonzero(ids == shard.sep)
    lengths = np.diff(np.concatenate([[-1], cuts])) - 1
    longest = int(np.argmax(lengths))  # the longest document: long repeats
    start = 0 if longest == 0 else int(cuts[longest - 1]) + 1
    doc = shard.vocab[ids[start : int(cuts[longest])]].astype(np.int64)
    copies = max(args.tokens // doc.shape[0], 1)

    def token_docs(report):
        for i in range(copies):
            yield doc, Document("", f"copy:{i}", {})

    start_s = time.perf_counter()
    report = write_index(token_docs, source.manifest["tokenizer"], args.out, BuildOptions(), {"repeated_from": args.index}, progress=False)
    build_s = time.perf_counter() - start_s
    start_s = time.perf_counter()
    checked = verify_index(args.out)["tokens_checked"]
    print(json.dumps({"document_tokens": int(doc.shape[0]), "copies": copies, "tokens": report.tokens, "positions_checked": checked,
                      "build_seconds": round(build_s, 1), "verify_seconds": round(time.perf_counter() - start_s, 2)}, indent=1))


def memory(index_dir: str, tokenizer_name: str, release_every: tuple[int, ...], jit: bool = True) -> None:
    """Query ``index_dir`` from fresh, lean processes (numpy + numba, no torch; no numba
    either with ``jit=False``), one per ``release_every`` setting, and print their resident
    memory and latency."""
    from retrospec.tools.index_cli import load_tokenizer

    queries = contexts(load_tokenizer(tokenizer_name), 4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "contexts.npz"
        np.savez(path, flat=np.concatenate(queries), ends=np.cumsum([q.shape[0] for q in queries]))
        for every in release_every:
            probe = subprocess.run([sys.executable, __file__, "probe", index_dir, "--contexts", str(path), "--release-every", str(every)],
                                   capture_output=True, text=True, check=False, env={**os.environ, "RETROSPEC_JIT": "1" if jit else "0"})
            print(probe.stdout or probe.stderr)


def cmd_memory(args) -> None:
    memory(args.index, args.tokenizer, tuple(args.release_every), jit=not args.no_jit)


def cmd_probe(args) -> None:
    # deliberately lean: what a process that only serves index queries imports
    baseline = rss_mb()
    data = np.load(args.contexts)
    queries = np.split(data["flat"], data["ends"][:-1])
    start = time.perf_counter()
    index = SuffixIndex.open(args.index, config=SuffixConfig(release_every=args.release_every, release_mapped_mb=args.release_mapped_mb,
                                                             reads=args.reads))
    open_ms = (time.perf_counter() - start) * 1e3
    after_open = rss_mb()
    result = measure(index, queries, 64)
    result.update({"tokens": index.n_tokens, "shards": len(index.shards), "reads": index.reads, "release_every": args.release_every,
                   "release_mapped_mb": args.release_mapped_mb,
                   "open_ms": round(open_ms, 1), "rss_at_start_mb": round(baseline, 1), "rss_after_open_mb": round(after_open, 1),
                   "torch_imported": "torch" in sys.modules, "numba_imported": "numba" in sys.modules})
    print(json.dumps(result, indent=1))


# --------------------------------------------------------------------------- distributed builds
def load_average() -> str:
    """The 1, 5 and 15 minute load averages (of a 2-core machine: above ~0.5 someone else is busy)."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _source_docs(index_dir: str) -> list[np.ndarray]:
    source = SuffixIndex.open(index_dir)
    docs = []
    for shard in source.shards:
        ids = shard.token_ids()
        start = 0
        for cut in np.flatnonzero(ids == shard.sep).tolist():
            docs.append(shard.vocab[ids[start:cut]].astype(np.uint32))
            start = cut + 1
    return docs


def synthetic_piece(job, tokenizer) -> dict:
    """A tokenize task that makes its documents instead of reading text: ``job.piece.end``
    tokens of the source index's documents (``job.piece.path``) in an order seeded by the
    piece, so every build of the benchmark gets the same corpus."""
    from retrospec.datastores.cluster_build import _peak_rss_mb, _write_piece

    start, cpu = time.perf_counter(), time.process_time()
    piece = job.piece
    docs = _source_docs(piece.path)
    rng = np.random.default_rng(piece.start)
    ids, rows, total = [], [], 0
    while total < piece.end:
        for i in rng.permutation(len(docs)).tolist():
            if total >= piece.end:
                break
            ids.append(docs[i])
            rows.append({"line": 0, "source": f"synthetic:{piece.index}:{i}", "meta": None})
            total += docs[i].shape[0]
    lengths, tokens = _write_piece(job.work, piece.index, ids, rows)
    return {"piece": piece.index, "lengths": lengths, "tokens": tokens, "lines": 0, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu, "peak_rss_mb": _peak_rss_mb(), "pid": os.getpid()}


def chat_contexts(tokenizer, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` draft queries as a chat generation makes them: a ShareGPT prompt and its reference
    reply cut at a random point."""
    rng = np.random.default_rng(seed)
    texts = []
    with open(CHATS, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            for turn, reply in zip(record["turns"], record["reference_responses"]):
                texts.append((turn, reply))
    out = []
    while len(out) < n:
        turn, reply = texts[int(rng.integers(len(texts)))]
        prompt = tokenizer(turn, add_special_tokens=False).input_ids
        answer = tokenizer(reply, add_special_tokens=False).input_ids
        if len(answer) < 2:
            continue
        out.append(np.asarray(prompt + answer[: int(rng.integers(1, len(answer)))], np.int64))
    return out


def cmd_cluster(args) -> None:
    import shutil

    from retrospec.datastores.cluster_build import ClusterOptions, Piece, build_index_distributed
    from retrospec.datastores.corpus import ReadOptions
    from retrospec.datastores.suffix_build import build_index
    from retrospec.tools.index_cli import load_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer)
    lines = [f"`{' '.join(sys.argv)}` on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}", ""]

    def say(text: str = "") -> None:
        lines.append(text)
        print(text, flush=True)

    # 0) the source documents: ShareGPT through the real tokenizer, in one process (not timed)
    source = work / "source"
    if not (source / "manifest.json").exists():
        build_index([SHAREGPT], tokenizer, source, BuildOptions(), ReadOptions(chat_template=True), force=True, progress=False)
    # 1) real tokenization, 1 and 2 workers: the per-worker rates of text -> index
    plain = work / "sharegpt.jsonl"
    if not plain.exists():
        import gzip

        with gzip.open(SHAREGPT, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
    say("| corpus | engine | workers | tokens | shards | wall: tokenize + shards | engine start | whole build | tokenize wall | "
        "tokenize tok/s per worker | shards wall | suffix arrays tok/s per worker (per CPU second) | worker peak RSS | "
        "bytes/token | load avg before → after |")
    say("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")

    def row(name: str, report, before: str) -> float:
        busy = report.tokenize_wall_seconds + report.index_wall_seconds
        say(f"| {name} | {report.engine} | {report.workers} | {report.tokens / 1e6:,.1f}M | {report.shards} | {busy:.1f} s | "
            f"{report.engine_start_seconds:.1f} s | {report.wall_seconds:.1f} s | {report.tokenize_wall_seconds:.1f} s | "
            f"{report.tokenize_tokens_per_second / 1e6:.2f}M | {report.index_wall_seconds:.1f} s | "
            f"{report.index_tokens_per_second / 1e6:.2f}M ({report.tokens / max(report.index_cpu_seconds, 1e-9) / 1e6:.2f}M) | "
            f"{report.worker_peak_rss_mb:,.0f} MB | {report.bytes_per_token:.2f} | "
            f"{before} → {load_average()} |")
        return busy, report.tokenize_cpu_seconds + report.index_cpu_seconds

    walls: dict[tuple[str, str, int], tuple[float, float]] = {}  # (wall of the tasks, their CPU seconds)
    reference = None
    for engine in args.engines if "sharegpt" in args.corpora else ():
        for workers in args.workers:
            out = work / f"sharegpt-{engine}-{workers}"
            before = load_average()
            report = build_index_distributed([plain], tokenizer, out, BuildOptions(), ReadOptions(chat_template=True),
                                             ClusterOptions(engine=engine, workers=workers, piece_bytes=4 << 20), force=True,
                                             progress=False)
            walls["sharegpt", engine, workers] = row("ShareGPT (SmolLM2 tokenizer)", report, before)
            shutil.rmtree(out)
    # 2) the synthetic corpus: the same pieces for every build, so the same shards
    identity = SuffixIndex.open(source).manifest["tokenizer"]
    n_pieces = max(-(-args.tokens // args.piece_tokens), 1)
    pieces = [Piece(index=i, input=0, kind="synthetic", path=str(source), start=i,
                    end=min(args.piece_tokens, args.tokens - i * args.piece_tokens)) for i in range(n_pieces)]
    index = work / "synthetic"
    for engine in args.engines:
        for workers in args.workers:
            before = load_average()
            report = build_index_distributed([f"synthetic from {source}"], tokenizer, index, BuildOptions(shard_tokens=args.shard_tokens),
                                             ReadOptions(), ClusterOptions(engine=engine, workers=workers), force=True,
                                             progress=False, pieces=pieces, tokenize_fn=synthetic_piece)
            walls["synthetic", engine, workers] = row(f"synthetic {args.tokens / 1e9:g}B", report, before)
            shards = SuffixIndex.open(index).manifest["shards"]
            reference = reference or shards
            assert shards == reference, "a build wrote other shards than the first"
    assert identity == SuffixIndex.open(index).manifest["tokenizer"]
    say()
    say("| corpus | engine | 2 workers vs 1: wall of the tasks (excl. engine start) | CPU seconds of 1 worker / of 2 × 2 "
        "(the speed-up had each worker a core of its own) |")
    say("|---|---|---:|---:|")
    for corpus in ("sharegpt", "synthetic"):
        for engine in args.engines:
            if (corpus, engine, 1) in walls and (corpus, engine, 2) in walls:
                (w1, c1), (w2, c2) = walls[corpus, engine, 1], walls[corpus, engine, 2]
                cpu = f"{2 * c1 / c2:.2f}×" if c2 else "—"
                say(f"| {corpus} | {engine} | {w1 / w2:.2f}× | {cpu} |")
    say()
    say(f"Every synthetic build wrote the same {len(reference)} shards (manifest entries, sha256 included, identical).")
    # 3) queries on the result, from fresh lean processes (numpy + numba, no torch)
    say()
    query_table(index, tokenizer, args.queries, args.release, say)
    if not args.keep:
        shutil.rmtree(index)
    if args.report:
        Path(args.report).write_text("\n".join(lines) + "\n")


def query_table(index: Path, tokenizer, n_queries: int, release: list[str], say) -> None:
    """Latency and memory of 64-node draft queries on ``index``, one fresh lean process per
    setting (``pread``, or ``RELEASE_EVERY`` or ``RELEASE_EVERY/RELEASE_MAPPED_MB`` of mapped
    reads), as markdown rows."""
    queries = chat_contexts(tokenizer, n_queries)
    say(f"Queries on {index} ({SuffixIndex.open(index).n_tokens / 1e9:g}B tokens, {len(SuffixIndex.open(index).shards)} shards):")
    say()
    say("| reads: release_every / release_mapped_mb | queries | p50 | p99 | mean | RSS between queries (peak) | VmHWM | RssAnon | "
        "first pass p50 / p99 | nonempty | mean nodes | load avg |")
    say("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "contexts.npz"
        np.savez(path, flat=np.concatenate(queries), ends=np.cumsum([q.shape[0] for q in queries]))
        for setting in release:
            reads = "pread" if setting == "pread" else "mapped"
            every, _, mapped = ("0" if reads == "pread" else setting).partition("/")
            probe = subprocess.run([sys.executable, __file__, "probe", str(index), "--contexts", str(path), "--release-every", every,
                                    "--release-mapped-mb", mapped or "0", "--reads", reads],
                                   capture_output=True, text=True, check=True, env={**os.environ, "RETROSPEC_JIT": "1"})
            r = json.loads(probe.stdout)
            label = "pread" if reads == "pread" else f"mapped: {every} / {mapped or 0} MB"
            say(f"| {label} | {r['queries']} | {r['p50_us'] / 1e3:.2f} ms | {r['p99_us'] / 1e3:.2f} ms | "
                f"{r['mean_us'] / 1e3:.2f} ms | {r['peak_rss_mb']:.0f} MB | {r['hwm_mb']:.0f} MB | {r['rss_anon_mb']:.0f} MB | "
                f"{r['first_pass_p50_us'] / 1e3:.2f} / {r['first_pass_p99_us'] / 1e3:.2f} ms | {r['nonempty']:.2f} | "
                f"{r['mean_nodes']:.1f} | {load_average()} |")


def cmd_queries(args) -> None:
    from retrospec.tools.index_cli import load_tokenizer

    print(f"`{' '.join(sys.argv)}`, {time.strftime('%Y-%m-%d %H:%M')}\n")
    query_table(Path(args.index), load_tokenizer(args.tokenizer), args.queries, args.release, print)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("latency")
    p.add_argument("index")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--cuts", type=int, default=10)
    p.add_argument("--max-nodes", type=int, default=64)
    p.set_defaults(func=cmd_latency)
    p = sub.add_parser("scale")
    p.add_argument("index")
    p.add_argument("--tokens", type=int, default=500_000_000)
    p.add_argument("--shard-tokens", type=int, default=1 << 28)
    p.add_argument("--tokenizer", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_scale)
    p = sub.add_parser("repetitive")
    p.add_argument("index")
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_repetitive)
    p = sub.add_parser("memory")
    p.add_argument("index")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--release-every", type=int, nargs="+", default=[8, 64])
    p.add_argument("--no-jit", action="store_true", help="probe with RETROSPEC_JIT=0: kernels interpreted, numba never imported")
    p.set_defaults(func=cmd_memory)
    p = sub.add_parser("cluster", help="distributed builds and queries on the result (see the module docstring)")
    p.add_argument("--work", required=True, help="scratch folder (~15 GB for 1B tokens; the index is removed unless --keep)")
    p.add_argument("--tokenizer", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=1_000_000_000)
    p.add_argument("--shard-tokens", type=int, default=126_000_000, help="default: %(default)s (1B tokens in 8 shards of nearly one size)")
    p.add_argument("--piece-tokens", type=int, default=1 << 25, help="tokens per synthetic piece (default: %(default)s)")
    p.add_argument("--engines", nargs="+", default=["pool", "ray"], choices=["pool", "ray"])
    p.add_argument("--corpora", nargs="+", default=["sharegpt", "synthetic"], choices=["sharegpt", "synthetic"],
                   help="the real corpus through the tokenizer, and the synthetic index (always built: queries need it)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--release", nargs="+", default=["pread", "64", "64/64", "1"],
                   help="query settings to probe: pread, or mapped reads releasing pages every RELEASE_EVERY queries or "
                        "RELEASE_EVERY/RELEASE_MAPPED_MB (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic index")
    p.add_argument("--report", help="also write the tables to this markdown file")
    p.set_defaults(func=cmd_cluster)
    p = sub.add_parser("queries", help="the query table of `cluster` on an existing index")
    p.add_argument("index")
    p.add_argument("--tokenizer", default="smollm2-135m")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--release", nargs="+", default=["pread", "64", "64/64", "1"], help="as for `cluster`")
    p.set_defaults(func=cmd_queries)
    p = sub.add_parser("probe")  # internal: run by `memory` in a fresh process
    p.add_argument("index")
    p.add_argument("--contexts", required=True)
    p.add_argument("--release-every", type=int, default=64)
    p.add_argument("--release-mapped-mb", type=int, default=0)
    p.add_argument("--reads", choices=READS, default="mapped")
    p.set_defaults(func=cmd_probe)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
