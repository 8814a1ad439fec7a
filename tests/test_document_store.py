"""The document store: dense + lexical retrieval, the document source over it, failure modes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import retrospec
from retrospec.datastores.corpus import Document
from retrospec.datastores.documents import DocumentStore, build_document_store, chunk_spans, gram_keys
from retrospec.datastores.files import IndexFormatError

DOCS = [
    "The Harlow Lighthouse was completed in 1871 and electrified in 1934. Its tower is 31 metres tall.",
    "Gull Island has no permanent residents. A ferry from Port Harlow runs twice a day in summer.",
    "Margaret Olsen was the last keeper of the lighthouse; she moved to the mainland in 1998.",
    "Sourdough bread rises slowly because wild yeast ferments the dough over many hours.",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory, smollm2):
    _, tokenizer = smollm2
    path = tmp_path_factory.mktemp("store") / "docs"
    report = build_document_store(None, tokenizer, path, documents=[Document(t, f"d{i}", {}) for i, t in enumerate(DOCS)],
                                  chunk_tokens=16, overlap=4, progress=False)
    assert report["documents"] == 4 and report["chunks"] > 4
    return DocumentStore.open(path, tokenizer=tokenizer), tokenizer, path


def test_chunking_and_gram_keys():
    assert chunk_spans(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert chunk_spans(3, 4, 1) == [(0, 3)]
    keys = gram_keys([1, 2, 3, 1, 2, 3])
    assert keys[0] == keys[3] and len(set(keys.tolist())) == 3


@pytest.mark.real
def test_dense_lexical_and_hybrid_search(store):
    docs, tokenizer, _ = store
    for mode in ("dense", "lexical", "hybrid"):
        hits = docs.search("Who was the last lighthouse keeper?", 2, mode=mode, tokenizer=tokenizer)
        assert hits and hits[0].document == 2, mode
    assert docs.search("how does bread rise", 1, mode="dense")[0].document == 3
    with pytest.raises(ValueError, match="tokenizer"):
        docs.search("x", 1, mode="lexical")
    # which chunks contain a token sequence: an intersection of n-gram bitmaps
    ids = tokenizer(" electrified in 1934", add_special_tokens=False).input_ids
    chunks = list(docs.chunks_containing(ids))
    assert chunks and all("electrified" in docs.chunk_text(c)[1] for c in chunks)
    assert docs.describe()["documents"] == 4


@pytest.mark.real
def test_document_source_retrieves_from_the_store(store):
    docs, tokenizer, _ = store
    source = retrospec.DocumentSource(tokenizer, store=docs)
    prompt = np.asarray(tokenizer("When was the Harlow Lighthouse completed? It was completed in", add_special_tokens=False).input_ids)
    tree = source.start_request(prompt).propose(prompt, 16, 6)  # digits are one token each
    assert tokenizer.decode(tree.paths()[0]).startswith(" 1871")


@pytest.mark.real
def test_a_damaged_store_is_refused(store, tmp_path):
    import shutil

    _, tokenizer, path = store
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    dense = broken / "dense.faiss"
    dense.write_bytes(dense.read_bytes()[:100])
    with pytest.raises(IndexFormatError, match=r"dense\.faiss: .* bytes, the manifest says"):
        DocumentStore.open(broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["format_version"] = 7
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="newer"):
        DocumentStore.open(broken)
    with pytest.raises(ValueError, match="no documents"):
        build_document_store(None, tokenizer, tmp_path / "empty", documents=[Document("  ", "x", {})])


@pytest.mark.real
def test_stores_are_validated_hashed_and_verified(store, tmp_path):
    import shutil

    from helpers import edit_manifest, forge_file

    from retrospec.datastores.documents import verify_store

    _, tokenizer, path = store
    assert verify_store(path, tokenizer=tokenizer)["chunks"] > 4
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    raw = bytearray((copy / "docs.sqlite").read_bytes())
    raw[len(raw) // 2] ^= 0x20  # small stores are hashed whole on open (and large ones at the edges)
    (copy / "docs.sqlite").write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match=r"docs\.sqlite: (sha256|checksum) .*does not match"):
        DocumentStore.open(copy)
    forge_file(copy, "docs.sqlite", b"SQLite format 3\x00" + b"\x55" * 8192)  # garbage behind valid checksums
    with pytest.raises(IndexFormatError, match="not a readable"):
        verify_store(copy)
    shutil.rmtree(copy)
    shutil.copytree(path, copy)
    for edit, message in [(lambda d: d.pop("chunks"), "field chunks is missing"),
                          (lambda d: d["embedder"].update(name="../../elsewhere/model"), "embedder.name must be a string matching"),
                          (lambda d: d["files"].update({"../x": d["files"][DENSE]}), "must list exactly"),
                          (lambda d: d.update(lexical_n=None), "lexical_n must be an integer")]:
        before = (copy / "manifest.json").read_text()
        edit_manifest(copy, edit)
        with pytest.raises(IndexFormatError, match=message):
            DocumentStore.open(copy)
        (copy / "manifest.json").write_text(before)
    edit_manifest(copy, lambda d: d.update(format_version=1))
    with pytest.raises(IndexFormatError, match="rebuild"):
        DocumentStore.open(copy)


DENSE = "dense.faiss"
