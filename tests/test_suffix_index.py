"""The suffix index: hand-computed token tables, the on-disk format and its failure modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import IdTokenizer

from retrospec.datastores.corpus import CorpusError, ReadOptions
from retrospec.datastores.files import IndexFormatError
from retrospec.datastores.suffix_build import BuildOptions, build_index, merge_indexes
from retrospec.datastores.suffix_index import SuffixConfig, SuffixIndex, verify_index


def corpus(tmp_path: Path, docs: list[list[int]], name: str = "c.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": " ".join(map(str, d))}) + "\n" for d in docs))
    return path


def build(tmp_path, docs, tokenizer=None, name="idx", **options) -> SuffixIndex:
    tokenizer = tokenizer or IdTokenizer()
    build_index([corpus(tmp_path, docs, f"{name}.jsonl")], tokenizer, tmp_path / name, BuildOptions(**options), progress=False)
    return SuffixIndex.open(tmp_path / name, tokenizer=tokenizer)


def q(index, context, **kw):
    return index.query(np.array(context), **kw)


def test_longest_suffix_and_all_its_continuations(tmp_path):
    index = build(tmp_path, [[1, 2, 3, 4, 5], [2, 3, 9, 9], [8, 3, 7]])
    index.config = SuffixConfig(min_ngram=1, max_depth=2)
    # "2 3" occurs twice: followed by 4 5 and by 9 9 (not 7: that one is "8 3")
    assert sorted(q(index, [7, 2, 3]).paths()) == [[4, 5], [9, 9]]
    # "1 2 3" occurs once: only its continuation
    assert q(index, [1, 2, 3]).paths() == [[4, 5]]
    # no suffix occurs
    assert len(q(index, [42])) == 0


def test_matches_and_continuations_stop_at_document_boundaries(tmp_path):
    index = build(tmp_path, [[5, 6], [7, 8]])
    index.config = SuffixConfig(min_ngram=1)
    assert len(q(index, [5, 6])) == 0  # 7 8 belongs to the next document
    assert q(index, [6, 7]).paths() == [[8]]  # "6 7" never occurs across the boundary: "7" -> 8


def test_counts_become_scores(tmp_path):
    index = build(tmp_path, [[1, 2, 3]] * 3 + [[1, 2, 4]])
    index.config = SuffixConfig(min_ngram=1, max_depth=1)
    tree = q(index, [1, 2])
    scores = dict(zip(tree.tokens.tolist(), tree.scores.tolist()))
    # share 3/(4+1) vs 1/(4+1), both times the confidence of a 2-token match (2/3)
    assert scores[3] == pytest.approx(3 / 5 * 2 / 3) and scores[4] == pytest.approx(1 / 5 * 2 / 3)


def test_max_matches_caps_the_occurrences(tmp_path):
    docs = [[1, 2, 10 + i] for i in range(10)]
    index = build(tmp_path, docs)
    index.config = SuffixConfig(min_ngram=1, max_matches=4, max_depth=1)
    assert len(q(index, [1, 2])) == 4
    index.config = SuffixConfig(min_ngram=1, max_matches=64, max_depth=1)
    assert len(q(index, [1, 2])) == 10


def test_min_ngram(tmp_path):
    index = build(tmp_path, [[1, 2, 3]])
    assert len(q(index, [9, 2])) == 0  # a 1-token match is below the default min_ngram of 2
    index.config = SuffixConfig(min_ngram=1)
    assert q(index, [9, 2]).paths() == [[3]]


def test_vocabulary_beyond_65536(tmp_path):
    big = IdTokenizer(vocab_size=200_000, name="big")
    index = build(tmp_path, [[150_000, 199_999, 70_000, 5]], tokenizer=big)
    assert index.shards[0].token_bits == 3  # 4 distinct tokens and the separator: 3 bits each
    assert q(index, [150_000, 199_999], max_nodes=8).paths() == [[70_000, 5]]


def test_more_than_65535_distinct_tokens_take_three_bytes(tmp_path):
    big = IdTokenizer(vocab_size=100_000, name="big")
    doc = list(range(70_000)) + [3, 4, 5]
    index = build(tmp_path, [doc], tokenizer=big)
    assert index.shards[0].token_bits == 17
    assert q(index, [69_998, 69_999], max_nodes=4).paths() == [[3, 4, 5]]


def test_shards_are_queried_together(tmp_path):
    docs = [[1, 2, 3, 4], [1, 2, 3, 5], [9, 1, 2, 3, 4]]
    one = build(tmp_path, docs, name="one")
    many = build(tmp_path, docs, name="many", shard_tokens=4)
    assert len(many.shards) == 3
    assert sorted(q(one, [1, 2, 3]).paths()) == sorted(q(many, [1, 2, 3]).paths()) == [[4], [5]]


def test_a_different_tokenizer_is_refused(tmp_path):
    build(tmp_path, [[1, 2, 3]])
    with pytest.raises(IndexFormatError, match="built with tokenizer 'ids'"):
        SuffixIndex.open(tmp_path / "idx", tokenizer=IdTokenizer(vocab_size=101, name="other"))


def test_a_newer_format_is_refused(tmp_path):
    build(tmp_path, [[1, 2, 3]])
    manifest = tmp_path / "idx" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match="format version 99 is newer"):
        SuffixIndex.open(tmp_path / "idx")


def test_truncated_and_corrupted_files_name_the_file(tmp_path):
    build(tmp_path, [[1, 2, 3, 4, 5, 6]])
    sa = tmp_path / "idx" / "shard-00000" / "sa.bin"
    data = sa.read_bytes()
    sa.write_bytes(data[:-4])
    with pytest.raises(IndexFormatError, match=r"sa\.bin: .* bytes, the manifest says"):
        SuffixIndex.open(tmp_path / "idx")
    sa.write_bytes(data[:-4] + b"\xff\xff\xff\x7f")
    with pytest.raises(IndexFormatError, match=r"sa\.bin: checksum"):
        SuffixIndex.open(tmp_path / "idx")
    (tmp_path / "idx" / "manifest.json").unlink()
    with pytest.raises(IndexFormatError, match="not a retrospec index"):
        SuffixIndex.open(tmp_path / "idx")


def test_corruption_in_the_middle_of_a_large_file_is_found_by_verify(tmp_path):
    rng = np.random.default_rng(0)
    build(tmp_path, [rng.integers(0, 100, 200_000).tolist()])
    assert verify_index(tmp_path / "idx")["tokens_checked"] == 200_001
    tokens = tmp_path / "idx" / "shard-00000" / "tokens.bin"
    raw = bytearray(tokens.read_bytes())
    assert len(raw) > 2 * (1 << 16)
    raw[len(raw) // 2] ^= 0x01
    tokens.write_bytes(bytes(raw))
    SuffixIndex.open(tmp_path / "idx")  # O(1) open checks only the edges
    with pytest.raises(IndexFormatError, match="sha256 does not match"):
        verify_index(tmp_path / "idx")


def test_an_interrupted_build_leaves_the_previous_index_untouched(tmp_path, monkeypatch):
    from retrospec.datastores import suffix_build as build_module

    build(tmp_path, [[1, 2, 3, 4]])
    before = sorted(p.name for p in tmp_path.iterdir())

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "write_shard", boom)
    with pytest.raises(KeyboardInterrupt):
        build_index([corpus(tmp_path, [[7, 8, 9]], "new.jsonl")], IdTokenizer(), tmp_path / "idx", progress=False)
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == sorted(before + ["new.jsonl"])  # and no temporary directory left behind
    index = SuffixIndex.open(tmp_path / "idx")
    index.config = SuffixConfig(min_ngram=1)
    assert q(index, [2, 3]).paths() == [[4]]


def test_append_and_merge(tmp_path):
    tok = IdTokenizer()
    build(tmp_path, [[1, 2, 3]])
    build_index([corpus(tmp_path, [[4, 5, 6]], "more.jsonl")], tok, tmp_path / "idx", append=True, progress=False)
    both = SuffixIndex.open(tmp_path / "idx")
    both.config = SuffixConfig(min_ngram=1)
    assert both.n_documents == 2 and len(both.shards) == 2
    assert q(both, [1, 2]).paths() == [[3]] and q(both, [4, 5]).paths() == [[6]]
    build(tmp_path, [[7, 8, 9]], name="other")
    merged_info = merge_indexes([tmp_path / "idx", tmp_path / "other"], tmp_path / "merged")
    assert merged_info["documents"] == 3
    merged = SuffixIndex.open(tmp_path / "merged")
    merged.config = SuffixConfig(min_ngram=1)
    assert q(merged, [7, 8]).paths() == [[9]] and q(merged, [1, 2]).paths() == [[3]]
    build(tmp_path, [[1]], tokenizer=IdTokenizer(50, "x"), name="foreign")
    with pytest.raises(IndexFormatError, match="different tokenizers"):
        merge_indexes([tmp_path / "idx", tmp_path / "foreign"], tmp_path / "bad")


def test_empty_and_unreadable_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CorpusError, match="no text to index"):
        build_index([empty], IdTokenizer(), tmp_path / "idx", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1 2"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: not valid JSON"):
        build_index([bad], IdTokenizer(), tmp_path / "idx", progress=False)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "1 2"}\n')
    with pytest.raises(CorpusError, match="--field"):
        build_index([nofield], IdTokenizer(), tmp_path / "idx", progress=False)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(CorpusError, match=r"blob.txt: unreadable"):
        build_index([binary], IdTokenizer(), tmp_path / "idx", progress=False)
    assert not (tmp_path / "idx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx")]


def test_source_tree_input(tmp_path):
    tree = tmp_path / "src"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "a.py").write_text("1 2 3")
    (tree / "pkg" / "b.py").write_text("4 5 6")
    (tree / "notes.bin").write_text("7 8 9")
    build_index([tree], IdTokenizer(), tmp_path / "idx", progress=False)
    index = SuffixIndex.open(tmp_path / "idx")
    assert index.n_documents == 2  # .bin is not a source pattern
    build_index([tree], IdTokenizer(), tmp_path / "idx", read=ReadOptions(exclude=("pkg/b.py",)), progress=False)
    assert SuffixIndex.open(tmp_path / "idx").n_documents == 1


def test_cached_top_levels_change_nothing_but_the_pages_touched(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 12, rng.integers(5, 60)).tolist() for _ in range(80)]  # small alphabet: many repeats
    build(tmp_path, docs)
    cached = SuffixIndex.open(tmp_path / "idx", config=SuffixConfig(cached_levels=16))
    plain = SuffixIndex.open(tmp_path / "idx", config=SuffixConfig(cached_levels=0))
    assert plain.shards[0].top.filled.shape[0] == 1  # nothing cached
    for _ in range(300):
        doc = docs[rng.integers(len(docs))]
        cut = int(rng.integers(1, len(doc) + 1))
        context = np.asarray(doc[:cut] if rng.random() < 0.8 else rng.integers(1, 14, 6), np.int64)
        a, b = cached.query(context, 32), plain.query(context, 32)
        assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist()
        assert np.allclose(a.scores, b.scores)
    top = cached.shards[0].top
    n = cached.shards[0].n
    assert top.filled.shape[0] == 1 << (n.bit_length() - 1)  # as many levels as the shard has
    assert 0 < int(top.filled.sum()) <= top.filled.shape[0]
    with pytest.raises(ValueError, match="cached_levels"):
        SuffixConfig(cached_levels=30)


def test_row_ranges_equal_a_brute_force_scan_with_and_without_top_levels():
    from retrospec.datastores.suffix_index import TopLevels, bits_for, pack_bits, sa_range

    rng = np.random.default_rng(1)
    for trial in range(20):
        n = int(rng.integers(1, 400))
        tokens = rng.integers(0, 1 + trial % 5 + 1, n)  # alphabets of 2..6: long runs of equal rows
        sa = np.array(sorted(range(n), key=lambda i: tokens[i:].tolist()), np.int64)
        tw, sw = bits_for(int(tokens.max())), bits_for(n)
        tok, packed = pack_bits(tokens.astype(np.int64), tw), pack_bits(sa, sw)
        top = TopLevels.empty(max(1, n.bit_length() - 2), 4)  # fewer levels than the search: both paths run
        for _ in range(30):
            m = int(rng.integers(1, 7))
            pattern = rng.integers(0, 1 + trial % 5 + 1, m)
            rows = [r for r in range(n) if tokens[sa[r] : sa[r] + m].tolist() == pattern.tolist()]
            want = (rows[0], rows[-1] + 1) if rows else None
            for levels in ((), (top,)):
                got = sa_range(tok, tw, packed, sw, n, pattern, m, *levels)
                if want is None:
                    assert got[0] == got[1]
                else:
                    assert got == want, (trial, pattern, got, want)


def test_only_large_indexes_release_their_pages(tmp_path, monkeypatch):
    index = build(tmp_path, [[1, 2, 3, 4], [2, 3, 5]])
    released = []
    monkeypatch.setattr(index, "release_pages", lambda: released.append(1))
    index.config = SuffixConfig(release_every=2)  # a few hundred bytes: under release_above_mb
    for _ in range(4):
        index.query(np.array([2, 3]))
    assert released == []
    index.config = SuffixConfig(release_every=2, release_above_mb=0)
    for _ in range(4):
        index.query(np.array([2, 3]))
    assert len(released) == 2


def test_a_budget_of_mapped_pages_releases_them_whatever_the_query_count(tmp_path, monkeypatch):
    """release_mapped_mb: released once the process's file pages grew past the budget since the
    last release (here 1 MB = 256 pages of 4 KiB, counted by a stand-in for /proc/self/statm)."""
    from retrospec.datastores import suffix_index

    index = build(tmp_path, [[1, 2, 3, 4], [2, 3, 5]])
    index.config = SuffixConfig(release_every=0, release_above_mb=0, release_mapped_mb=1)
    monkeypatch.setattr(suffix_index, "PAGE_BYTES", 4096)
    pages = iter(range(0, 10_000, 100))  # each look at statm: 100 more pages
    monkeypatch.setattr(index, "_mapped_pages", lambda: next(pages))
    released = []
    real = index.release_pages

    def release():
        released.append(index._queries)
        real()

    monkeypatch.setattr(index, "release_pages", release)
    for _ in range(8):
        index.query(np.array([2, 3]))
    # statm after query 1: 0 (the baseline), 2: 100, 3: 200, 4: 300 pages > 256: released (baseline 400);
    # 5: 500, 6: 600, 7: 700 > 400 + 256: released
    assert released == [4, 7]
    assert SuffixIndex.open(tmp_path / "idx")._mapped_pages() > 0  # the real statm on Linux


LEAN_QUERY = """
import json, sys
import numpy as np
from retrospec.datastores.suffix_index import SuffixConfig, SuffixIndex
index = SuffixIndex.open(sys.argv[1], config=SuffixConfig(reads=sys.argv[3]))
assert index.reads == sys.argv[3]
trees = [index.query(np.asarray(c, np.int64), 32) for c in json.loads(sys.argv[2])]
print(json.dumps({"numba": "numba" in sys.modules, "torch": "torch" in sys.modules,
                  "trees": [[t.tokens.tolist(), t.parents.tolist(), t.scores.tolist()] for t in trees]}))
"""


@pytest.mark.parametrize("reads", ["mapped", "pread"])
def test_a_lean_process_without_numba_queries_the_same(tmp_path, reads):
    """RETROSPEC_JIT=0 runs the kernels as plain Python (no numba: a 500M-token index query
    process peaks at ~70 MB instead of ~210):
    same trees as the compiled kernels, over two shards and texts > 65,535 ids, whichever
    way the lean process reads the files."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 9, rng.integers(5, 50)).tolist() for _ in range(60)] + [[70000, 70001, 3, 4]]
    build(tmp_path, docs, tokenizer=IdTokenizer(80000), shard_tokens=600)
    index = SuffixIndex.open(tmp_path / "idx")
    assert len(index.shards) >= 2
    contexts = [docs[i][: int(rng.integers(1, len(docs[i]) + 1))] for i in rng.integers(0, len(docs), 40)] + [[70000, 70001]]
    run = subprocess.run([sys.executable, "-c", LEAN_QUERY, str(tmp_path / "idx"), json.dumps(contexts), reads],
                         capture_output=True, text=True, env={**os.environ, "RETROSPEC_JIT": "0"}, check=True)
    lean = json.loads(run.stdout)
    assert lean["numba"] is False and lean["torch"] is False
    for context, (tokens, parents, scores) in zip(contexts, lean["trees"]):
        tree = index.query(np.asarray(context, np.int64), 32)
        assert tokens == tree.tokens.tolist() and parents == tree.parents.tolist()
        assert np.allclose(scores, tree.scores)
    assert any(tokens for tokens, _, _ in lean["trees"])


@pytest.mark.parametrize("levels", [16, 0])
def test_pread_reads_draft_what_mapped_reads_draft_and_map_nothing(tmp_path, monkeypatch, levels):
    """reads="pread": every probe a pread of the few bytes it needs, or of a window of rows
    (texts of 3-byte tokens, shards of different sizes, matches at shard ends, short
    documents; with and without cached levels); same trees as the maps, no page released
    (nothing to release), and the files closed by close()."""
    rng = np.random.default_rng(7)
    docs = [rng.integers(1, 12, rng.integers(2, 60)).tolist() for _ in range(120)] + [[70000, 70001, 3, 4], [5]]
    build(tmp_path, docs, tokenizer=IdTokenizer(80000), shard_tokens=900)
    mapped = SuffixIndex.open(tmp_path / "idx", config=SuffixConfig(reads="mapped", max_depth=6))
    read = SuffixIndex.open(tmp_path / "idx", config=SuffixConfig(reads="pread", max_depth=6, release_every=1, release_above_mb=0,
                                                                  cached_levels=levels))
    assert len(read.shards) >= 3 and mapped.reads == "mapped" and read.reads == "pread"
    assert all(min(s.fds) >= 0 for s in read.shards) and all(s.fds == (-1, -1) for s in mapped.shards)
    monkeypatch.setattr(read, "release_pages", lambda: pytest.fail("a pread index has no pages to release"))
    contexts = [docs[i][: int(rng.integers(1, len(docs[i]) + 1))] for i in rng.integers(0, len(docs), 300)]
    contexts += [[70000, 70001], [4], [5], [11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11]]
    nonempty = 0
    for context in contexts:
        for nodes in (1, 64):
            a, b = mapped.query(np.asarray(context), nodes), read.query(np.asarray(context), nodes)
            assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist(), context
            assert np.array_equal(a.scores, b.scores)
            nonempty += a.tokens.size > 0
    assert nonempty > len(contexts)
    fds = [fd for s in read.shards for fd in s.fds]
    monkeypatch.undo()  # closed, it reads its maps, which release pages again
    read.close()
    assert read.reads == "mapped" and all(s.fds == (-1, -1) for s in read.shards)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert read.query(np.asarray(contexts[0])).tokens.tolist() == mapped.query(np.asarray(contexts[0])).tokens.tolist()


def test_auto_reads_with_pread_only_where_pages_would_be_released(tmp_path):
    build(tmp_path, [[1, 2, 3, 4], [2, 3, 5]])
    assert SuffixIndex.open(tmp_path / "idx").reads == "mapped"  # a few hundred bytes: stays mapped whole
    assert SuffixIndex.open(tmp_path / "idx", config=SuffixConfig(release_above_mb=0)).reads == "pread"
    with pytest.raises(ValueError, match="reads must be one of"):
        SuffixConfig(reads="mmap")


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    """A real fast tokenizer: it raises IndexError on an empty batch, as the issue's crash did."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _records(path, n, blank=0):
    path.write_text("".join(json.dumps({"text": f"record number {i} says hello"}) + "\n" for i in range(n)) + "\n" * blank)
    return path


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 9])
def test_batch_boundaries(tmp_path, hf_tokenizer, n):
    """batch_docs - 1, batch_docs, batch_docs + 1 (and twice that) records: the last batch is
    empty exactly when n is a multiple of batch_docs (512 records crashed the build)."""
    report = build_index([_records(tmp_path / "c.jsonl", n)], hf_tokenizer, tmp_path / "idx", BuildOptions(batch_docs=4), progress=False)
    assert report.documents == n and SuffixIndex.open(tmp_path / "idx", tokenizer=hf_tokenizer).n_documents == n
    verify_index(tmp_path / "idx")


def test_the_default_batch_size_exactly(tmp_path, hf_tokenizer):
    report = build_index([_records(tmp_path / "c.jsonl", 512)], hf_tokenizer, tmp_path / "idx", progress=False)
    assert report.documents == 512


@pytest.mark.parametrize("n, blank", [(0, 0), (0, 5)])
def test_no_records_or_only_blank_lines_is_a_clear_error(tmp_path, hf_tokenizer, n, blank):
    with pytest.raises(CorpusError, match="no text to index"):
        build_index([_records(tmp_path / "c.jsonl", n, blank)], hf_tokenizer, tmp_path / "idx", progress=False)


def test_shard_boundaries(tmp_path):
    # three documents of 4 tokens and one of 12 (24 in all): shards of 8 hold exactly two small
    # ones, of 7 one each; the 12-token one is larger than a shard and goes alone; 24 holds
    # everything, 23 one token too few
    docs = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]]
    for shard_tokens, shards in ((8, 3), (7, 4), (4, 4), (24, 1), (23, 2)):
        index = build(tmp_path, docs, name=f"s{shard_tokens}", shard_tokens=shard_tokens)
        assert len(index.shards) == shards, shard_tokens
        assert index.n_tokens == 24 and index.n_documents == 4
        verify_index(tmp_path / f"s{shard_tokens}")
        index.config = SuffixConfig(min_ngram=1)
        assert q(index, [3]).paths() == [[4]] and q(index, [20, 21]).paths() == [[22, 23, 24]]


def test_a_lone_surrogate_in_the_text_is_replaced(tmp_path, hf_tokenizer):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "broken \\ud800 surrogate"}\n{"text": "fine"}\n')
    assert build_index([path], hf_tokenizer, tmp_path / "idx", progress=False).documents == 2


def test_query_says_what_it_takes(tmp_path):
    index = build(tmp_path, [[1, 2, 3, 4]])
    index.config = SuffixConfig(min_ngram=1)
    assert index.query([2, 3]).paths() == [[4]]  # a list of ints is fine
    assert len(index.query([])) == 0
    with pytest.raises(ValueError, match="1-D token ids, got an array of shape"):
        index.query(np.array([[1, 2], [3, 4]]))
    with pytest.raises(TypeError, match="integer token ids, got dtype float64"):
        index.query(np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="1-D numpy array or list of token ids, got str"):
        index.query("1 2 3")
    with pytest.raises(TypeError, match="max_nodes must be an int"):
        index.query([1, 2], max_nodes="8")
    with pytest.raises(ValueError, match="max_depth must be >= 0"):
        index.query([1, 2], max_depth=-1)
    assert len(index.query(np.array([2**62, -5, 3]))) >= 0  # ids no shard has: no draft, no crash


def per_shard_reference(index: SuffixIndex, context: np.ndarray, max_nodes: int):
    """The query as a Python loop over shards (the form before the one fan-out kernel), built
    from the public per-shard kernels: what ``SuffixIndex.query`` must equal."""
    from retrospec.datastores.suffix_index import PENDING, gather, longest_suffix
    from retrospec.sources.trie import continuation_trie
    from retrospec.tree import DraftTree

    cfg = index.config
    tail = np.asarray(context[-cfg.max_ngram :], np.int64)
    pend = np.zeros(PENDING + 1, np.int64)
    found = []
    for shard in index.shards:
        m, lo, hi = longest_suffix(shard.tokens, shard.token_bits, shard.sa, shard.sa_bits, shard.n, shard.local(tail),
                                   cfg.max_ngram, checks=shard.checks(pend, 2))
        if m >= cfg.min_ngram:
            found.append((m, lo, hi, shard))
    if not found:
        return DraftTree.empty()
    best = max(f[0] for f in found)
    found = [f for f in found if f[0] == best]
    total = sum(hi - lo for _, lo, hi, _ in found)
    rows = np.full((cfg.max_matches + len(found), cfg.max_depth), -1, np.int64)
    used = 0
    for m, lo, hi, shard in found:
        take = max(1, (cfg.max_matches * (hi - lo)) // total)
        start = used
        used += gather(shard.tokens, shard.token_bits, shard.sa, shard.sa_bits, shard.n, lo, hi, m, take, cfg.max_depth,
                       shard.sep, rows, used, shard.checks(pend, 2))
        block = rows[start:used]
        block[block >= 0] = shard.vocab[block[block >= 0]]
    return continuation_trie(rows[:used], None, root_conf=best / (best + 1.0), decay=0.95, smoothing=1.0, max_nodes=max_nodes)


def test_the_fan_out_kernel_equals_the_per_shard_loop(tmp_path):
    """One compiled call over all shards gives, tree for tree, what a Python loop over the
    shards gives: over 12 shards with different vocabularies, counts above max_matches (the
    occurrences shared out by count) and contexts that match nowhere, in some shards, in all."""
    rng = np.random.default_rng(3)
    docs = [rng.integers(1, 30 if i % 3 else 9, rng.integers(3, 60)).tolist() for i in range(400)]
    index = build(tmp_path, docs, shard_tokens=800)
    assert len(index.shards) >= 12
    index.config = SuffixConfig(min_ngram=1, max_matches=16, max_depth=6)
    contexts = [docs[i][: int(rng.integers(1, len(docs[i]) + 1))] for i in rng.integers(0, len(docs), 300)]
    contexts += [[99], [29, 29, 29, 29], rng.integers(1, 30, 40).tolist()]
    nonempty = 0
    for context in contexts:
        got = index.query(np.asarray(context, np.int64), 48)
        want = per_shard_reference(index, np.asarray(context, np.int64), 48)
        assert got.tokens.tolist() == want.tokens.tolist() and got.parents.tolist() == want.parents.tolist()
        assert np.array_equal(got.scores, want.scores)
        nonempty += len(got) > 0
    assert nonempty > 250
