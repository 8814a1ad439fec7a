"""The Token Recycling file: a V × k matrix of token ids, versioned, validated on load.

A ``.npz`` (zip, uncompressed, no pickle) of two members: ``matrix.npy`` (``int32 [V, k]``,
``-1`` for no candidate) and ``meta.npy`` (the UTF-8 JSON header as ``uint8``)::

    {"format": "retrospec-token-recycling", "format_version": 1, "vocab_size": V, "k": k,
     "fingerprint": "<model fingerprint or empty>", "template": [[0], [1], [0, 0], ...]}

The file may come from anywhere, and the BFS kernel indexes the matrix with the matrix's
own values, so :func:`load_matrix` trusts nothing: the zip's members and their declared
sizes, each ``.npy`` header (dtype, shape) before any array is allocated, every header
field's type and range, the template, and every matrix value (in ``[-1, V)``) once, here.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrospec.datastores.files import IndexFormatError, write_atomic

FORMAT = "retrospec-token-recycling"
FORMAT_VERSION = 1
EMPTY = -1
"""A matrix entry with no candidate yet."""
MAX_VOCAB = 1 << 24
MAX_K = 256
MAX_TEMPLATE = 4096
MAX_DEPTH = 64
MAX_META_BYTES = 1 << 20
MEMBERS = {"matrix.npy", "meta.npy"}


@dataclass(frozen=True)
class RecyclingFile:
    """What a Token Recycling file holds, validated."""

    matrix: np.ndarray  # int32 [vocab_size, k], values in [-1, vocab_size)
    k: int
    fingerprint: str
    template: tuple[tuple[int, ...], ...]

    @property
    def vocab_size(self) -> int:
        return int(self.matrix.shape[0])


def save_matrix(path: str | Path, matrix: np.ndarray, fingerprint: str, template, *, force: bool = False) -> None:
    """Write ``matrix`` and its header to ``path`` atomically (see
    :func:`~retrospec.datastores.files.write_atomic`).

    ``path`` may be absent or a Token Recycling file (replaced); with ``force`` any other
    file; never a folder.
    """
    path = Path(path)
    check_out_file(path, force)
    matrix = np.ascontiguousarray(matrix, np.int32)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "k": int(matrix.shape[1]), "vocab_size": int(matrix.shape[0]),
            "fingerprint": fingerprint, "template": [list(p) for p in template]}
    buf = io.BytesIO()
    np.savez(buf, matrix=matrix, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    write_atomic(path, buf.getvalue())


def check_out_file(path: Path, force: bool) -> None:
    """Refuse to replace anything at ``path`` but a Token Recycling file (any file with ``force``)."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        raise IndexFormatError(f"{path}: is a folder; give a file name for the Token Recycling matrix")
    if not force and not is_recycling_file(path):
        raise IndexFormatError(f"{path}: exists and is not a Token Recycling file; refusing to replace it (choose another path, or force)")


def is_recycling_file(path: Path) -> bool:
    """Whether ``path`` is a readable Token Recycling file (of any model)."""
    try:
        load_matrix(path)
    except (OSError, IndexFormatError):
        return False
    return True


def _fail(path: Path, why: str) -> IndexFormatError:
    return IndexFormatError(f"{path}: not a readable Token Recycling file ({why})")


def _read_npy(zf: zipfile.ZipFile, member: str, path: Path, dtype: np.dtype, shape_ok, max_bytes: int) -> np.ndarray:
    """One ``.npy`` member: its header checked (``dtype``, ``shape_ok(shape)``, size) before
    anything is allocated, then exactly its bytes read."""
    info = zf.getinfo(member)
    if info.file_size > max_bytes + 4096:
        raise _fail(path, f"{member} declares {info.file_size:,} bytes, more than its header allows")
    with zf.open(member) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, found = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, found = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy version {version}")
        except (ValueError, SyntaxError, EOFError) as err:
            raise _fail(path, f"{member}: bad header ({str(err)[:80]})") from None
        if found != dtype or fortran or not shape_ok(shape):
            raise _fail(path, f"{member} is {found}{list(shape)}{' (Fortran order)' if fortran else ''}")
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize > max_bytes:
            raise _fail(path, f"{member} is larger than its header allows")
        raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise _fail(path, f"{member} is truncated")
    return np.frombuffer(raw, dtype).reshape(shape).copy()


def _integer(meta: dict, key: str, lo: int, hi: int, path: Path) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _fail(path, f"header field {key} must be an integer in [{lo}, {hi}], got {str(value)[:40]!r}")
    return value


def _template(value, k: int, path: Path) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TEMPLATE:
        raise _fail(path, f"header field template must be a list of 1 to {MAX_TEMPLATE} rank paths")
    seen: set[tuple[int, ...]] = set()
    out = []
    for node in value:
        if (not isinstance(node, list) or not 1 <= len(node) <= MAX_DEPTH
                or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < k for r in node)):
            raise _fail(path, f"template path {str(node)[:40]} needs 1 to {MAX_DEPTH} ranks in [0, {k})")
        node = tuple(node)
        if node in seen or (len(node) > 1 and node[:-1] not in seen):
            raise _fail(path, f"template path {list(node)} repeats or comes before its parent")
        seen.add(node)
        out.append(node)
    return tuple(out)


def load_matrix(path: str | Path, fingerprint: str | None = None, vocab_size: int | None = None) -> RecyclingFile:
    """Read and validate a file written by :func:`save_matrix`.

    With ``fingerprint`` (the model's), refuse a file made for another model or carrying no
    fingerprint; with ``vocab_size``, one with another number of rows.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if names != MEMBERS:
                raise _fail(path, f"holds {sorted(names)[:4]}, expected {sorted(MEMBERS)}")
            raw_meta = _read_npy(zf, "meta.npy", path, np.dtype(np.uint8), lambda s: len(s) == 1, MAX_META_BYTES)
            try:
                meta = json.loads(raw_meta.tobytes().decode("utf-8"))
            except (ValueError, RecursionError) as err:
                raise _fail(path, f"header is not JSON ({str(err)[:60]})") from None
            if not isinstance(meta, dict):
                raise _fail(path, "header is not a JSON object")
            if meta.get("format", FORMAT) != FORMAT:  # files of retrospec <= 0.x carry no format name
                raise _fail(path, f"header names format {str(meta.get('format'))[:40]!r}")
            version = _integer(meta, "format_version", 1, 1 << 30, path)
            if version > FORMAT_VERSION:
                raise IndexFormatError(f"{path}: format version {version} is newer than this retrospec reads ({FORMAT_VERSION})")
            rows = _integer(meta, "vocab_size", 1, MAX_VOCAB, path)
            k = _integer(meta, "k", 1, MAX_K, path)
            mark = meta.get("fingerprint")
            if not isinstance(mark, str) or len(mark) > 64:
                raise _fail(path, "header field fingerprint must be a string of at most 64 characters")
            template = _template(meta.get("template"), k, path)
            matrix = _read_npy(zf, "matrix.npy", path, np.dtype("<i4"), lambda s: tuple(s) == (rows, k), rows * k * 4)
    except FileNotFoundError:
        raise
    except IndexFormatError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as err:
        raise _fail(path, f"{type(err).__name__}: {str(err)[:80]}") from None
    bad = (matrix < EMPTY) | (matrix >= rows)
    if bad.any():
        r, c = (int(x) for x in np.argwhere(bad)[0])
        raise _fail(path, f"{int(bad.sum())} entries are not token ids in [-1, {rows}), e.g. matrix[{r}, {c}] = {int(matrix[r, c])}")
    if fingerprint is not None:
        if not mark:
            raise IndexFormatError(f"{path}: carries no model fingerprint, so it cannot be checked against this model; "
                                   "delete it to start an empty matrix")
        if mark != fingerprint:
            raise IndexFormatError(f"{path}: made for another model (fingerprint {mark}, this model {fingerprint})")
    if vocab_size is not None and rows != vocab_size:
        raise IndexFormatError(f"{path}: has {rows} rows, this model's vocabulary has {vocab_size}")
    return RecyclingFile(matrix.astype(np.int32), k, mark, template)
