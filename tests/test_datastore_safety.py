"""Datastores as untrusted input (issue 17): never lose a user's files, never read or link
outside the index folder, name the bad field, find corruption early, survive a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import IdTokenizer, edit_manifest, forge_file

from retrospec.datastores.corpus import Document
from retrospec.datastores.files import IndexFormatError, check_out, clean_stale, publish, write_atomic
from retrospec.datastores.suffix_build import BuildOptions, build_index, merge_indexes, write_index
from retrospec.datastores.suffix_index import SuffixConfig, SuffixIndex, verify_index

TOK = IdTokenizer()


def corpus(path: Path, docs: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"text": " ".join(map(str, d))}) + "\n" for d in docs))
    return path


def build(tmp_path: Path, name: str = "idx", docs=None, block_bytes: int = 1 << 16, **kw) -> Path:
    docs = docs or [[1, 2, 3, 4, 5], [2, 3, 9, 9], [8, 3, 7]]
    build_index([corpus(tmp_path / f"{name}.jsonl", docs)], TOK, tmp_path / name, BuildOptions(block_bytes=block_bytes),
                progress=False, **kw)
    return tmp_path / name


def user_folder(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True, exist_ok=True)
    files = {"notes.txt": b"my notes", "data/table.csv": b"a,b\n1,2\n"}
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return files


def intact(path: Path, files: dict[str, bytes]) -> bool:
    return all((path / n).is_file() and (path / n).read_bytes() == d for n, d in files.items())


# --------------------------------------------------------------------------- item 1: --out
def test_a_folder_of_user_files_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    files = user_folder(out)
    for force in (False, True):
        with pytest.raises(IndexFormatError, match=r"not a retrospec index .*notes.txt"):
            build(tmp_path, "mine", force=force)
        assert intact(out, files) and not (out / "manifest.json").exists()
    other = build(tmp_path, "other")
    with pytest.raises(IndexFormatError, match="not a retrospec index"):
        merge_indexes([other, other], out, force=True)
    assert intact(out, files)
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]


def test_an_index_with_user_files_inside_is_not_replaced_even_with_force(tmp_path):
    idx = build(tmp_path)
    (idx / "README.txt").write_text("what this index is")
    for force in (False, True):
        with pytest.raises(IndexFormatError, match=r"also holds files of its own .*README.txt"):
            build(tmp_path, force=force)
    assert (idx / "README.txt").read_text() == "what this index is"


def test_a_file_or_an_index_of_another_kind_needs_force(tmp_path):
    target = tmp_path / "idx"
    target.write_text("a file the user keeps")
    with pytest.raises(IndexFormatError, match=r"is a file, not an index folder.*--force"):
        build(tmp_path)
    assert target.read_text() == "a file the user keeps"
    build(tmp_path, force=True)
    assert SuffixIndex.open(target).n_documents == 3
    other = tmp_path / "store"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "retrospec-document-store", "files": {"dense.faiss": {}}}))
    (other / "dense.faiss").write_bytes(b"x")
    with pytest.raises(IndexFormatError, match="holds a retrospec-document-store index, not a retrospec-suffix-index"):
        build(tmp_path, "store")
    build(tmp_path, "store", force=True)
    assert SuffixIndex.open(other).n_documents == 3


def test_an_index_of_the_same_kind_and_an_empty_folder_are_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    build(tmp_path, "empty")
    idx = build(tmp_path)
    build(tmp_path, docs=[[7, 8, 9]])
    index = SuffixIndex.open(idx)
    index.config = SuffixConfig(min_ngram=1)
    assert index.n_documents == 1 and index.query([7, 8]).paths() == [[9]]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_document_store_build_refuses_a_folder_of_user_files_before_any_work(tmp_path):
    from retrospec.datastores.documents import build_document_store

    files = user_folder(tmp_path / "docs")
    with pytest.raises(IndexFormatError, match="not a retrospec index"):
        build_document_store(None, TOK, tmp_path / "docs", documents=[Document("1 2 3", "d", {})], progress=False, force=True)
    assert intact(tmp_path / "docs", files)


# --------------------------------------------------------------------------- items 5, 10: manifests
EDITS = {
    "tokenizer deleted": (lambda d: d.pop("tokenizer"), "field tokenizer is missing"),
    "tokenizer null": (lambda d: d.update(tokenizer=None), "field tokenizer must be an object"),
    "dtype deleted": (
        lambda d: d["shards"][0]["files"]["shard-00000/vocab.bin"].pop("dtype"),
        r"field shards\[0\].files.shard-00000/vocab.bin.dtype is missing",
    ),
    "positions deleted": (lambda d: d["shards"][0].pop("positions"), r"shards\[0\].positions is missing"),
    "positions null": (lambda d: d["shards"][0].update(positions=None), r"shards\[0\].positions must be an integer"),
    "positions 0": (lambda d: d["shards"][0].update(positions=0), r"shards\[0\].positions must be an integer in \[15, 15\]"),
    "sep 10**30": (lambda d: d["shards"][0].update(sep=10**30), r"shards\[0\].sep must be an integer in \[1, 100\]"),
    "sep + 1": (lambda d: d["shards"][0].update(sep=d["shards"][0]["sep"] + 1), r"token_bits|vocab.bin.shape"),
    "vocab <f4": (lambda d: d["shards"][0]["files"]["shard-00000/vocab.bin"].update(dtype="<f4"), r"vocab.bin.dtype must be '<u4'"),
    "shard twice": (lambda d: d["shards"].append(d["shards"][0]), r"shards\[1\].name repeats another shard's name"),
    "tokens a string": (lambda d: d.update(tokens="16"), "field tokens must be an integer"),
    "tokens bool": (lambda d: d.update(tokens=True), "field tokens must be an integer"),
    "tokens negative": (lambda d: d.update(tokens=-5), "field tokens must be an integer"),
    "tokens huge": (lambda d: d.update(tokens=10**40), "field tokens must be an integer"),
    "shards empty": (lambda d: d.update(shards=[]), "field shards must be a list of 1"),
    "shards not a list": (lambda d: d.update(shards={"a": 1}), "field shards must be a list"),
    "block size 3": (lambda d: d["shards"][0].update(block_bytes=3), r"block_bytes must be an integer"),
    "manifest emptied": (lambda d: d.clear(), "holds a None index"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_manifest_edits_name_the_bad_field(tmp_path, edit):
    idx = build(tmp_path)
    change, message = EDITS[edit]
    edit_manifest(idx, change)  # the checksum recomputed: the schema must catch it
    for action in (SuffixIndex.open, verify_index):
        with pytest.raises(IndexFormatError, match=message):
            action(idx)


def test_an_edited_manifest_fails_its_own_checksum(tmp_path):
    idx = build(tmp_path)
    edit_manifest(idx, lambda d: d["shards"][0].update(sep=d["shards"][0]["sep"] + 1), recompute=False)
    with pytest.raises(IndexFormatError, match="does not match its own checksum"):
        SuffixIndex.open(idx)
    (idx / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(IndexFormatError, match="unreadable manifest"):
        SuffixIndex.open(idx)


def test_version_1_indexes_are_refused_with_the_way_out(tmp_path):
    idx = build(tmp_path)
    edit_manifest(idx, lambda d: d.update(format_version=1))
    with pytest.raises(IndexFormatError, match=r"format version 1 predates .* rebuild the index with `retrospec index build`"):
        SuffixIndex.open(idx)


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "secret"
    secret.mkdir(exist_ok=True)
    (secret / "key.bin").write_bytes(b"\x01" * 631)
    return secret / "key.bin"


@pytest.mark.parametrize("name", ["../secret/key.bin", "/etc/passwd", "shard-00000/../../secret/key.bin", "shard-00000//tokens.bin"])
def test_paths_that_leave_the_folder_are_refused_without_saying_anything_about_them(tmp_path, name):
    secret = _secret(tmp_path)
    idx = build(tmp_path)

    def plant(d):
        files = d["shards"][0]["files"]
        files[name] = files.pop("shard-00000/tokens.bin")

    edit_manifest(idx, plant)
    for action in (SuffixIndex.open, verify_index):
        with pytest.raises(IndexFormatError) as err:
            action(idx)
        assert "631" not in str(err.value) and "key.bin" not in str(err.value).replace(name, "")
    other = build(tmp_path, "other")
    with pytest.raises(IndexFormatError):
        merge_indexes([other, idx], tmp_path / "merged")
    assert secret.stat().st_nlink == 1 and not (tmp_path / "merged").exists()


def test_a_symbolic_link_out_of_the_folder_is_refused(tmp_path):
    secret = _secret(tmp_path)
    idx = build(tmp_path)
    tokens = idx / "shard-00000" / "tokens.bin"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.replace(tokens, elsewhere / "tokens.bin")
    tokens.symlink_to(elsewhere / "tokens.bin")  # the bytes are the right ones, but outside
    for action in (SuffixIndex.open, verify_index):
        with pytest.raises(IndexFormatError, match="symbolic link that leaves the index folder"):
            action(idx)
    other = build(tmp_path, "other")
    with pytest.raises(IndexFormatError, match="symbolic link"):
        merge_indexes([other, idx], tmp_path / "merged")
    (idx / "shard-00000" / "sa.bin").unlink()
    (idx / "shard-00000" / "sa.bin").symlink_to(secret)
    with pytest.raises(IndexFormatError) as err:
        SuffixIndex.open(idx)
    assert "631" not in str(err.value)


def test_append_creates_nothing_outside_the_index(tmp_path):
    idx = build(tmp_path)

    def escape(d):
        s = d["shards"][0]
        s["files"] = {k.replace("shard-00000", "../../escaped"): v for k, v in s["files"].items()}
        s["name"] = "../../escaped"

    edit_manifest(idx, escape)
    with pytest.raises(IndexFormatError, match="name must be a string matching"):
        build_index([corpus(tmp_path / "more.jsonl", [[4, 5, 6]])], TOK, idx, append=True, progress=False)
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()


# --------------------------------------------------------------------------- item 9: vocab ids
def test_token_ids_beyond_the_tokenizer_are_refused(tmp_path):
    idx = build(tmp_path)
    vocab = np.fromfile(idx / "shard-00000" / "vocab.bin", "<u4")
    vocab[-1] = TOK.vocab_size  # one past the last id the tokenizer has
    forge_file(idx, "shard-00000/vocab.bin", vocab.astype("<u4").tobytes())
    for action in (SuffixIndex.open, verify_index):
        with pytest.raises(IndexFormatError, match="holds token id 100, beyond the tokenizer's 100 ids"):
            action(idx)
    # a hostile manifest that also claims a larger vocabulary: the tokenizer, when known, still refuses it
    vocab[-1] = 150
    forge_file(idx, "shard-00000/vocab.bin", vocab.astype("<u4").tobytes())
    edit_manifest(idx, lambda d: d["tokenizer"].update(vocab_size=200))
    SuffixIndex.open(idx)
    for action in (SuffixIndex.open, verify_index):
        with pytest.raises(IndexFormatError, match="beyond the tokenizer's 100 ids"):
            action(idx, tokenizer=TOK)


def test_a_garbage_docs_db_is_caught_by_verify_append_and_merge(tmp_path):
    idx = build(tmp_path)
    other = build(tmp_path, "other")
    forge_file(idx, "docs.sqlite", b"SQLite format 3\x00" + b"\x17" * 4000)
    with pytest.raises(IndexFormatError, match=r"docs.sqlite: not a readable SQLite database"):
        verify_index(idx)
    with pytest.raises(IndexFormatError, match=r"docs.sqlite: not a readable SQLite database"):
        build_index([corpus(tmp_path / "more.jsonl", [[4, 5, 6]])], TOK, idx, append=True, progress=False)
    with pytest.raises(IndexFormatError, match=r"docs.sqlite: not a readable SQLite database"):
        merge_indexes([other, idx], tmp_path / "merged")
    (idx / "docs.sqlite").write_bytes(b"garbage")  # and without forging: the size says it
    with pytest.raises(IndexFormatError, match=r"docs.sqlite: 7 bytes, the manifest says"):
        verify_index(idx)


# --------------------------------------------------------------------------- item 3: blocks
def _big(tmp_path: Path, name: str = "big", **kw) -> Path:
    rng = np.random.default_rng(0)
    return build(tmp_path, name, docs=[rng.integers(1, 100, 2000).tolist() for _ in range(100)], **kw)


def _flip(path: Path, offset: int, bit: int = 0x04) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= bit
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("reads", ["mapped", "pread"])
def test_a_flipped_byte_is_found_by_the_first_query_that_reads_its_block(tmp_path, reads):
    idx = _big(tmp_path)
    config = SuffixConfig(reads=reads)
    index = SuffixIndex.open(idx, config=config)
    shard = index.shards[0]
    row_byte = (shard.n // 2 * shard.sa_bits) // 8  # every binary search reads the middle row first
    assert 1 << 16 < row_byte < shard.sa.shape[0] - (1 << 16)
    context = shard.vocab[shard.token_ids(100, 104)].astype(np.int64)
    good = index.query(context)
    _flip(idx / "shard-00000" / "sa.bin", row_byte)
    index = SuffixIndex.open(idx, config=config)  # sizes and edges are fine: open cannot see it
    with pytest.raises(IndexFormatError, match=r"sa\.bin: block \d+ .* does not match its checksum"):
        index.query(context)
    with pytest.raises(IndexFormatError, match="does not match its checksum"):  # and the shard stays off
        index.query(context)
    _flip(idx / "shard-00000" / "sa.bin", row_byte)  # restored
    again = SuffixIndex.open(idx, config=config)
    assert again.query(context).tokens.tolist() == good.tokens.tolist()
    assert int((again.shards[0].sa_state == 1).sum()) > 0  # the blocks it read are verified now


def test_a_file_cut_short_after_open_is_refused_by_pread_queries(tmp_path):
    """A mapped file cut short would raise SIGBUS on the next page touched; a pread index
    sees the short read, refuses the shard and says why."""
    idx = _big(tmp_path)
    index = SuffixIndex.open(idx, config=SuffixConfig(reads="pread"))
    shard = index.shards[0]
    context = shard.vocab[shard.token_ids(100, 104)].astype(np.int64)
    assert index.query(context).tokens.size > 0
    os.truncate(idx / "shard-00000" / "sa.bin", 4096)
    with pytest.raises(IndexFormatError, match=r"shorter than when the index was opened"):
        index.query(context[::-1].copy())
    with pytest.raises(IndexFormatError, match=r"shorter than when"):  # the shard stays off
        index.query(context)


def test_blocks_far_from_a_query_are_not_read_and_cost_nothing(tmp_path):
    idx = _big(tmp_path, block_bytes=1 << 12)
    index = SuffixIndex.open(idx)
    index.query(index.shards[0].vocab[index.shards[0].token_ids(10, 14)].astype(np.int64))
    shard = index.shards[0]
    touched = int((shard.sa_state == 1).sum())
    assert 0 < touched < shard.sa_state.size // 2 and (shard.sa_state != 1).sum() == shard.sa_state.size - touched


LEAN_CORRUPT = """
import sys
import numpy as np
from retrospec.datastores.files import IndexFormatError
from retrospec.datastores.suffix_index import SuffixIndex, verify_index
index = SuffixIndex.open(sys.argv[1])
try:
    index.query(np.asarray([int(x) for x in sys.argv[2].split()], np.int64))
except IndexFormatError as err:
    print("query:", "checksum" in str(err))
try:
    verify_index(sys.argv[1])
except IndexFormatError as err:
    print("verify:", "sha256 does not match" in str(err))
"""


def test_interpreted_kernels_find_the_bad_block_too(tmp_path):
    idx = _big(tmp_path)
    index = SuffixIndex.open(idx)
    shard = index.shards[0]
    context = " ".join(map(str, shard.vocab[shard.token_ids(100, 104)].tolist()))
    _flip(idx / "shard-00000" / "sa.bin", (shard.n // 2 * shard.sa_bits) // 8)
    run = subprocess.run([sys.executable, "-c", LEAN_CORRUPT, str(idx), context], capture_output=True, text=True,
                         env={**os.environ, "RETROSPEC_JIT": "0"}, check=True)
    assert run.stdout.split() == ["query:", "True", "verify:", "True"]


# --------------------------------------------------------------------------- item 4: verify
def _repetitive(tmp_path: Path, tokens: int, name: str = "rep") -> Path:
    doc = np.random.default_rng(1).integers(0, 100, 1000)

    def docs(report):
        for i in range(tokens // 1000):
            yield doc, Document("", f"copy {i}", {})

    write_index(docs, _identity(), tmp_path / name, BuildOptions(), progress=False)
    return tmp_path / name


def _identity() -> dict:
    from retrospec.datastores.files import tokenizer_identity

    return tokenizer_identity(TOK)


def test_verify_is_linear_on_repeated_documents(tmp_path):
    """The old adjacent-suffix comparison took 91 s on 80k tokens of repeated documents."""
    idx = _repetitive(tmp_path, 200_000)
    start = time.perf_counter()
    assert verify_index(idx)["tokens_checked"] == 200_200
    assert time.perf_counter() - start < 10


def _swap_rows(idx: Path, a: int, b: int) -> None:
    from retrospec.datastores.suffix_index import pack_bits

    index = SuffixIndex.open(idx)
    shard = index.shards[0]
    sa = np.array([shard.sa_entry(r) for r in range(shard.n)], np.int64)
    sa[a], sa[b] = sa[b], sa[a]
    forge_file(idx, "shard-00000/sa.bin", pack_bits(sa, shard.sa_bits).tobytes())


def test_verify_finds_a_suffix_array_out_of_order_behind_valid_checksums(tmp_path):
    idx = _repetitive(tmp_path, 20_000)  # long common prefixes: the order is wrong only deep down
    _swap_rows(idx, 700, 701)  # rows the open's spot check does not sample
    SuffixIndex.open(idx)
    with pytest.raises(IndexFormatError, match="not the sorted permutation at row 701"):
        verify_index(idx)
    lean = subprocess.run([sys.executable, "-c", "import sys; from retrospec.datastores.suffix_index import verify_index\n"
                           "try:\n verify_index(sys.argv[1])\nexcept ValueError as e: print(e)", str(idx)],
                          capture_output=True, text=True, env={**os.environ, "RETROSPEC_JIT": "0"}, check=True)
    assert "not the sorted permutation at row 701" in lean.stdout


# --------------------------------------------------------------------------- item 11: publish
KILL_AT = """
import os, signal, sys
from pathlib import Path
from retrospec.datastores import files
from retrospec.datastores.suffix_build import build_index
sys.path.insert(0, sys.argv[4])
from helpers import IdTokenizer
real, calls = os.replace, []
def dying(src, dst):
    calls.append(dst)
    if len(calls) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
files.os.replace = dying
build_index([Path(sys.argv[2])], IdTokenizer(), Path(sys.argv[1]), progress=False)
"""


@pytest.mark.parametrize("kill_at", [3, 4])
def test_a_build_killed_inside_publish_is_recovered_by_the_next_open(tmp_path, kill_at):
    """os.replace calls of a build that replaces an index: 1 the manifest's atomic write,
    2 the journal's staged note, 3 the old index aside, 4 the new one in. Killed at 3 (just
    after the journal) the old index survives; killed at 4 (between the renames) the new
    one is moved in. Either way the next open finds a complete index and no leftovers."""
    idx = build(tmp_path)
    new = corpus(tmp_path / "new.jsonl", [[7, 8, 9]])
    run = subprocess.run([sys.executable, "-c", KILL_AT, str(idx), str(new), str(kill_at), str(Path(__file__).parent)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == -signal.SIGKILL, run.stderr
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.")]
    assert any(".publish" in h for h in hidden)
    if kill_at == 4:
        assert not idx.exists()  # the state the old code left for good
    index = SuffixIndex.open(idx)
    assert index.n_documents == (3 if kill_at == 3 else 1)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.")] == []


def test_stale_build_folders_of_dead_processes_are_removed(tmp_path):
    from retrospec.datastores import files

    idx = build(tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    stale = tmp_path / f".idx.building-{files._HOST}-{dead}-0123abcd"
    live = tmp_path / f".idx.building-{files._HOST}-{os.getpid()}-0123abcd"
    foreign = tmp_path / f".idx.building-ffffff-{dead}-0123abcd"
    for d in (stale, live, foreign):
        d.mkdir()
    (tmp_path / ".idx.building-not-ours").mkdir()
    assert clean_stale(idx) == [stale.name]
    assert live.exists() and foreign.exists() and (tmp_path / ".idx.building-not-ours").exists()
    stale.mkdir()
    build(tmp_path)  # a build cleans up the same way
    assert not stale.exists() and live.exists()


def test_publish_refuses_a_half_built_folder(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(IndexFormatError, match="without a manifest"):
        publish(tmp_path / "half", tmp_path / "idx")


# --------------------------------------------------------------------------- item 12: atomic writes
def test_write_atomic_never_follows_a_planted_link_and_leaves_no_temporary(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "out.bin"
    target.symlink_to(victim)
    os.symlink(victim, tmp_path / f".out.bin.{os.getpid()}.tmp")  # the old code's predictable name
    write_atomic(target, b"new")
    assert victim.read_text() == "keep me" and not target.is_symlink() and target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".out.bin.{os.getpid()}.tmp", "out.bin", "victim.txt"])


def test_threads_writing_one_path_never_collide(tmp_path):
    target = tmp_path / "shared.bin"
    errors = []

    def work(i):
        try:
            for _ in range(20):
                write_atomic(target, bytes([i]) * 10_000)
        except Exception as err:  # pragma: no cover - what the test looks for
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = target.read_bytes()
    assert not errors and len(data) == 10_000 and len(set(data)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_check_out_explains_itself(tmp_path):
    check_out(tmp_path / "absent", "retrospec-suffix-index")
    (tmp_path / "f").write_text("x")
    with pytest.raises(IndexFormatError, match="is a file"):
        check_out(tmp_path / "f", "retrospec-suffix-index")
    check_out(tmp_path / "f", "retrospec-suffix-index", force=True)
