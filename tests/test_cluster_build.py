"""Distributed index builds: the same shards as one process, whatever the engine; killed workers."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from helpers import IdTokenizer

from retrospec.datastores import cluster_build
from retrospec.datastores.cluster_build import (
    BuildError,
    ClusterOptions,
    build_index_distributed,
    build_shard,
    plan_pieces,
)
from retrospec.datastores.corpus import CorpusError, ReadOptions
from retrospec.datastores.suffix_build import BuildOptions, build_index
from retrospec.datastores.suffix_index import SuffixConfig, SuffixIndex, verify_index

TOK = IdTokenizer()


def _corpus(tmp_path: Path, seed: int = 0) -> tuple[list[Path], list[list[int]]]:
    """Three inputs of every kind a piece can be: a JSONL file (blank lines, an empty document,
    ids, no newline at its end), a gzip JSONL file, a folder of text files."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 40 if i % 4 else 12, rng.integers(1, 80)).tolist() for i in range(300)]
    lines = [json.dumps({"text": " ".join(map(str, d)), "id": i}) for i, d in enumerate(docs[:200])]
    lines[7] = json.dumps({"text": ""})
    lines.insert(50, "")
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": " ".join(map(str, d))}) + "\n" for d in docs[200:260]))
    tree = tmp_path / "tree"
    tree.mkdir()
    for i, d in enumerate(docs[260:]):
        (tree / f"f{i:03d}.txt").write_text(" ".join(map(str, d)))
    return [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tree], docs


def _shard_bytes(root: Path) -> dict[str, bytes]:
    manifest = json.loads((root / "manifest.json").read_text())
    return {name: (root / name).read_bytes() for s in manifest["shards"] for name in s["files"]}


def _rows(root: Path) -> list[tuple]:
    con = sqlite3.connect(root / "docs.sqlite")
    try:
        return con.execute("SELECT shard, start, length, source, meta FROM documents ORDER BY rowid").fetchall()
    finally:
        con.close()


def _same_index(a: Path, b: Path) -> None:
    assert _shard_bytes(a) == _shard_bytes(b)
    assert _rows(a) == _rows(b)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["shards"] == mb["shards"] and ma["tokens"] == mb["tokens"] and ma["documents"] == mb["documents"]
    assert ma["tokenizer"] == mb["tokenizer"]


def killing_shard(job, shared):
    """``build_shard`` that kills its own worker (SIGKILL) the first time it builds shard 1."""
    marker = Path(job.root).parent / f"killed-{job.name}"
    if job.name == "shard-00001" and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return build_shard(job, shared)


def dying_shard(job, shared):
    """``build_shard`` whose worker dies every time it builds shard 1."""
    if job.name == "shard-00001":
        os.kill(os.getpid(), signal.SIGKILL)
    return build_shard(job, shared)


def test_pieces_cover_a_jsonl_file_in_whole_lines(tmp_path):
    lines = [json.dumps({"text": "1 " * int(n)}) for n in np.random.default_rng(0).integers(0, 30, 200)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = path.read_bytes()
    pieces = plan_pieces([path], piece_bytes=500)
    assert len(pieces) > 5 and pieces[0].start == 0 and pieces[-1].end == len(data)
    for p, q in itertools.pairwise(pieces):
        assert p.end == q.start and data[q.start - 1 : q.start] == b"\n"
    assert plan_pieces([path], piece_bytes=len(data))[0].end == len(data)


@pytest.mark.parametrize("shard_per_input", [False, True])
def test_a_pool_build_writes_the_single_process_shards_byte_for_byte(tmp_path, shard_per_input):
    inputs, _ = _corpus(tmp_path)
    options = BuildOptions(shard_tokens=1500, shard_per_input=shard_per_input, batch_docs=16)
    build_index(inputs, TOK, tmp_path / "one", options, progress=False)
    report = build_index_distributed(inputs, TOK, tmp_path / "pool", options, ReadOptions(),
                                     ClusterOptions(engine="pool", workers=2, piece_bytes=700), progress=False)
    assert report.pieces > 8 and report.shards > 3 and report.engine == "pool" and report.workers == 2
    assert len(report.worker_pids) == 2  # both workers took tasks
    _same_index(tmp_path / "one", tmp_path / "pool")
    verify_index(tmp_path / "pool", tokenizer=TOK)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build folder left behind


def test_append_adds_the_same_shards_as_a_single_process_append(tmp_path):
    inputs, _ = _corpus(tmp_path)
    options = BuildOptions(shard_tokens=1500)
    for name in ("one", "pool"):
        build_index(inputs[:1], TOK, tmp_path / name, options, progress=False)
    build_index(inputs[1:], TOK, tmp_path / "one", options, append=True, progress=False)
    report = build_index_distributed(inputs[1:], TOK, tmp_path / "pool", options, ReadOptions(), ClusterOptions(workers=2),
                                     append=True, progress=False)
    assert report.shard_names[0] != "shard-00000"  # numbered after the shards already there
    _same_index(tmp_path / "one", tmp_path / "pool")
    verify_index(tmp_path / "pool")


def test_a_killed_worker_is_replaced_and_its_shard_built_again(tmp_path, caplog):
    inputs, _ = _corpus(tmp_path)
    options = BuildOptions(shard_tokens=1500)
    build_index(inputs, TOK, tmp_path / "one", options, progress=False)
    with caplog.at_level(logging.WARNING):
        build_index_distributed(inputs, TOK, tmp_path / "pool", options, ReadOptions(), ClusterOptions(workers=2, piece_bytes=700),
                                progress=False, shard_fn=killing_shard)
    assert (tmp_path / "killed-shard-00001").exists()
    assert "a worker died" in caplog.text
    _same_index(tmp_path / "one", tmp_path / "pool")
    verify_index(tmp_path / "pool")


def test_a_shard_whose_worker_keeps_dying_fails_clearly_and_leaves_the_previous_index(tmp_path):
    inputs, _ = _corpus(tmp_path)
    build_index(inputs[:1], TOK, tmp_path / "idx", progress=False)
    before = (tmp_path / "idx" / "manifest.json").read_bytes(), _shard_bytes(tmp_path / "idx")
    with pytest.raises(BuildError, match=r"building shard-00001.*: a worker died 2 times while it ran .* previous index is untouched"):
        build_index_distributed(inputs, TOK, tmp_path / "idx", BuildOptions(shard_tokens=1500), ReadOptions(),
                                ClusterOptions(workers=2, retries=1), progress=False, shard_fn=dying_shard)
    assert ((tmp_path / "idx" / "manifest.json").read_bytes(), _shard_bytes(tmp_path / "idx")) == before
    verify_index(tmp_path / "idx")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_bad_line_stops_the_build_with_its_place_and_no_retry(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": "1 2 3"}) + "\n" for _ in range(50)) + "{oops\n")
    with pytest.raises(CorpusError, match=r"c.jsonl \(line 3 of the piece at byte 864: byte 900\): not valid JSON"):
        build_index_distributed([path], TOK, tmp_path / "idx", cluster=ClusterOptions(workers=1, piece_bytes=200), progress=False)
    assert not (tmp_path / "idx").exists()


def test_without_ray_the_same_command_runs_in_a_process_pool(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cluster_build, "ray_available", lambda: False)
    inputs, _ = _corpus(tmp_path)
    with caplog.at_level(logging.WARNING):
        report = build_index_distributed(inputs[:1], TOK, tmp_path / "idx", cluster=ClusterOptions(engine="ray", workers=1),
                                         progress=False)
    assert report.engine == "pool" and "ray is not installed" in caplog.text
    with pytest.raises(ImportError, match=r"retrospec\[ray\]"):
        build_index_distributed(inputs[:1], TOK, tmp_path / "idx2", cluster=ClusterOptions(engine="ray", address="auto"),
                                progress=False)


# --------------------------------------------------------------------------- on a local Ray instance
@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (2 CPUs) for this module's Ray tests; its workers import the
    test modules (the tokenizer and the killing task are sent by reference)."""
    ray = pytest.importorskip("ray")
    tests = str(Path(__file__).resolve().parent)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([tests, *([old] if old else [])])
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")  # else Ray replaces builtins.print (later tests compare it by name)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20, configure_logging=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def test_a_ray_build_equals_the_single_process_build(tmp_path, local_ray):
    """Same shards byte for byte, and so the same `index query` answers: 1,000 drafts compared."""
    inputs, docs = _corpus(tmp_path)
    options = BuildOptions(shard_tokens=1500)
    build_index(inputs, TOK, tmp_path / "one", options, progress=False)
    report = build_index_distributed(inputs, TOK, tmp_path / "ray", options, ReadOptions(),
                                     ClusterOptions(engine="ray", piece_bytes=700), progress=False)
    assert report.engine == "ray" and report.shards > 3
    _same_index(tmp_path / "one", tmp_path / "ray")
    verify_index(tmp_path / "ray", tokenizer=TOK)
    one, ray = (SuffixIndex.open(tmp_path / p, tokenizer=TOK, config=SuffixConfig(min_ngram=1)) for p in ("one", "ray"))
    rng = np.random.default_rng(1)
    nonempty = 0
    for i in rng.integers(0, len(docs), 1000):
        context = np.asarray(docs[i][: int(rng.integers(1, len(docs[i]) + 1))] or [1], np.int64)
        a, b = one.query(context, 32), ray.query(context, 32)
        assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist()
        assert np.array_equal(a.scores, b.scores)
        nonempty += len(a) > 0
    assert nonempty > 800


def test_a_killed_ray_worker_is_retried_by_ray(tmp_path, local_ray):
    inputs, _ = _corpus(tmp_path)
    options = BuildOptions(shard_tokens=1500)
    build_index(inputs, TOK, tmp_path / "one", options, progress=False)
    build_index_distributed(inputs, TOK, tmp_path / "ray", options, ReadOptions(), ClusterOptions(engine="ray"),
                            progress=False, shard_fn=killing_shard)
    assert (tmp_path / "killed-shard-00001").exists()
    _same_index(tmp_path / "one", tmp_path / "ray")
    verify_index(tmp_path / "ray")


def test_a_task_error_on_ray_is_the_build_error(tmp_path, local_ray):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": "1 2 3"}) + "\n" for _ in range(50)) + "{oops\n")
    build_index(_corpus(tmp_path)[0][:1], TOK, tmp_path / "idx", progress=False)  # the previous index
    before = (tmp_path / "idx" / "manifest.json").read_bytes()
    with pytest.raises(CorpusError, match=r"c.jsonl \(line 3 of the piece at byte 864: byte 900\): not valid JSON"):
        build_index_distributed([path], TOK, tmp_path / "idx", cluster=ClusterOptions(engine="ray", piece_bytes=200), progress=False)
    assert (tmp_path / "idx" / "manifest.json").read_bytes() == before
