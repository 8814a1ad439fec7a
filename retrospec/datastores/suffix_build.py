"""Building suffix indexes: tokenize documents, write shards, publish atomically.

Documents are tokenized in batches and cut into shards of at most ``shard_tokens``
tokens (so each suffix-array construction stays within memory, and shards are the unit a
distributed build produces). For each shard:

1. concatenate its documents, each followed by a separator;
2. map token ids to the shard's own dense vocabulary (the separator is one past its last
   id) and bit-pack them in the fewest bits that hold it: 16-17 bits for typical corpora,
   whatever the model's vocabulary size;
3. build the suffix array with libdivsufsort (``pydivsufsort``) and bit-pack it too
   (24 bits for a 10M-token shard);
4. write ``tokens.bin``, ``sa.bin`` and ``vocab.bin`` raw, a crc32 per block of the first
   two (``tokens.crc``, ``sa.crc``: checked lazily by queries), and sizes and checksums of
   all five in the manifest.

Everything is written into a temporary directory beside ``--out`` and swapped into place at
the end (see :func:`~retrospec.datastores.files.building`): an interrupted build leaves any
previous index untouched, and ``--out`` must be absent, empty or an index of the same kind
(never a folder of other files). Appending and merging read the inputs as untrusted: their
manifests are validated and only the files they list, inside their folders, are linked.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrospec.datastores.corpus import CorpusError, Document, ReadOptions, iter_documents
from retrospec.datastores.files import (
    IndexFormatError,
    building,
    check_files,
    confined,
    describe_file,
    now,
    save_array,
    tokenizer_identity,
    write_manifest,
)
from retrospec.datastores.suffix_index import (
    BLOCK_BYTES,
    DOCS_DB,
    FORMAT,
    FORMAT_VERSION,
    MAX_BLOCK_BYTES,
    MIN_BLOCK_BYTES,
    bits_for,
    block_crcs,
    check_docs_db,
    pack_bits,
    read_index_manifest,
)

log = logging.getLogger(__name__)
MAX_SHARD_TOKENS = (1 << 30) - 1  # int32 suffix arrays from libdivsufsort over the 2-byte encoding


@dataclass(frozen=True)
class BuildOptions:
    """Settings of an index build."""

    shard_tokens: int = 1 << 28
    """Most tokens per shard (each shard is one suffix array)."""
    shard_per_input: bool = False
    """Start a new shard for every input file."""
    batch_docs: int = 512
    """Documents tokenized per batch."""
    add_eos: bool = False
    """Append the tokenizer's EOS token to every document."""
    block_bytes: int = BLOCK_BYTES
    """Bytes per crc32 block of ``tokens.bin``/``sa.bin`` (a power of two, 4 KiB to 16 MiB)."""

    def __post_init__(self) -> None:
        if not MIN_BLOCK_BYTES <= self.block_bytes <= MAX_BLOCK_BYTES or self.block_bytes & (self.block_bytes - 1):
            raise ValueError(f"block_bytes must be a power of two in [{MIN_BLOCK_BYTES}, {MAX_BLOCK_BYTES}], got {self.block_bytes}")
        if not 1 <= self.shard_tokens <= MAX_SHARD_TOKENS:
            raise ValueError(f"shard_tokens must be in [1, {MAX_SHARD_TOKENS}], got {self.shard_tokens}")
        if self.batch_docs < 1:
            raise ValueError(f"batch_docs must be >= 1, got {self.batch_docs}")


@dataclass
class BuildReport:
    """What a build did, with its throughput split into tokenization and indexing."""

    path: str = ""
    documents: int = 0
    tokens: int = 0
    shards: int = 0
    bytes: int = 0
    tokenize_seconds: float = 0.0
    index_seconds: float = 0.0
    shard_names: list[str] = field(default_factory=list)

    @property
    def index_tokens_per_second(self) -> float:
        return self.tokens / self.index_seconds if self.index_seconds else 0.0

    @property
    def tokenize_tokens_per_second(self) -> float:
        return self.tokens / self.tokenize_seconds if self.tokenize_seconds else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    def summary(self) -> str:
        return (
            f"{self.documents:,} documents, {self.tokens:,} tokens in {self.shards} shard(s); "
            f"tokenization {self.tokenize_seconds:.1f}s ({self.tokenize_tokens_per_second / 1e6:.2f}M tok/s), "
            f"indexing {self.index_seconds:.1f}s ({self.index_tokens_per_second / 1e6:.2f}M tok/s); "
            f"{self.bytes / 1e6:.1f} MB, {self.bytes_per_token:.2f} bytes/token"
        )


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """The suffix array of a uint16/uint32 token array (libdivsufsort)."""
    from pydivsufsort import divsufsort

    if tokens.shape[0] == 0:
        return np.zeros(0, np.int32)
    sa = divsufsort(tokens)
    return sa.astype(np.int32 if tokens.shape[0] < (1 << 31) else np.int64, copy=False)


def write_shard(root: Path, name: str, docs: list[np.ndarray], block_bytes: int = BLOCK_BYTES) -> tuple[dict, list[tuple[int, int]]]:
    """Write one shard from documents' global token ids; return its manifest entry and each
    document's ``(start, length)`` inside the shard."""
    lengths = np.fromiter((d.shape[0] for d in docs), np.int64, len(docs))
    flat = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    entry, starts = write_shard_tokens(root, name, flat, lengths, block_bytes)
    return entry, list(zip(starts.tolist(), lengths.tolist()))


def document_starts(lengths: np.ndarray) -> np.ndarray:
    """Where each document starts inside a shard (each is followed by one separator)."""
    return np.cumsum(lengths + 1) - lengths - 1


DENSE_IDS = 1 << 26
"""Largest token id for which a shard's vocabulary is found by counting (O(n)), not sorting."""


def _local_ids(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct ids of ``flat`` (``uint32``) and each token's rank among them."""
    top = int(flat.max()) if flat.shape[0] else 0
    if top >= DENSE_IDS:  # a sparse id space: sort
        vocab = np.unique(flat).astype(np.uint32)
        return vocab, np.searchsorted(vocab, flat).astype(np.uint32)
    vocab = np.flatnonzero(np.bincount(flat, minlength=top + 1)).astype(np.uint32)
    rank = np.zeros(top + 1, np.uint32)
    rank[vocab] = np.arange(vocab.shape[0], dtype=np.uint32)
    return vocab, rank[flat]


def write_shard_tokens(root: Path, name: str, flat: np.ndarray, lengths: np.ndarray, block_bytes: int = BLOCK_BYTES
                       ) -> tuple[dict, np.ndarray]:
    """Write shard ``root/name`` from its documents' global token ids end to end (``flat``)
    and their ``lengths``; return its manifest entry and each document's start in the shard.
    The same documents give the same bytes, whoever writes them (serial or distributed)."""
    lengths = np.asarray(lengths, np.int64)
    n_docs = lengths.shape[0]
    vocab, local_ids = _local_ids(flat)
    token_bits = bits_for(vocab.shape[0])  # local ids 0..distinct-1, the separator = distinct
    sep = vocab.shape[0]
    local = np.empty(flat.shape[0] + n_docs, np.uint32)
    ends = np.cumsum(lengths + 1)  # each document is followed by a separator
    starts = ends - lengths - 1
    is_sep = np.zeros(local.shape[0], bool)
    is_sep[ends - 1] = True
    local[is_sep] = sep
    local[~is_sep] = local_ids
    del local_ids
    # sort the narrowest integer type that holds the ids: fewer bytes for libdivsufsort
    sa = suffix_array(local.astype(np.uint16) if sep < (1 << 16) else local)
    sa_bits = bits_for(max(local.shape[0] - 1, 1))
    packed_tokens, packed_sa = pack_bits(local, token_bits), pack_bits(sa, sa_bits)
    files = {
        f"{name}/tokens.bin": save_array(root, f"{name}/tokens.bin", packed_tokens),
        f"{name}/sa.bin": save_array(root, f"{name}/sa.bin", packed_sa),
        f"{name}/vocab.bin": save_array(root, f"{name}/vocab.bin", vocab),
        f"{name}/tokens.crc": save_array(root, f"{name}/tokens.crc", block_crcs(packed_tokens, block_bytes).astype("<u4")),
        f"{name}/sa.crc": save_array(root, f"{name}/sa.crc", block_crcs(packed_sa, block_bytes).astype("<u4")),
    }
    entry = {"name": name, "tokens": int(flat.shape[0]), "documents": n_docs, "positions": int(local.shape[0]),
             "sep": int(sep), "token_bits": token_bits, "sa_bits": sa_bits, "block_bytes": block_bytes, "files": files}
    return entry, starts


class _ShardWriter:
    def __init__(self, root: Path, options: BuildOptions, first_index: int, report: BuildReport):
        self.root, self.options, self.report = root, options, report
        self.next_index = first_index
        self.docs: list[np.ndarray] = []
        self.meta: list[Document] = []
        self.count = 0
        self.entries: list[dict] = []
        self.rows: list[dict] = []

    def add(self, ids: np.ndarray, doc: Document) -> None:
        if self.count and self.count + ids.shape[0] > self.options.shard_tokens:
            self.flush()
        self.docs.append(ids)
        self.meta.append(doc)
        self.count += ids.shape[0]

    def flush(self) -> None:
        if not self.docs:
            return
        name = f"shard-{self.next_index:05d}"
        self.next_index += 1
        start = time.perf_counter()
        entry, spans = write_shard(self.root, name, self.docs, self.options.block_bytes)
        self.report.index_seconds += time.perf_counter() - start
        self.entries.append(entry)
        for (offset, length), doc in zip(spans, self.meta):
            self.rows.append({"shard": name, "start": offset, "length": length, "source": doc.source,
                              "meta": doc.meta or None})
        log.info("index: %s: %d documents, %d tokens", name, len(self.docs), entry["tokens"])
        self.docs, self.meta, self.count = [], [], 0


def tokenize(tokenizer, texts: list[str], add_eos: bool) -> list[np.ndarray]:
    """Token ids of each text (no special tokens; the EOS appended when ``add_eos``)."""
    if not texts:  # a fast tokenizer given [] raises IndexError
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    return [np.asarray(x + eos, np.int64) for x in ids]


INPUT_END = None
"""Marks the end of one input in a document stream (a shard boundary with ``shard_per_input``)."""


def build_index(
    inputs: list[str | Path],
    tokenizer,
    out: str | Path,
    options: BuildOptions = BuildOptions(),
    read: ReadOptions = ReadOptions(),
    *,
    append: bool = False,
    force: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Build (or, with ``append``, extend) the suffix index at ``out`` from ``inputs``.

    ``out`` may be absent, an empty folder or a suffix index (replaced atomically); with
    ``force`` also a file or an index of another kind; a folder holding other files, never
    (see :func:`~retrospec.datastores.files.check_out`).
    """
    if not inputs:
        raise CorpusError("no inputs given")

    def tokenized(batch: list[Document], report: BuildReport):
        start = time.perf_counter()
        token_lists = tokenize(tokenizer, [d.text for d in batch], options.add_eos)
        report.tokenize_seconds += time.perf_counter() - start
        return zip(token_lists, batch)

    def token_docs(report: BuildReport):
        for item in inputs:
            batch: list[Document] = []
            for doc in iter_documents([item], read, tokenizer):
                batch.append(doc)
                if len(batch) >= options.batch_docs:
                    yield from tokenized(batch, report)
                    batch = []
            if batch:
                yield from tokenized(batch, report)
            yield INPUT_END

    info = {**asdict(read), "inputs": [str(i) for i in inputs]}
    return write_index(token_docs, tokenizer_identity(tokenizer), out, options, info, append=append, force=force, progress=progress)


def write_index(
    token_docs,
    identity: dict,
    out: str | Path,
    options: BuildOptions = BuildOptions(),
    info: dict | None = None,
    *,
    append: bool = False,
    force: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Write an index from ``token_docs(report)``, a generator of ``(token ids, Document)``
    pairs (and ``INPUT_END`` markers), for the tokenizer described by ``identity``
    (``out``, ``append``, ``force``: see :func:`build_index`)."""

    out = Path(out)
    previous = open_previous(out, identity, append)
    report = BuildReport(path=str(out))
    with building(out, FORMAT, force=force) as tmp:
        old_shards = previous.data["shards"] if previous else []
        writer = _ShardWriter(tmp, options, len(old_shards), report)
        with tqdm(desc="index build", unit="tok", unit_scale=True, disable=not progress) as bar:
            for item in token_docs(report):
                if item is INPUT_END:
                    if options.shard_per_input:
                        writer.flush()
                    continue
                ids, doc = item
                if ids.shape[0]:
                    writer.add(ids, doc)
                    report.documents += 1
                    report.tokens += ids.shape[0]
                    bar.update(ids.shape[0])
            writer.flush()
        if report.tokens == 0:
            raise CorpusError(f"the inputs hold no text to index: {', '.join((info or {}).get('inputs', []))}")
        finish_index(tmp, previous, writer.entries, writer.rows, identity, {**asdict(options), **(info or {})})
    report.shards = len(writer.entries)
    report.shard_names = [e["name"] for e in writer.entries]
    report.bytes = sum(f["bytes"] for e in writer.entries for f in e["files"].values())
    return report


def open_previous(out: Path, identity: dict, append: bool):
    """The index at ``out`` that an ``append`` build extends (checked), else ``None``."""
    if not (append and os.path.lexists(out)):
        return None
    previous = read_index_manifest(out)
    if previous.data["tokenizer"]["fingerprint"] != identity["fingerprint"]:
        raise IndexFormatError(f"{out}: built with another tokenizer ({previous.data['tokenizer']['name']!r}); cannot append")
    check_docs_db(previous.root, previous.data)
    return previous


def finish_index(tmp: Path, previous, entries: list[dict], rows: list[dict], identity: dict, build: dict) -> dict:
    """Complete the index being built in ``tmp``: the previous index's shards linked in (on
    ``append``), ``docs.sqlite`` with the new ``rows``, the manifest; return the manifest."""
    old_shards = previous.data["shards"] if previous else []
    for entry in old_shards:  # carried over as hard links: no copy of the bytes
        _link_shard(previous.root, entry, tmp, entry["name"])
    if previous is not None:
        shutil.copyfile(confined(previous.root, DOCS_DB), tmp / DOCS_DB)
    _insert_rows(tmp / DOCS_DB, rows)
    shards = old_shards + entries
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": identity,
        "tokens": sum(s["tokens"] for s in shards),
        "documents": sum(s["documents"] for s in shards),
        "shards": shards,
        "files": {DOCS_DB: describe_file(tmp / DOCS_DB)},
        "build": {**build, "appended_to": bool(previous)},
        "created": now(),
    }
    write_manifest(tmp, manifest)
    return manifest


def _link_shard(src_root: Path, entry: dict, dst_root: Path, name: str) -> dict:
    """Hard-link (else copy) the files a validated shard ``entry`` lists, from inside
    ``src_root`` only, as shard ``name`` of ``dst_root``; return the renamed entry."""
    check_files(src_root, entry["files"])
    files = {}
    for key, value in entry["files"].items():
        src = confined(src_root, key)
        dst = dst_root / name / key.rsplit("/", 1)[-1]
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        files[f"{name}/{dst.name}"] = value
    return dict(entry, name=name, files=files)


def _insert_rows(path: Path, rows: list[dict]) -> None:
    import sqlite_utils

    try:
        db = sqlite_utils.Database(path)
        db["documents"].insert_all(rows, alter=True, batch_size=10_000)
        db.conn.commit()
        db.conn.close()
    except sqlite3.DatabaseError as err:
        raise IndexFormatError(f"{path}: not a usable SQLite database ({err})") from None


def _shard_rows(root: Path, shard: str) -> list[dict]:
    """The ``documents`` rows of one shard of a checked ``docs.sqlite`` (read-only)."""
    path = confined(root, DOCS_DB)
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        con.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in con.execute("SELECT * FROM documents WHERE shard = ?", [shard])]
        finally:
            con.close()
    except sqlite3.Error as err:
        raise IndexFormatError(f"{path}: not a readable SQLite database ({err})") from None


def merge_indexes(inputs: list[str | Path], out: str | Path, *, force: bool = False) -> dict:
    """Join several indexes built with the same tokenizer into one (their shards side by side).

    Each input is validated (:func:`~retrospec.datastores.suffix_index.read_index_manifest`,
    its ``docs.sqlite`` checked whole); only the files its manifest lists, inside its folder,
    are linked. ``out`` and ``force``: see :func:`build_index`.
    """
    manifests = [read_index_manifest(p) for p in inputs]
    if len(manifests) < 2:
        raise ValueError("index merge needs at least two input indexes")
    fingerprints = {m.data["tokenizer"]["fingerprint"] for m in manifests}
    if len(fingerprints) != 1:
        raise IndexFormatError(f"cannot merge indexes built with different tokenizers: {sorted(fingerprints)}")
    for m in manifests:
        check_docs_db(m.root, m.data)
    out = Path(out)
    with building(out, FORMAT, force=force) as tmp:
        shards, rows = [], []
        for m in manifests:
            for entry in m.data["shards"]:
                name = f"shard-{len(shards):05d}"
                shards.append(_link_shard(m.root, entry, tmp, name))
                for row in _shard_rows(m.root, entry["name"]):
                    row["shard"] = name
                    row.pop("rowid", None)
                    rows.append(row)
        _insert_rows(tmp / DOCS_DB, rows)
        manifest = {k: v for k, v in manifests[0].data.items() if k != "manifest_sha256"}
        manifest.update({
            "shards": shards,
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "files": {DOCS_DB: describe_file(tmp / DOCS_DB)},
            "build": {"merged_from": [str(m.root) for m in manifests]},
            "created": now(),
        })
        write_manifest(tmp, manifest)
    return {"path": str(out), "shards": len(shards), "tokens": manifest["tokens"], "documents": manifest["documents"]}
