"""On-disk index directories: versioned manifests, atomic writes, integrity checks.

Every index retrospec writes is a directory with a ``manifest.json`` (format name and
version, tokenizer identity, counts, build parameters, and the size and checksums of every
array file) next to its arrays and an SQLite file of document metadata. Rules:

* written under a temporary name beside the target and renamed into place only when
  complete, so an interrupted build leaves whatever was there before untouched;
* opened in O(1): the manifest is checked (format, version, tokenizer), every file's size,
  and a checksum of each file's first and last block — enough to refuse truncated and
  most corrupted files at once; ``verify`` hashes everything;
* never pickled: arrays are raw little-endian numpy files, metadata JSON and SQLite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
EDGE_BYTES = 1 << 16
"""Bytes at each end of a file covered by the quick checksum done at open."""


class IndexFormatError(ValueError):
    """An index directory is missing, damaged, or does not fit this model."""


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def edge_digest(path: Path, size: int) -> str:
    """sha256 of a file's first and last ``EDGE_BYTES`` (O(1) whatever the file size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            h.update(f.read(EDGE_BYTES))
    return h.hexdigest()


def describe_file(path: Path) -> dict:
    """The manifest entry of an array file: its size and both checksums."""
    size = path.stat().st_size
    return {"bytes": size, "sha256": file_digest(path), "edge_sha256": edge_digest(path, size)}


_PROBE = "Hello, World!  def f(x):\n\treturn x**2  # naïve café, 東京 3.14159 <|im_end|>"


def tokenizer_identity(tokenizer) -> dict:
    """Name, vocabulary size and a fingerprint of how a tokenizer turns text into ids.

    The fingerprint covers the vocabulary and the ids of a fixed probe text (so merges,
    normalisation and pre-tokenisation count), not generation settings such as the EOS or
    pad token, which library versions and chat setups change without changing any id.
    """
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for piece, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{piece}\n".encode("utf-8", "surrogatepass"))
    probe = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    h.update((",".join(map(str, probe)) + "\n").encode())
    return {
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(vocab),
        "fingerprint": h.hexdigest()[:20],
    }


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of an index directory."""

    path: Path
    data: dict

    @property
    def root(self) -> Path:
        return self.path.parent


def read_manifest(root: str | Path, kind: str, version: int) -> Manifest:
    """Read and check ``root/manifest.json`` for an index of ``kind`` readable at ``version``."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise IndexFormatError(f"{root}: no such index directory")
    if not path.exists():
        raise IndexFormatError(f"{path}: missing; {root} is not a retrospec index (or its build did not finish)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise IndexFormatError(f"{path}: unreadable manifest ({err})") from None
    if data.get("format") != kind:
        raise IndexFormatError(f"{path}: holds a {data.get('format')!r} index, expected {kind!r}")
    found = data.get("format_version")
    if not isinstance(found, int) or found > version:
        raise IndexFormatError(f"{path}: format version {found} is newer than this retrospec reads ({version}); upgrade retrospec")
    return Manifest(path, data)


def check_files(root: Path, files: dict[str, dict], full: bool = False) -> None:
    """Sizes and edge checksums of ``files`` (name -> manifest entry); every byte if ``full``."""
    for name, entry in files.items():
        path = root / name
        if not path.exists():
            raise IndexFormatError(f"{path}: missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IndexFormatError(f"{path}: {size:,} bytes, the manifest says {entry['bytes']:,} (truncated or replaced)")
        if edge_digest(path, size) != entry["edge_sha256"]:
            raise IndexFormatError(f"{path}: checksum of its first/last {EDGE_BYTES // 1024} KiB does not match the manifest (corrupted)")
        if full and file_digest(path) != entry["sha256"]:
            raise IndexFormatError(f"{path}: sha256 does not match the manifest (corrupted)")


def check_tokenizer(manifest: Manifest, tokenizer) -> None:
    """Refuse an index built with another tokenizer."""
    want = manifest.data.get("tokenizer", {})
    have = tokenizer_identity(tokenizer)
    if want.get("fingerprint") != have["fingerprint"]:
        raise IndexFormatError(
            f"{manifest.root}: built with tokenizer {want.get('name')!r} (vocab {want.get('vocab_size')}, "
            f"fingerprint {want.get('fingerprint')}), but this model's tokenizer is {have['name']!r} "
            f"(vocab {have['vocab_size']}, fingerprint {have['fingerprint']}); rebuild the index with it"
        )


def write_manifest(root: Path, data: dict) -> None:
    (root / MANIFEST).write_text(json.dumps(data, indent=1, sort_keys=True))


def temp_dir_beside(target: Path) -> Path:
    """A fresh, empty working directory next to ``target`` (same filesystem: rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def building(target: Path):
    """Build an index directory atomically: yields an empty working directory beside
    ``target``; on success it replaces ``target`` (see :func:`publish`), on any error or
    interruption it is removed and ``target`` is left as it was."""
    tmp = temp_dir_beside(target)
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, target: Path) -> None:
    """Move a finished ``tmp`` directory to ``target``, replacing an older index there.

    The old index is first renamed aside, then ``tmp`` renamed in, then the old one
    removed: at every moment a complete index exists under one of the two names.
    """
    if not (tmp / MANIFEST).exists():
        raise IndexFormatError(f"{tmp}: refusing to publish an index without a manifest")
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def save_array(root: Path, name: str, array: np.ndarray) -> dict:
    """Write ``array`` raw (little-endian, C order) as ``root/name``; return its manifest entry."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr.tofile(path)
    entry = describe_file(path)
    entry.update({"dtype": arr.dtype.str, "shape": list(arr.shape)})
    return entry


class MappedArray:
    """A read-only memory-mapped array whose resident pages can be released.

    The mapping is file-backed: pages the queries touch stay in the OS page cache, shared
    by every process that opens the index. ``release()`` drops them from this process's
    page tables (``MADV_DONTNEED``), so its resident set stays bounded however large the
    index; touching them again costs a minor fault, not a disk read.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
        import mmap

        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):  # binary searches hop around: no read-ahead
            self._map.madvise(mmap.MADV_RANDOM)
        self.array = np.frombuffer(self._map, dtype=dtype).reshape(shape)

    def release(self) -> None:
        import mmap

        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


def open_array(root: Path, name: str, entry: dict) -> MappedArray | np.ndarray:
    """Memory-map an array written by :func:`save_array` (read-only)."""
    dtype = np.dtype(entry["dtype"])
    shape = tuple(entry["shape"])
    if int(np.prod(shape)) * dtype.itemsize != entry["bytes"]:
        raise IndexFormatError(f"{root / name}: manifest shape {shape} of {dtype} does not match {entry['bytes']} bytes")
    if entry["bytes"] == 0:
        return np.zeros(shape, dtype)
    return MappedArray(root / name, dtype, shape)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
