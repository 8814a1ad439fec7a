"""Distributed suffix-index builds: tokenization and suffix arrays as tasks of Ray or a process pool.

A corpus of billions of tokens takes hours in one process (tokenization ~1M tokens/s, suffix
arrays ~3M tokens/s); shards are independent, so they are the unit of work. The driver:

1. lists the inputs and cuts them into *pieces* of about ``piece_bytes`` each, at document
   boundaries (line-aligned byte ranges of a JSONL file, groups of files of a source tree;
   a gzip file is one piece: it cannot be entered in the middle);
2. runs one **tokenize task** per piece: it reads its documents, tokenizes them and writes
   their token ids (``uint32``), lengths and metadata into a work folder inside the build
   folder;
3. cuts the documents into shards with the rule of the single-process build (a new shard
   before the document that would take it past ``shard_tokens``; at every input with
   ``shard_per_input``), from the lengths alone;
4. runs one **shard task** per shard: it reads its documents' ids from the pieces, builds the
   suffix array and writes the shard's files (:func:`~retrospec.datastores.suffix_build.write_shard_tokens`),
   returning its manifest entry (sizes, checksums);
5. checks every shard the manifest will list (each file's size and edge checksums against
   the entry the task returned), writes ``docs.sqlite`` and the manifest with the
   tokenizer's fingerprint, validates the manifest like any reader would, and publishes the
   index atomically (:func:`~retrospec.datastores.files.building`).

Because step 3 is the single-process rule applied to the same token ids, a distributed build
writes the same shards, byte for byte, as ``build_index`` does, whatever the engine or the
number of workers. Tasks write into their own attempt folders and rename the result into
place, so a task that is killed (its worker dies, its machine goes away) is simply run again:
Ray retries it (``max_retries``); the process pool starts a new pool and resubmits the tasks
that had not finished. A task that fails with an error (a bad JSON line) stops the build with
that error. Any failure or interruption leaves the previous index at ``out`` untouched.

Engines (:class:`ClusterOptions`): ``"ray"`` joins the cluster at ``address`` or starts a
local Ray instance with the machine's cores (``pip install 'retrospec[ray]'``); ``"pool"``
runs the same tasks in a local process pool. Every worker must be able to write the folder
beside ``out`` (on a cluster: a shared filesystem mounted at the same path everywhere) and
import retrospec and the tokenizer's class.
"""

from __future__ import annotations

import concurrent.futures as futures
import itertools
import json
import logging
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrospec.datastores.corpus import (
    CorpusError,
    Document,
    ReadOptions,
    is_jsonl,
    jsonl_document,
    read_jsonl,
    read_text,
    tree_files,
)
from retrospec.datastores.files import building, check_files, tokenizer_identity
from retrospec.datastores.suffix_build import (
    BuildOptions,
    BuildReport,
    document_starts,
    finish_index,
    open_previous,
    tokenize,
    write_shard_tokens,
)
from retrospec.datastores.suffix_index import FORMAT, read_index_manifest

log = logging.getLogger(__name__)
WORK = ".work"
"""Folder inside the build folder for the pieces' token ids (removed before publishing)."""
ENGINES = ("pool", "ray")


class BuildError(RuntimeError):
    """A distributed build could not finish (a task kept failing); the previous index is intact."""


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how the tasks of a distributed build run."""

    engine: str = "pool"
    """``"ray"`` (a Ray cluster or a local instance) or ``"pool"`` (a local process pool)."""
    address: str | None = None
    """Ray: the cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``); ``None``
    starts a local instance with ``workers`` CPUs."""
    workers: int | None = None
    """Tasks run at once (``None``: the machine's cores, or on a cluster all its CPUs)."""
    piece_bytes: int = 64 << 20
    """Input bytes per tokenize task (cut at document boundaries)."""
    retries: int = 3
    """Times a task whose worker died is run again before the build gives up."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.piece_bytes < 1:
            raise ValueError(f"piece_bytes must be >= 1, got {self.piece_bytes}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.address is not None and self.engine != "ray":
            raise ValueError(f"an address ({self.address!r}) needs engine 'ray', got {self.engine!r}")


# --------------------------------------------------------------------------- 1) pieces
@dataclass(frozen=True)
class Piece:
    """What one tokenize task reads: a line-aligned byte range ``[start, end)`` of one JSONL
    file (``kind="range"``), one gzip JSONL file (``"gzip"``), or whole text files (``"files"``)."""

    index: int
    input: int  # which input it belongs to (a shard boundary with ``shard_per_input``)
    kind: str
    path: str = ""
    start: int = 0
    end: int = 0
    files: tuple[str, ...] = ()


def plan_pieces(inputs: list[str | Path], read: ReadOptions = ReadOptions(), piece_bytes: int = 64 << 20) -> list[Piece]:
    """Cut the inputs into pieces of about ``piece_bytes``, never inside a document.

    A JSONL file is cut after the first newline at or past each multiple of ``piece_bytes``
    (reading a few bytes at each cut, not the file); a directory's files are grouped in their
    reading order; a text file is one document, a gzip file one piece.
    """
    pieces: list[Piece] = []

    def add(**kw) -> None:
        pieces.append(Piece(index=len(pieces), **kw))

    for i, item in enumerate(inputs):
        path = Path(item)
        if path.is_dir():
            group, size = [], 0
            for file in tree_files(path, read):
                group.append(str(file))
                size += file.stat().st_size
                if size >= piece_bytes:
                    add(input=i, kind="files", files=tuple(group))
                    group, size = [], 0
            if group:
                add(input=i, kind="files", files=tuple(group))
        elif not path.exists():
            raise CorpusError(f"{path}: no such file or directory")
        elif is_jsonl(path) and path.suffix == ".gz":
            add(input=i, kind="gzip", path=str(path))
        elif is_jsonl(path):
            size = path.stat().st_size
            cuts = [0]
            with open(path, "rb") as f:
                while cuts[-1] + piece_bytes < size:
                    f.seek(cuts[-1] + piece_bytes - 1)  # a newline exactly at the cut ends the piece there
                    f.readline()
                    if f.tell() >= size:
                        break
                    cuts.append(f.tell())
            cuts.append(size)
            for start, end in itertools.pairwise(cuts):
                add(input=i, kind="range", path=str(path), start=start, end=end)
        else:
            add(input=i, kind="files", files=(str(path),))
    return pieces


def _piece_documents(piece: Piece, read: ReadOptions, tokenizer) -> Iterator[tuple[Document, int]]:
    """The documents of a piece, each with its line inside the piece (0 when not a range)."""
    if piece.kind == "files":
        for file in piece.files:
            yield read_text(Path(file)), 0
    elif piece.kind == "gzip":
        for doc in read_jsonl(Path(piece.path), read, tokenizer):
            yield doc, 0
    else:
        path = Path(piece.path)
        try:
            with open(path, "rb") as f:
                f.seek(piece.start)
                pos, line_no = piece.start, 0
                while pos < piece.end:
                    raw = f.readline()
                    if not raw:
                        break
                    line_no += 1
                    where = f"{path} (line {line_no} of the piece at byte {piece.start:,}: byte {pos:,})"
                    pos += len(raw)
                    doc = jsonl_document(raw.decode("utf-8"), where, "", read, tokenizer)
                    if doc is not None:
                        yield doc, line_no
        except (OSError, UnicodeDecodeError) as err:
            raise CorpusError(f"{path}: unreadable ({err})") from None


def _lines(piece: Piece) -> int:
    """Lines of a range piece (what the next piece's line numbers start after)."""
    count, last = 0, b"\n"
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        left = piece.end - piece.start
        while left > 0:
            block = f.read(min(left, 1 << 22))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
            last = block[-1:]
    if last != b"\n":
        count += 1  # a last line without a newline
    return count


# --------------------------------------------------------------------------- 2) tokenize tasks
@dataclass(frozen=True)
class TokenizeJob:
    piece: Piece
    work: str  # the work folder (inside the build folder)
    read: ReadOptions
    add_eos: bool
    batch_docs: int


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def piece_files(work: str | Path, index: int) -> dict[str, Path]:
    base = Path(work) / f"piece-{index:06d}"
    return {"tokens": base.with_suffix(".tokens"), "lengths": base.with_suffix(".lengths"), "rows": base.with_suffix(".rows.jsonl")}


def _write_piece(work: str, index: int, ids: list[np.ndarray], rows: list[dict]) -> tuple[np.ndarray, int]:
    """Write a piece's token ids, lengths and rows (each file renamed into place whole)."""
    lengths = np.fromiter((x.shape[0] for x in ids), np.int64, len(ids))
    flat = np.concatenate(ids).astype(np.uint32) if ids else np.zeros(0, np.uint32)
    tag = uuid.uuid4().hex[:8]
    for key, path in piece_files(work, index).items():
        tmp = path.with_name(f".{path.name}.{tag}")  # a killed attempt leaves no file a retry could take for whole
        if key == "tokens":
            flat.tofile(tmp)
        elif key == "lengths":
            lengths.tofile(tmp)
        else:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
    return lengths, int(flat.shape[0])


def tokenize_piece(job: TokenizeJob, tokenizer) -> dict:
    """Tokenize one piece into the work folder; return its document lengths and counts."""
    start, cpu = time.perf_counter(), time.process_time()
    ids: list[np.ndarray] = []
    rows: list[dict] = []
    batch: list[tuple[Document, int]] = []

    def flush() -> None:
        for x, (doc, line) in zip(tokenize(tokenizer, [d.text for d, _ in batch], job.add_eos), batch):
            if x.shape[0]:  # an empty document adds nothing (as in the single-process build)
                ids.append(x)
                rows.append({"line": line, "source": doc.source, "meta": doc.meta or None})
        batch.clear()

    for item in _piece_documents(job.piece, job.read, tokenizer):
        batch.append(item)
        if len(batch) >= job.batch_docs:
            flush()
    flush()
    lengths, tokens = _write_piece(job.work, job.piece.index, ids, rows)
    lines = _lines(job.piece) if job.piece.kind == "range" else 0
    return {"piece": job.piece.index, "lengths": lengths, "tokens": tokens, "lines": lines, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu, "peak_rss_mb": _peak_rss_mb(), "pid": os.getpid()}


# --------------------------------------------------------------------------- 3) shards
@dataclass(frozen=True)
class ShardJob:
    name: str
    root: str  # the build folder
    work: str
    segments: tuple[tuple[int, int, int], ...]  # (piece, first document, last document + 1)
    offsets: tuple[tuple[int, int], ...]  # the segments' token ranges inside their pieces
    block_bytes: int


def plan_shards(pieces: list[Piece], lengths: list[np.ndarray], options: BuildOptions, first_index: int,
                root: str, work: str) -> list[ShardJob]:
    """The single-process build's cut rule over the documents' lengths (see ``_ShardWriter``)."""
    jobs: list[ShardJob] = []
    segments: list[tuple[int, int, int]] = []
    count = 0

    def flush() -> None:
        nonlocal segments, count
        if not segments:
            return
        offsets = []
        for p, lo, hi in segments:
            before = np.concatenate([[0], np.cumsum(lengths[p])])
            offsets.append((int(before[lo]), int(before[hi])))
        jobs.append(ShardJob(f"shard-{first_index + len(jobs):05d}", root, work, tuple(segments), tuple(offsets), options.block_bytes))
        segments, count = [], 0

    previous_input = None
    for piece in pieces:
        if options.shard_per_input and previous_input is not None and piece.input != previous_input:
            flush()
        previous_input = piece.input
        lo = 0
        for d, n in enumerate(lengths[piece.index].tolist()):
            if count and count + n > options.shard_tokens:
                if d > lo:
                    segments.append((piece.index, lo, d))
                flush()
                lo = d
            count += n
        if len(lengths[piece.index]) > lo:
            segments.append((piece.index, lo, len(lengths[piece.index])))
    flush()
    return jobs


def build_shard(job: ShardJob, shared=None) -> dict:
    """Build one shard from its pieces' token ids into its own attempt folder, then rename it
    into place; return its manifest entry."""
    start, cpu = time.perf_counter(), time.process_time()
    flat = np.concatenate([np.fromfile(piece_files(job.work, p)["tokens"], np.uint32, count=hi - lo, offset=4 * lo)
                           for (p, _, _), (lo, hi) in zip(job.segments, job.offsets)])
    lengths = np.concatenate([np.fromfile(piece_files(job.work, p)["lengths"], np.int64, count=b - a, offset=8 * a)
                              for p, a, b in job.segments])
    attempt = Path(job.root) / WORK / f"attempt-{uuid.uuid4().hex}"
    attempt.mkdir(parents=True)
    entry, _ = write_shard_tokens(attempt, job.name, flat, lengths, job.block_bytes)
    final = Path(job.root) / job.name
    if final.exists():  # an earlier attempt finished after all: the new one replaces it
        shutil.rmtree(final)
    os.replace(attempt / job.name, final)
    attempt.rmdir()
    return {"entry": entry, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "peak_rss_mb": _peak_rss_mb(), "pid": os.getpid()}


# --------------------------------------------------------------------------- engines
_SHARED = None  # a pool worker's copy of what every task needs (the tokenizer)


def _init_pool_worker(shared) -> None:
    global _SHARED
    _SHARED = shared
    # one task is one CPU: a fast tokenizer's own thread pool would share the cores twice over
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _pool_call(fn: Callable, job, marker: str):
    Path(marker).touch()  # started: if this worker dies now, this task is one that was running
    result = fn(job, _SHARED)
    os.unlink(marker)
    return result


class PoolEngine:
    """Tasks in a local process pool (spawned processes). A dead worker breaks the whole pool:
    it is replaced, and the unfinished tasks are submitted again; a task that was running
    each time a worker died more than ``retries`` times stops the build."""

    name = "pool"

    def __init__(self, options: ClusterOptions, shared):
        self.workers = options.workers or os.cpu_count() or 1
        self.retries, self.shared = options.retries, shared
        self.pool: futures.ProcessPoolExecutor | None = None
        self.markers = Path(tempfile.mkdtemp(prefix="retrospec-pool-"))
        self.ready_seconds = 0.0

    def _pool(self) -> futures.ProcessPoolExecutor:
        if self.pool is None:
            self.pool = futures.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_init_pool_worker, initargs=(self.shared,))
        return self.pool

    def run(self, fn: Callable, jobs: list, label: Callable) -> Iterator[tuple[int, dict]]:
        """``(job number, result)`` of every job, as they finish."""
        deaths = [0] * len(jobs)
        left = set(range(len(jobs)))
        while left:
            pool = self._pool()
            running = {pool.submit(_pool_call, fn, jobs[i], str(self.markers / str(i))): i for i in sorted(left)}
            broken = False
            for done in futures.as_completed(running):
                i = running[done]
                try:
                    result = done.result()
                except futures.process.BrokenProcessPool:
                    broken = True
                    continue
                left.discard(i)
                yield i, result
            if broken:
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None
                for marker in list(self.markers.iterdir()):  # the tasks that were running when it died
                    deaths[int(marker.name)] += 1
                    marker.unlink()
                failed = [label(jobs[i]) for i in sorted(left) if deaths[i] > self.retries]
                if failed:
                    raise BuildError(f"{'; '.join(failed)}: a worker died {self.retries + 1} times while it ran (killed, or out "
                                     f"of memory?); the previous index is untouched")
                log.warning("index build: a worker died; running %d unfinished task(s) again in a new pool", len(left))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        shutil.rmtree(self.markers, ignore_errors=True)


class RayEngine:
    """Tasks on Ray: a cluster at ``address``, or a local instance with ``workers`` CPUs.
    Ray itself runs a task again when its worker dies (``max_retries``); an error raised by
    the task stops the build with that error."""

    name = "ray"

    def __init__(self, options: ClusterOptions, shared):
        # Ray's progress-bar manager replaces the process's builtins.print with its own the
        # first time a worker's bar reaches the driver: the caller's print stays theirs
        os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
        import ray

        self.ray = ray
        start = time.perf_counter()
        self.owned = not ray.is_initialized()
        if self.owned:
            if options.address is None:
                cpus = options.workers or os.cpu_count() or 1
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20,
                         configure_logging=False)
            else:
                ray.init(address=options.address, log_to_driver=False, configure_logging=False)
        self.workers = options.workers or max(int(ray.cluster_resources().get("CPU", 1)), 1)
        self.retries = options.retries
        self.shared = ray.put(shared)
        self.remote = ray.remote(num_cpus=1, max_retries=options.retries)(_ray_call)
        self.ready_seconds = time.perf_counter() - start

    def run(self, fn: Callable, jobs: list, label: Callable) -> Iterator[tuple[int, dict]]:
        ray = self.ray
        todo = list(range(len(jobs)))[::-1]
        running: dict = {}
        while todo or running:
            while todo and len(running) < self.workers:  # at most `workers` at once, so others may share the cluster
                i = todo.pop()
                running[self.remote.remote(fn, jobs[i], self.shared)] = i
            ready, _ = ray.wait(list(running), num_returns=1)
            i = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayTaskError as err:
                cause = getattr(err, "cause", None)
                for ref in running:
                    ray.cancel(ref, force=True)
                if isinstance(cause, Exception):
                    raise cause from None
                raise BuildError(f"{label(jobs[i])}: {err}") from None
            except _ray_deaths(ray) as err:
                for ref in running:
                    ray.cancel(ref, force=True)
                raise BuildError(f"{label(jobs[i])}: its worker died {self.retries + 1} times ({type(err).__name__}); "
                                 f"the previous index is untouched") from None
            yield i, result

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


def _ray_deaths(ray) -> tuple[type, ...]:
    """Ray's errors for a task whose worker or node died (after its retries)."""
    names = ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "TaskUnschedulableError", "ActorDiedError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def _ray_call(fn: Callable, job, shared):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one task is one CPU (see _init_pool_worker)
    return fn(job, shared)


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def start_engine(options: ClusterOptions, shared):
    """The engine ``options`` names. Ray without an address, where Ray is not installed, runs
    the same tasks in a local process pool (with a warning); with an address it is an error."""
    if options.engine == "ray" and not ray_available():
        if options.address is not None:
            raise ImportError(f"joining the Ray cluster at {options.address!r} needs ray: pip install 'retrospec[ray]'")
        log.warning("index build: ray is not installed (pip install 'retrospec[ray]'); running the tasks in a local process pool")
        options = ClusterOptions(engine="pool", workers=options.workers, piece_bytes=options.piece_bytes, retries=options.retries)
    return (RayEngine if options.engine == "ray" else PoolEngine)(options, shared)


# --------------------------------------------------------------------------- the build
@dataclass
class ClusterReport(BuildReport):
    """A :class:`BuildReport` with the distributed build's own figures: ``tokenize_seconds``
    and ``index_seconds`` are the tasks' busy time summed over the workers (so the rates are
    per worker), the ``*_cpu_seconds`` the CPU time the tasks' processes used meanwhile (on a
    machine shared with other work, a worker's rate per CPU second is what it would do with a
    core of its own), the wall times are the driver's."""

    engine: str = ""
    workers: int = 0
    pieces: int = 0
    engine_start_seconds: float = 0.0
    tokenize_wall_seconds: float = 0.0
    index_wall_seconds: float = 0.0
    wall_seconds: float = 0.0
    tokenize_cpu_seconds: float = 0.0
    index_cpu_seconds: float = 0.0
    worker_peak_rss_mb: float = 0.0
    worker_pids: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{super().summary()}; {self.engine} with {self.workers} worker(s), {self.pieces} piece(s): "
                f"{self.wall_seconds:.1f}s wall ({self.engine_start_seconds:.1f}s engine start, tokenize "
                f"{self.tokenize_wall_seconds:.1f}s, shards {self.index_wall_seconds:.1f}s), worker peak RSS "
                f"{self.worker_peak_rss_mb:.0f} MB")


def _run_all(engine, fn: Callable, jobs: list, label: Callable, desc: str, unit: str, progress: bool) -> list[dict]:
    """Every job's result, in the jobs' order, as the engine finishes them (a progress bar)."""
    results: list[dict | None] = [None] * len(jobs)
    with tqdm(desc=desc, total=len(jobs), unit=unit, disable=not progress) as bar:
        for i, result in engine.run(fn, jobs, label):
            results[i] = result
            bar.update(1)
    return results


def build_index_distributed(
    inputs: list[str | Path],
    tokenizer,
    out: str | Path,
    options: BuildOptions = BuildOptions(),
    read: ReadOptions = ReadOptions(),
    cluster: ClusterOptions = ClusterOptions(),
    *,
    append: bool = False,
    force: bool = False,
    progress: bool = True,
    pieces: list[Piece] | None = None,
    tokenize_fn: Callable = tokenize_piece,
    shard_fn: Callable = build_shard,
) -> ClusterReport:
    """:func:`~retrospec.datastores.suffix_build.build_index` with its work spread over the
    tasks of an engine (see the module docstring); the same index, byte for byte in its shards.

    ``tokenize_fn(job, tokenizer)`` and ``shard_fn(job, tokenizer)`` are the two tasks
    (importable functions: they are sent to the workers by reference); with ``pieces`` given
    instead of planned from ``inputs``, ``tokenize_fn`` may make its documents from anything
    they describe (the synthetic scale benchmark does).
    """
    if not inputs:
        raise CorpusError("no inputs given")
    identity = tokenizer_identity(tokenizer)
    wall = time.perf_counter()
    out = Path(out)
    previous = open_previous(out, identity, append)
    pieces = plan_pieces(inputs, read, cluster.piece_bytes) if pieces is None else pieces
    report = ClusterReport(path=str(out), engine=cluster.engine, pieces=len(pieces))
    with building(out, FORMAT, force=force) as tmp:
        work = tmp / WORK
        work.mkdir()
        engine = start_engine(cluster, tokenizer)
        report.engine, report.workers, report.engine_start_seconds = engine.name, engine.workers, engine.ready_seconds
        try:
            # 2) tokenize every piece
            start = time.perf_counter()
            jobs = [TokenizeJob(p, str(work), read, options.add_eos, options.batch_docs) for p in pieces]
            results = _run_all(engine, tokenize_fn, jobs, lambda j: f"tokenizing {_describe(j.piece)}", "tokenize", "piece", progress)
            report.tokenize_wall_seconds = time.perf_counter() - start
            lengths = [r["lengths"] for r in results]
            report.tokens = sum(r["tokens"] for r in results)
            report.documents = sum(len(x) for x in lengths)
            report.tokenize_seconds = sum(r["seconds"] for r in results)
            if report.tokens == 0:
                raise CorpusError(f"the inputs hold no text to index: {', '.join(map(str, inputs))}")
            # 3) the shards, 4) built as tasks
            start = time.perf_counter()
            old = len(previous.data["shards"]) if previous else 0
            shard_jobs = plan_shards(pieces, lengths, options, old, str(tmp), str(work))
            built = _run_all(engine, shard_fn, shard_jobs, lambda j: f"building {j.name}", "shards", "shard", progress)
            report.index_wall_seconds = time.perf_counter() - start
        finally:
            engine.close()
        report.index_seconds = sum(r["seconds"] for r in built)
        report.tokenize_cpu_seconds = sum(r.get("cpu_seconds", 0.0) for r in results)
        report.index_cpu_seconds = sum(r.get("cpu_seconds", 0.0) for r in built)
        report.worker_peak_rss_mb = max(r["peak_rss_mb"] for r in results + built)
        report.worker_pids = sorted({r["pid"] for r in results + built})
        # 5) check what the tasks wrote, then the rows, the manifest, and publish
        entries = [r["entry"] for r in built]
        for entry in entries:
            check_files(tmp, entry["files"])
        rows = _rows(pieces, shard_jobs, lengths, [r["lines"] for r in results], work)
        shutil.rmtree(work)
        info = {**asdict(read), "inputs": [str(i) for i in inputs], "engine": report.engine, "workers": report.workers,
                "piece_bytes": cluster.piece_bytes}
        finish_index(tmp, previous, entries, rows, identity, {**asdict(options), **info})
        read_index_manifest(tmp)  # the manifest as any reader will validate it
    report.shards = len(entries)
    report.shard_names = [e["name"] for e in entries]
    report.bytes = sum(f["bytes"] for e in entries for f in e["files"].values())
    report.wall_seconds = time.perf_counter() - wall
    return report


def _describe(piece: Piece) -> str:
    if piece.kind == "range":
        return f"{piece.path} bytes {piece.start:,}-{piece.end:,}"
    if piece.kind == "gzip":
        return piece.path
    if piece.kind == "files":
        return f"{piece.files[0]}" + (f" and {len(piece.files) - 1} more files" if len(piece.files) > 1 else "")
    return f"piece {piece.index} ({piece.kind})"


def _rows(pieces: list[Piece], shard_jobs: list[ShardJob], lengths: list[np.ndarray], lines: list[int], work: Path) -> list[dict]:
    """``docs.sqlite`` rows of the new shards, in order: the pieces' rows with their shard, the
    document's span in it, and (for JSONL ranges) line numbers counted from the file's start."""
    first_line: dict[int, int] = {}  # piece -> lines of its file before it
    seen: dict[str, int] = {}
    for p in pieces:
        if p.kind == "range":
            first_line[p.index] = seen.get(p.path, 0)
            seen[p.path] = first_line[p.index] + lines[p.index]
    cache: dict[int, list[dict]] = {}
    rows = []
    for job in shard_jobs:
        spans = document_starts(np.concatenate([lengths[p][a:b] for p, a, b in job.segments]))
        k = 0
        for p, a, b in job.segments:
            if p not in cache:
                cache.clear()  # pieces are read in order: keep one
                with open(piece_files(work, p)["rows"], encoding="utf-8") as f:
                    cache[p] = [json.loads(line) for line in f]
            piece = pieces[p]
            for d in range(a, b):
                row = cache[p][d]
                source = row["source"]
                if piece.kind == "range":
                    source = f"{Path(piece.path).name}:{first_line[p] + row['line']}"
                rows.append({"shard": job.name, "start": int(spans[k]), "length": int(lengths[p][d]), "source": source,
                             "meta": row["meta"]})
                k += 1
    return rows

