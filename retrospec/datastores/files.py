"""On-disk datastores: atomic writes, checksummed manifests, confined paths, safe publishing.

Every index retrospec writes is a directory with a ``manifest.json`` (format name and
version, tokenizer identity, counts, build parameters, the size and checksums of every
file, and a checksum of the manifest itself) next to its arrays and an SQLite file of
document metadata. A datastore may come from anywhere, so it is read as untrusted input:

* **written atomically**: single files through :func:`write_atomic` (a unique temporary
  name in the target folder created with ``O_EXCL``, fsync'd, renamed into place, the
  folder fsync'd); whole directories through :func:`building`, which builds beside the
  target and swaps it in with :func:`publish`. The swap keeps a journal, so a process
  killed between its two renames is finished or rolled back by the next open or build
  (:func:`recover`), and stale build folders of dead processes are removed;
* **never clobbering**: ``--out`` may be absent, an empty folder, or an index of the same
  kind holding nothing but its own files (:func:`check_out`); anything else is refused,
  and even ``force`` never deletes a folder that holds files of its own;
* **validated on open**: the manifest's own checksum, then every field against its schema
  (:class:`Fields`: types, ranges, sizes consistent with the files), every path confined to
  the index folder (:func:`confined`: no ``..``, no absolute paths, no symbolic link out),
  each file's size and a checksum of its first and last block, in O(1); per-block
  checksums and ``verify`` cover the rest;
* **never pickled**: arrays are raw little-endian numpy files, metadata JSON and SQLite.

Error messages name the file and the field; they never say anything about a path outside
the index folder (whether it exists, its size).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

MANIFEST = "manifest.json"
EDGE_BYTES = 1 << 16
"""Bytes at each end of a file covered by the quick checksum done at open."""
MAX_MANIFEST_BYTES = 32 << 20
"""Largest manifest read (a 100,000-shard index needs ~30 MB)."""
STALE_SECONDS = 24 * 3600
"""A build folder or journal of another host is stale after this long."""
CHECKSUM_KEY = "manifest_sha256"


class IndexFormatError(ValueError):
    """A datastore (index directory or file) is missing, damaged, or does not fit this model."""


# --------------------------------------------------------------------------- atomic files
def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable (best effort where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | Path, data: bytes | None = None, *, write: Callable[[Any], None] | None = None) -> None:
    """Write ``data`` (or whatever ``write(file)`` writes) to ``path``, all or nothing.

    The bytes go to a fresh temporary name in the target folder, created with ``O_EXCL``
    (so a planted file or symbolic link there is never followed or reused; two writers never
    share one), are fsync'd, and the name is renamed over ``path`` (replacing a symbolic link
    at ``path``, not writing through it); then the folder is fsync'd. Readers see the old
    file or the new one, never a part.
    """
    if (data is None) == (write is None):
        raise TypeError("write_atomic takes exactly one of data or write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name[:180]}.{uuid.uuid4().hex}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if write is not None:
                write(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (before it is published)."""
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(folder))


# --------------------------------------------------------------------------- checksums
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
    """The manifest entry of a file: its size and both checksums."""
    size = path.stat().st_size
    return {"bytes": size, "sha256": file_digest(path), "edge_sha256": edge_digest(path, size)}


def manifest_digest(data: dict) -> str:
    """sha256 of a manifest's canonical JSON, without its own checksum field."""
    body = {k: v for k, v in data.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


_PROBE = "Hello, World!  def f(x):\n\treturn x**2  # naïve café, 東京 3.14159 <|im_end|>"


def tokenizer_identity(tokenizer) -> dict:
    """Name, vocabulary size and a fingerprint of how a tokenizer turns text into ids.

    The fingerprint covers the vocabulary and the ids of a fixed probe text (so merges,
    normalisation and pre-tokenisation count), not generation settings such as the EOS or
    pad token, which library versions and chat setups change without changing any id.
    ``vocab_size`` bounds the ids (one past the largest, for vocabularies with holes).
    """
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for piece, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{piece}\n".encode("utf-8", "surrogatepass"))
    probe = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    h.update((",".join(map(str, probe)) + "\n").encode())
    return {
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": max(len(vocab), max(vocab.values(), default=-1) + 1),
        "fingerprint": h.hexdigest()[:20],
    }


# --------------------------------------------------------------------------- manifests
def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed, range-checked access to one object of a manifest; errors name the field.

    >>> Fields(Path("m.json"), {"n": 3}).integer("n", 1, 10)
    3
    >>> Fields(Path("m.json"), {"n": None}).integer("n", 1, 10)
    Traceback (most recent call last):
    ...
    retrospec.datastores.files.IndexFormatError: m.json: field n must be an integer in [1, 10], got None
    """

    def __init__(self, where: Path, data: Any, prefix: str = ""):
        self.where, self.data, self.prefix = where, data, prefix
        if not isinstance(data, dict):
            self.fail("", "must be an object", data)

    def fail(self, key: str, what: str, value: Any) -> NoReturn:
        name = f"{self.prefix}{key}" or "(top level)"
        raise IndexFormatError(f"{self.where}: field {name} {what}, got {_shown(value)}")

    def get(self, key: str) -> Any:
        if key not in self.data:
            raise IndexFormatError(f"{self.where}: field {self.prefix}{key} is missing")
        return self.data[key]

    def integer(self, key: str, lo: int, hi: int) -> int:
        value = self.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            self.fail(key, f"must be an integer in [{lo}, {hi}]", value)
        return value

    def text(self, key: str, pattern: str | None = None, max_len: int = 4096) -> str:
        value = self.get(key)
        if not isinstance(value, str) or len(value) > max_len or (pattern is not None and not re.fullmatch(pattern, value)):
            self.fail(key, "must be a string" + (f" matching {pattern}" if pattern else f" of at most {max_len} characters"), value)
        return value

    def obj(self, key: str) -> Fields:
        value = self.get(key)
        if not isinstance(value, dict):
            self.fail(key, "must be an object", value)
        return Fields(self.where, value, f"{self.prefix}{key}.")

    def items(self, key: str, lo: int, hi: int) -> list:
        value = self.get(key)
        if not isinstance(value, list) or not lo <= len(value) <= hi:
            self.fail(key, f"must be a list of {lo} to {hi} items", value if not isinstance(value, list) else f"{len(value)} items")
        return value

    def item(self, key: str, index: int) -> Fields:
        return Fields(self.where, self.data[key][index], f"{self.prefix}{key}[{index}].")


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of an index directory (its checksum already checked)."""

    path: Path
    data: dict

    @property
    def root(self) -> Path:
        return self.path.parent

    def fields(self) -> Fields:
        return Fields(self.path, self.data)


def read_manifest(root: str | Path, kind: str, version: int) -> Manifest:
    """Read ``root/manifest.json`` of an index of ``kind`` at ``version``: its format, version
    and own checksum are checked; the caller validates the fields (see :class:`Fields`)."""
    root = Path(root)
    recover(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise IndexFormatError(f"{root}: no such index directory")
    if not os.path.lexists(path):
        raise IndexFormatError(f"{path}: missing; {root} is not a retrospec index (or its build did not finish)")
    confined(root, MANIFEST)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise IndexFormatError(f"{path}: {size:,} bytes, larger than any manifest ({MAX_MANIFEST_BYTES:,}) (corrupted)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (OSError, ValueError, RecursionError) as err:
        raise IndexFormatError(f"{path}: unreadable manifest ({type(err).__name__}: {str(err)[:120]})") from None
    if not isinstance(data, dict):
        raise IndexFormatError(f"{path}: the manifest is not a JSON object (corrupted)")
    if data.get("format") != kind:
        raise IndexFormatError(f"{path}: holds a {_shown(data.get('format'))} index, expected {kind!r}")
    found = data.get("format_version")
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise IndexFormatError(f"{path}: field format_version must be a positive integer, got {_shown(found)}")
    if found > version:
        raise IndexFormatError(f"{path}: format version {found} is newer than this retrospec reads ({version}); upgrade retrospec")
    if found < version:
        raise IndexFormatError(
            f"{path}: format version {found} predates the checksummed manifest and per-block checksums of version "
            f"{version}; rebuild the index with `retrospec index build` (recipes in indexes/)"
        )
    if not isinstance(data.get(CHECKSUM_KEY), str):
        raise IndexFormatError(f"{path}: field {CHECKSUM_KEY} is missing")
    if manifest_digest(data) != data[CHECKSUM_KEY]:
        raise IndexFormatError(f"{path}: the manifest does not match its own checksum (corrupted or edited)")
    return Manifest(path, data)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a manifest may hold")


def write_manifest(root: Path, data: dict) -> None:
    """Write ``root/manifest.json`` atomically, with its own checksum."""
    data = json.loads(json.dumps(data))  # the checksum covers what a reader will parse
    if not _finite(data):
        raise ValueError("a manifest holds no NaN or infinite numbers")
    data[CHECKSUM_KEY] = manifest_digest(data)
    write_atomic(root / MANIFEST, json.dumps(data, indent=1, sort_keys=True).encode())


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def check_tokenizer(manifest: Manifest, tokenizer) -> dict:
    """Refuse an index built with another tokenizer; return the tokenizer's identity."""
    want = manifest.data.get("tokenizer", {})
    have = tokenizer_identity(tokenizer)
    if want.get("fingerprint") != have["fingerprint"]:
        raise IndexFormatError(
            f"{manifest.root}: built with tokenizer {want.get('name')!r} (vocab {want.get('vocab_size')}, "
            f"fingerprint {want.get('fingerprint')}), but this model's tokenizer is {have['name']!r} "
            f"(vocab {have['vocab_size']}, fingerprint {have['fingerprint']}); rebuild the index with it"
        )
    return have


def tokenizer_fields(fields: Fields) -> dict:
    """Validate a manifest's ``tokenizer`` object (see :func:`tokenizer_identity`)."""
    tok = fields.obj("tokenizer")
    tok.text("name")
    tok.integer("vocab_size", 1, (1 << 31) - 1)
    tok.text("fingerprint", r"[0-9a-f]{1,64}")
    return tok.data


# --------------------------------------------------------------------------- paths
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
"""A file or folder name a manifest may use: no separators, no ``..``, no hidden names."""
RELATIVE = rf"{NAME}(/{NAME}){{0,3}}"


def confined(root: Path, relative: str) -> Path:
    """``root / relative``, refusing any path that could leave the index folder.

    ``relative`` must be a plain relative path (names of letters, digits, ``._-``; no
    ``..``, no absolute path) and, symbolic links resolved, stay inside ``root``. The error
    says nothing about where the path leads.
    """
    if not isinstance(relative, str) or not re.fullmatch(RELATIVE, relative) or ".." in relative.split("/"):
        raise IndexFormatError(f"{root}: file name {_shown(relative)} is not a plain relative path inside the index folder")
    path = root / relative
    base = os.path.realpath(root)
    if not os.path.realpath(path).startswith(base + os.sep):
        raise IndexFormatError(f"{path}: a symbolic link that leaves the index folder; refusing to follow it")
    return path


def check_files(root: Path, files: dict[str, dict], full: bool = False) -> None:
    """Sizes and edge checksums of ``files`` (name -> manifest entry); every byte if ``full``.

    Entries must have been validated (:func:`file_entry`); paths are confined here.
    """
    for name, entry in files.items():
        path = confined(root, name)
        try:
            info = path.stat()
        except FileNotFoundError:
            raise IndexFormatError(f"{path}: missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise IndexFormatError(f"{path}: not a regular file")
        size = info.st_size
        if size != entry["bytes"]:
            raise IndexFormatError(f"{path}: {size:,} bytes, the manifest says {entry['bytes']:,} (truncated or replaced)")
        if edge_digest(path, size) != entry["edge_sha256"]:
            raise IndexFormatError(f"{path}: checksum of its first/last {EDGE_BYTES // 1024} KiB does not match the manifest (corrupted)")
        if full and file_digest(path) != entry["sha256"]:
            raise IndexFormatError(f"{path}: sha256 does not match the manifest (corrupted)")


HEX64 = r"[0-9a-f]{64}"


def file_entry(files: Fields, name: str, max_bytes: int = 1 << 44) -> dict:
    """Validate the manifest entry of file ``name`` (size and checksums; dtype and shape
    when present) and return it."""
    entry = files.obj(name)
    entry.integer("bytes", 0, max_bytes)
    entry.text("sha256", HEX64)
    entry.text("edge_sha256", HEX64)
    return entry.data


def array_entry(files: Fields, name: str, dtype: str, shape: tuple[int, ...]) -> dict:
    """Validate the entry of an array file written by :func:`save_array`: exactly ``dtype``
    (a numpy dtype string) and ``shape``, and a size that matches them."""
    entry = file_entry(files, name)
    fields = files.obj(name)
    if fields.get("dtype") != dtype:
        fields.fail("dtype", f"must be {dtype!r}", fields.get("dtype"))
    if fields.get("shape") != list(shape):
        fields.fail("shape", f"must be {list(shape)}", fields.get("shape"))
    if entry["bytes"] != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
        fields.fail(
            "bytes", f"must be {int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize} for {dtype}{list(shape)}", entry["bytes"]
        )
    return entry


# --------------------------------------------------------------------------- --out safety
INDEX_EXTRAS = ("docs.sqlite-journal", "docs.sqlite-wal", "docs.sqlite-shm")
"""Files SQLite may leave beside an index's database."""


def _listed_files(data: Any) -> set[str]:
    """Every file name under a ``files`` object anywhere in a manifest (any version)."""
    found: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "files" and isinstance(value, dict):
                found.update(k for k in value if isinstance(k, str))
            else:
                found |= _listed_files(value)
    elif isinstance(data, list):
        for value in data:
            found |= _listed_files(value)
    return found


def _contents(folder: Path) -> list[str]:
    out = []
    for parent, dirs, names in os.walk(folder):
        rel = os.path.relpath(parent, folder)
        for name in names + [d for d in dirs if os.path.islink(os.path.join(parent, d))]:
            out.append(name if rel == "." else f"{rel}/{name}")
    return sorted(out)


def _index_kind(folder: Path) -> tuple[str | None, list[str]]:
    """The format an existing folder's manifest names (or None), and its files that the
    manifest does not account for."""
    manifest = folder / MANIFEST
    data = None
    if manifest.is_file() and not manifest.is_symlink():
        with contextlib.suppress(OSError, ValueError, RecursionError):
            if manifest.stat().st_size <= MAX_MANIFEST_BYTES:
                data = json.loads(manifest.read_bytes().decode("utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("format"), str):
        return None, _contents(folder)
    known = _listed_files(data) | {MANIFEST, "docs.sqlite", *INDEX_EXTRAS}
    return data["format"], [p for p in _contents(folder) if p not in known]


def peek_format(folder: Path) -> str | None:
    """The format an index folder's manifest names (unvalidated: to pick a reader), or None."""
    return _index_kind(Path(folder))[0]


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_out(target: Path, kind: str, force: bool = False) -> None:
    """Refuse to write a ``kind`` index at ``target`` unless that replaces nothing of value.

    Allowed: nothing there, an empty folder, or an index of the same ``kind`` holding only
    its own files (replaced atomically). With ``force`` also a regular file, a symbolic link
    or an index of another kind (again holding only its own files). Never: a folder that
    holds files no manifest accounts for, whatever ``force`` says.
    """
    if not os.path.lexists(target):
        return
    hint = "choose another --out"
    if os.path.islink(target) or not target.is_dir():
        what = "a symbolic link" if os.path.islink(target) else "a file"
        if not force:
            raise IndexFormatError(f"{target}: is {what}, not an index folder; refusing to replace it ({hint}, or --force)")
        return
    found, others = _index_kind(target)
    if found is None:
        if others:
            raise IndexFormatError(
                f"{target}: is a folder that is not a retrospec index (it holds {_listing(others)}); refusing to replace it "
                f"({hint}; even --force never deletes a folder of other files)"
            )
        return  # empty
    if others:
        raise IndexFormatError(
            f"{target}: a {found} index that also holds files of its own ({_listing(others)}); refusing to replace it "
            f"({hint} or move those files; even --force never deletes them)"
        )
    if found != kind and not force:
        raise IndexFormatError(f"{target}: holds a {found} index, not a {kind}; refusing to replace it ({hint}, or --force)")


def check_out_folder(target: Path, allowed: tuple[str, ...]) -> None:
    """Refuse an output folder (e.g. ``bench --out``) that holds anything but ``allowed`` names."""
    if not os.path.lexists(target):
        return
    if os.path.islink(target) or not target.is_dir():
        raise ValueError(f"{target}: is not a folder; choose another --out")
    others = [p for p in _contents(target) if p not in allowed]
    if others:
        raise ValueError(f"{target}: holds files that are not this command's outputs ({_listing(others)}); choose another --out")


# --------------------------------------------------------------------------- publishing
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _owner_tag() -> str:
    return f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _side_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.(building|old)-([0-9a-f]{{6}})-([0-9]+)-[0-9a-f]{{8}}")


def _journal(target: Path) -> Path:
    return target.parent / f".{target.name}.publish"


def _alive(host: str, pid: int, since: float) -> bool:
    """Whether the process that owns a build folder or journal may still be at work."""
    if host != _HOST:
        return time.time() - since < STALE_SECONDS
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def temp_dir_beside(target: Path) -> Path:
    """A fresh, empty working directory next to ``target`` (same filesystem: rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.building-{_owner_tag()}"
    tmp.mkdir()
    return tmp


def _remove(path: Path) -> None:
    if os.path.islink(path) or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(target: Path) -> list[str]:
    """Remove the build and swap-aside folders beside ``target`` whose owner process is gone
    (on this host; on another host, once older than ``STALE_SECONDS``); return their names."""
    pattern, removed = _side_pattern(target), []
    if not target.parent.is_dir() or os.path.lexists(_journal(target)):
        return removed  # a swap in flight or to recover: its folders are not stale
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match:
            continue
        try:
            since = entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        if not _alive(match.group(2), int(match.group(3)), since):
            _remove(entry)
            removed.append(entry.name)
    return removed


def publish(tmp: Path, target: Path) -> None:
    """Move a finished ``tmp`` directory to ``target``, replacing what is there.

    Replacing takes two renames (``target`` aside, then ``tmp`` in). A journal written
    first names both, so if the process dies between them the next :func:`recover` (run by
    every open and build) finishes the swap; at every moment a complete index exists under
    a name the journal records.
    """
    if not (tmp / MANIFEST).is_file():
        raise IndexFormatError(f"{tmp}: refusing to publish an index without a manifest")
    parent = target.parent
    fsync_tree(tmp)
    if not os.path.lexists(target):
        os.replace(tmp, target)
        fsync_dir(parent)
        return
    old = parent / f".{target.name}.old-{_owner_tag()}"
    journal = _journal(target)
    note = json.dumps({"new": tmp.name, "old": old.name, "host": _HOST, "pid": os.getpid(), "time": time.time()}).encode()
    staged = parent / f".{target.name}.publish-{uuid.uuid4().hex}.tmp"
    write_atomic(staged, note)
    try:
        os.link(staged, journal)  # exclusive: fails if another swap of this target is in flight
    except FileExistsError:
        raise IndexFormatError(f"{target}: another process is replacing this index right now; try again") from None
    finally:
        os.unlink(staged)
    fsync_dir(parent)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if not os.path.lexists(target):
            os.replace(old, target)  # roll back: the previous index stays
        os.unlink(journal)
        raise
    fsync_dir(parent)
    os.unlink(journal)
    fsync_dir(parent)
    _remove(old)


def recover(target: Path, wait: float = 2.0) -> None:
    """Finish or roll back a swap of ``target`` that a dead process left half done.

    With a live owner the swap is in flight: wait up to ``wait`` seconds for it. Without
    write access to the folder nothing is changed (the error, if any, comes from the open).
    """
    target = Path(target)
    journal = _journal(target)
    deadline = time.monotonic() + wait
    while os.path.lexists(journal):
        try:
            note = json.loads(journal.read_bytes()[:4096])
            new, old = note["new"], note["old"]
            host, pid, since = str(note["host"]), int(note["pid"]), float(note["time"])
        except (OSError, ValueError, KeyError, TypeError):
            new = old = host = None
            pid, since = 0, 0.0
        pattern = _side_pattern(target)
        if not (isinstance(new, str) and isinstance(old, str) and pattern.fullmatch(new) and pattern.fullmatch(old)):
            with contextlib.suppress(OSError):
                journal.unlink()  # not a journal this code wrote: ignore it
            return
        if _alive(host, pid, since):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
            continue
        try:
            new_path, old_path = target.parent / new, target.parent / old
            if not os.path.lexists(target) and (new_path / MANIFEST).is_file():
                os.replace(new_path, target)  # died between the renames: finish the swap
            elif not os.path.lexists(target) and os.path.lexists(old_path):
                os.replace(old_path, target)  # nothing to finish with: roll back
            if os.path.lexists(new_path):
                _remove(new_path)  # died before the first rename: the old index is still in place
            if os.path.lexists(old_path):
                _remove(old_path)
            journal.unlink()
            fsync_dir(target.parent)
        except OSError:
            return
        return


@contextlib.contextmanager
def building(target: Path, kind: str, *, force: bool = False) -> Iterator[Path]:
    """Build an index directory of ``kind`` atomically: yields an empty working directory
    beside ``target``; on success it replaces ``target`` (see :func:`publish`), on any error
    or interruption it is removed and ``target`` is left as it was.

    ``target`` is checked with :func:`check_out` before the build and again before the swap;
    a half-done swap of it is recovered and stale build folders beside it are removed first.
    """
    target = Path(target)
    recover(target)
    clean_stale(target)
    check_out(target, kind, force)
    tmp = temp_dir_beside(target)
    try:
        yield tmp
        check_out(target, kind, force)
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- arrays
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
        count = int(np.prod(shape, dtype=np.int64))
        if count * np.dtype(dtype).itemsize > len(self._map):
            raise IndexFormatError(f"{path}: shorter than its manifest entry (changed since it was opened)")
        self.array = np.frombuffer(self._map, dtype=dtype, count=count).reshape(shape)

    def release(self) -> None:
        import mmap

        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


def open_array(root: Path, name: str, entry: dict) -> MappedArray | np.ndarray:
    """Memory-map an array written by :func:`save_array` (read-only; entry validated by
    :func:`array_entry`)."""
    dtype = np.dtype(entry["dtype"])
    shape = tuple(entry["shape"])
    if entry["bytes"] == 0:
        return np.zeros(shape, dtype)
    return MappedArray(confined(root, name), dtype, shape)


def read_small_array(root: Path, name: str, entry: dict) -> np.ndarray:
    """Read a small array file whole and check its sha256 against ``entry`` (validated)."""
    path = confined(root, name)
    raw = path.read_bytes()
    if len(raw) != entry["bytes"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise IndexFormatError(f"{path}: sha256 does not match the manifest (corrupted)")
    return np.frombuffer(raw, dtype=np.dtype(entry["dtype"])).reshape(tuple(entry["shape"])).copy()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
