"""A fuzz harness for every on-disk format: mutate a datastore, use it, classify what happened.

    python -m retrospec.tools.fuzz --mutants 5000 --seed 1                 # every format
    python -m retrospec.tools.fuzz --mutants 500 --formats recycling --json out.json

For each format (:data:`FORMATS`: suffix index, document store, Token Recycling matrix,
budget cache) it builds one pristine datastore from a tiny random model's own greedy
output, then, per mutant, copies it and applies one random mutation — byte flips,
truncations, extensions, manifest field edits (delete, null, wrong type, huge or negative
numbers, ``../`` and absolute paths, a shard listed twice), files swapped between shards,
symbolic links out of the folder, crafted values with every checksum recomputed (a hostile
datastore) — and hands it to a worker process that uses it as a user would:

1. **open and query** it (the answer is compared with the pristine datastore's);
2. run the **full check** (``verify``), where the format has one;
3. for a fraction of mutants, a **write** (append, merge, save, or a build whose ``--out``
   is a folder of user files) and a **generate()** on the tiny model with the mutant as a
   draft source, whose output must equal plain greedy.

Each mutant is classified: *clean error* (retrospec's own error, naming the file),
*correct* (the pristine answer), *silent wrong* (another answer, no check caught it),
*crash* (any other exception anywhere, or a generate() whose output differs from greedy),
*hang* (no answer within ``--timeout``), *segfault* (the worker died of a signal: the worker
is a subprocess, restarted after each death). Independently it records *lost files* (user
files beside the datastore changed or gone) and *outside access* (an audit hook saw a read,
link, or folder created outside the datastore; or an error message told a planted
outside file's size).

Adding a format: subclass :class:`Format` (``make``, ``mutate``, ``probe``, and optionally
``check``, ``source``, ``write``) and add it to :data:`FORMATS`. The harness uses only
long-standing public APIs, so it also runs against older retrospec versions (put one first
on ``PYTHONPATH``) to measure what a change fixed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 96
NEW_TOKENS = 16
SECRET_BYTES = 631  # an unusual size: an error message that mentions it leaks an outside file
OUTCOMES = ("clean error", "correct", "silent wrong", "crash", "hang", "segfault")
EXTRA = ("lost files", "outside access", "generate runs", "verify caught")


# --------------------------------------------------------------------------- shared pieces
class IdTokenizer:
    """Texts are space-separated token ids ("5 6 7" -> [5, 6, 7]), with character offsets."""

    name_or_path = "fuzz-ids"
    bos_token = eos_token = pad_token = unk_token = None
    eos_token_id = None

    def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False):
        def one(text):
            ids, offsets, pos = [], [], 0
            for word in text.split():
                start = text.index(word, pos)
                ids.append(int(word) % VOCAB if word.isdigit() else 0)
                offsets.append((start, start + len(word)))
                pos = start + len(word)
            return ids, offsets

        single = isinstance(texts, str)
        encoded = [one(t) for t in ([texts] if single else texts)]
        out = {"input_ids": [e[0] for e in encoded]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e[1] for e in encoded]
        return {k: v[0] for k, v in out.items()} if single else out

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)

    def get_vocab(self):
        return {f"t{i}": i for i in range(VOCAB)}


def tiny_model(seed: int = 0):
    """The fixed 2-layer Llama the harness generates with (same weights in every process)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # wide top-1 margins: greedy comparisons test the algorithm, not rounding
    return model.eval()


def greedy(model, ids, **kw):
    import torch

    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0, **kw)


def tree_key(tree) -> list:
    return [tree.tokens.tolist(), tree.parents.tolist(), [round(float(s), 4) for s in tree.scores]]


def snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _digest(data: dict) -> str | None:
    """The manifest's own checksum, where this retrospec version has one."""
    try:
        from retrospec.datastores.files import manifest_digest
    except ImportError:
        return None
    return manifest_digest(data)


def rewrite_manifest(root: Path, data: Any, recompute: bool) -> None:
    if recompute and isinstance(data, dict) and "manifest_sha256" in data:
        data["manifest_sha256"] = _digest(data)
    (root / "manifest.json").write_text(json.dumps(data))


def refresh_entry(root: Path, data: dict, name: str) -> None:
    """Make the manifest entry of file ``name`` (and its block crc32s, if any) agree with it."""
    from retrospec.datastores.files import describe_file

    for entries in _files_dicts(data):
        if name in entries and isinstance(entries[name], dict):
            entries[name].update(describe_file(root / name))
            crc = name.replace(".bin", ".crc")
            if crc != name and crc in entries:
                from retrospec.datastores.suffix_index import block_crcs

                shard = next((s for s in data.get("shards", []) if isinstance(s, dict) and s.get("files") is entries), {})
                block = shard.get("block_bytes", 1 << 16)
                block_crcs(np.fromfile(root / name, np.uint8), block).astype("<u4").tofile(root / crc)
                entries[crc].update(describe_file(root / crc))


def _files_dicts(data: Any) -> list[dict]:
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "files" and isinstance(value, dict):
                found.append(value)
            else:
                found.extend(_files_dicts(value))
    elif isinstance(data, list):
        for value in data:
            found.extend(_files_dicts(value))
    return found


# --------------------------------------------------------------------------- generic mutations
def flip_bytes(path: Path, rng) -> str:
    raw = bytearray(path.read_bytes())
    if not raw:
        return f"{path.name}: empty, nothing flipped"
    n = int(rng.integers(1, 9))
    middle = rng.random() < 0.5
    for _ in range(n):
        pos = int(rng.integers(len(raw) // 4, max(3 * len(raw) // 4, len(raw) // 4 + 1))) if middle else int(rng.integers(len(raw)))
        raw[pos] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(raw))
    return f"{path.name}: {n} bit flips{' in the middle' if middle else ''}"


def truncate(path: Path, rng) -> str:
    size = path.stat().st_size
    keep = int(rng.integers(0, max(size, 1)))
    with open(path, "r+b") as f:
        f.truncate(keep)
    return f"{path.name}: truncated {size} -> {keep} bytes"


def extend(path: Path, rng) -> str:
    extra = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
    with open(path, "ab") as f:
        f.write(extra)
    return f"{path.name}: extended by {len(extra)} bytes"


def _json_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_json_paths(v, prefix + (k,)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_json_paths(v, prefix + (i,)))
    return out


def _at(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def edit_json(data: Any, rng, outside: list[str]) -> tuple[Any, str]:
    """One random edit of a JSON document (a manifest, a header, a cache)."""
    paths = [p for p in _json_paths(data) if p]
    if not paths:
        return None, "document replaced by null"
    path = paths[int(rng.integers(len(paths)))]
    parent, key = _at(data, path[:-1]), path[-1]
    ops = ["delete", "null", "type", "huge", "negative", "zero", "float", "plus-one", "traversal", "duplicate", "swap", "rename-key", "nan"]
    op = ops[int(rng.integers(len(ops)))]
    label = "/".join(map(str, path))
    if op == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif op == "null":
        parent[key] = None
    elif op == "type":
        parent[key] = ["x", [], {}, True, "12"][int(rng.integers(5))]
    elif op == "huge":
        parent[key] = 10**30
    elif op == "negative":
        parent[key] = -1 if rng.random() < 0.5 else -(2**40)
    elif op == "zero":
        parent[key] = 0
    elif op == "float":
        parent[key] = 1.5
    elif op == "nan":
        parent[key] = float("nan")
    elif op == "plus-one":
        value = parent[key]
        parent[key] = value + 1 if isinstance(value, int) and not isinstance(value, bool) else 1
    elif op == "traversal":
        parent[key] = [f"../{Path(outside[0]).parent.name}/{Path(outside[0]).name}", outside[0], "/etc/passwd", "a/../../b"][
            int(rng.integers(4))
        ]
    elif op == "duplicate":
        node = _at(data, path)
        if isinstance(parent, list):
            parent.append(json.loads(json.dumps(node)))
        else:
            parent[f"{key}_copy" if isinstance(key, str) else key] = json.loads(json.dumps(node))
    elif op == "swap":
        if isinstance(parent, list) and len(parent) > 1:
            j = int(rng.integers(len(parent)))
            parent[key], parent[j] = parent[j], parent[key]
        else:
            parent[key] = json.loads(json.dumps(_at(data, paths[int(rng.integers(len(paths)))][:1])))  # a copy: no cycles
    elif op == "rename-key":
        if isinstance(parent, dict):
            new = [f"../{Path(outside[0]).parent.name}/{Path(outside[0]).name}", outside[0], str(key)[:-1] + "X" if str(key) else "x",
                   f"{key}/../../escaped"][int(rng.integers(4))]
            parent[new] = parent.pop(key)
        else:
            parent[key] = "renamed"
    return data, f"{op} at {label}"


# --------------------------------------------------------------------------- formats
@dataclass
class Setup:
    """What the parent built, handed to the worker (JSON)."""

    root: str
    prompt: list[int]
    reference: list[int]
    contexts: list[list[int]]
    corpus: list[list[int]]
    pristine: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)


class Format:
    """One on-disk format under test. ``kind``: "dir" (a folder) or "file"."""

    name = ""
    kind = "dir"
    writes = ("out-user",)

    def make(self, root: Path, setup: Setup, model) -> Path:
        raise NotImplementedError

    def mutate(self, path: Path, rng, setup: Setup) -> str:
        raise NotImplementedError

    def probe(self, path: Path, w: Worker) -> Any:
        raise NotImplementedError

    def check(self, path: Path, w: Worker) -> None:
        """The full check, where the format has one (its clean error is fine)."""

    def source(self, path: Path, w: Worker):
        """The mutant as a draft source (None: the format is not one)."""
        return None

    def write(self, op: str, path: Path, w: Worker, scratch: Path) -> None:
        """A write that involves the mutant or a user folder."""


def _dir_mutation(path: Path, rng, setup: Setup, files: list[str], crafted: Callable[[Path, dict, Any], str] | None) -> str:
    outside = [str(Path(setup.root) / "secret" / "key.bin")]
    manifest_path = path / "manifest.json"
    kinds = [
        "flip",
        "flip",
        "truncate",
        "extend",
        "manifest",
        "manifest",
        "manifest-hostile",
        "manifest-hostile",
        "swap",
        "symlink",
        "crafted",
    ]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind in ("flip", "truncate", "extend"):
        name = files[int(rng.integers(len(files)))]
        if not (path / name).exists():
            return f"{name}: absent"
        return {"flip": flip_bytes, "truncate": truncate, "extend": extend}[kind](path / name, rng)
    if kind.startswith("manifest"):
        data = json.loads(manifest_path.read_text())
        data, what = edit_json(data, rng, outside)
        rewrite_manifest(path, data, recompute=kind == "manifest-hostile")
        return f"{kind}: {what}"
    if kind == "swap":
        a, b = path / "shard-00000", path / "shard-00001"
        if not (a.is_dir() and b.is_dir()):
            return flip_bytes(manifest_path, rng)
        name = ["tokens.bin", "sa.bin", "vocab.bin", "tokens.crc", "sa.crc"][int(rng.integers(5))]
        if not ((a / name).exists() and (b / name).exists()):
            return f"swap {name}: absent"
        tmp = path / "swap.tmp"
        os.replace(a / name, tmp)
        os.replace(b / name, a / name)
        os.replace(tmp, b / name)
        return f"swapped {name} between shards 0 and 1"
    if kind == "symlink":
        name = files[int(rng.integers(len(files)))]
        if not (path / name).exists():
            return f"{name}: absent"
        elsewhere = Path(setup.root) / "elsewhere" / f"{path.name}-{Path(name).name}"
        elsewhere.parent.mkdir(exist_ok=True)
        if rng.random() < 0.5:
            shutil.copyfile(path / name, elsewhere)  # the right bytes, outside the folder
            target = elsewhere
        else:
            target = Path(outside[0])
        (path / name).unlink()
        os.symlink(target, path / name)
        return f"{name}: symbolic link to {'a copy outside' if target == elsewhere else 'a secret outside'}"
    data = json.loads(manifest_path.read_text())
    what = crafted(path, data, rng) if crafted else "no crafted mutation"
    rewrite_manifest(path, data, recompute=True)
    return f"crafted: {what}"


class SuffixIndexFormat(Format):
    name = "suffix-index"
    writes = ("merge", "append", "out-user")

    def make(self, root, setup, model):
        from retrospec.datastores.suffix_build import BuildOptions, build_index

        corpus = root / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": " ".join(map(str, d))}) + "\n" for d in setup.corpus))
        out = root / "pristine" / "suffix-index"
        total = sum(len(d) for d in setup.corpus)
        build_index([corpus], IdTokenizer(), out, BuildOptions(shard_tokens=total // 3 + 1), progress=False)
        setup.extra["corpus"] = str(corpus)
        return out

    def files(self, path: Path) -> list[str]:
        return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())

    def mutate(self, path, rng, setup):
        return _dir_mutation(path, rng, setup, self.files(path), self.crafted)

    @staticmethod
    def crafted(path: Path, data: dict, rng) -> str:
        shard = f"shard-0000{int(rng.integers(2))}"
        choice = int(rng.integers(4))
        if choice == 0:  # an id past the tokenizer in vocab.bin
            vocab = np.fromfile(path / shard / "vocab.bin", "<u4")
            vocab[int(rng.integers(vocab.size))] = [VOCAB, 2**31 - 1, 2**32 - 1][int(rng.integers(3))]
            vocab.tofile(path / shard / "vocab.bin")
            refresh_entry(path, data, f"{shard}/vocab.bin")
            return f"{shard}/vocab.bin: an id past the vocabulary, checksums recomputed"
        if choice == 3:
            (path / "docs.sqlite").write_bytes(b"SQLite format 3\x00" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
            refresh_entry(path, data, "docs.sqlite")
            return "docs.sqlite: garbage, checksums recomputed"
        name = f"{shard}/{'tokens.bin' if choice == 1 else 'sa.bin'}"
        raw = np.fromfile(path / name, np.uint8)
        if rng.random() < 0.5:
            raw[:] = rng.integers(0, 256, raw.size, dtype=np.uint8)
        else:
            raw[int(rng.integers(raw.size))] ^= 0xFF
        raw.tofile(path / name)
        refresh_entry(path, data, name)
        return f"{name}: rewritten, checksums recomputed"

    def probe(self, path, w):
        from retrospec.datastores.suffix_index import SuffixIndex

        index = SuffixIndex.open(path, tokenizer=w.tokenizer)
        return [tree_key(index.query(np.asarray(c, np.int64), 32)) for c in w.setup.contexts]

    def check(self, path, w):
        from retrospec.datastores.suffix_index import verify_index

        verify_index(path)

    def source(self, path, w):
        from retrospec.datastores.suffix_index import SuffixIndex

        return SuffixIndex.open(path, tokenizer=w.tokenizer)

    def write(self, op, path, w, scratch):
        from retrospec.datastores.suffix_build import build_index, merge_indexes

        more = scratch / "more.jsonl"
        more.write_text(json.dumps({"text": "1 2 3 4 5 6"}) + "\n")
        if op == "merge":
            merge_indexes([path, Path(w.setup.pristine[self.name])], scratch / "merged")
        elif op == "append":
            build_index([more], w.tokenizer, path, append=True, progress=False)
        else:
            build_index([more], w.tokenizer, Path(w.setup.root) / "user", progress=False)


class DocumentStoreFormat(Format):
    name = "document-store"

    def make(self, root, setup, model):
        from retrospec.datastores.corpus import Document
        from retrospec.datastores.documents import build_document_store

        out = root / "pristine" / "document-store"
        docs = [Document(" ".join(map(str, d)), f"doc{i}", {}) for i, d in enumerate(setup.corpus)]
        build_document_store(None, IdTokenizer(), out, documents=docs, chunk_tokens=16, overlap=4, progress=False)
        return out

    def mutate(self, path, rng, setup):
        files = ["docs.sqlite", "dense.faiss", "manifest.json"]
        return _dir_mutation(path, rng, setup, files, self.crafted)

    @staticmethod
    def crafted(path: Path, data: dict, rng) -> str:
        name = ["docs.sqlite", "dense.faiss"][int(rng.integers(2))]
        raw = np.fromfile(path / name, np.uint8)
        for _ in range(8):
            raw[int(rng.integers(raw.size))] = int(rng.integers(256))
        raw.tofile(path / name)
        refresh_entry(path, data, name)
        return f"{name}: bytes changed, checksums recomputed"

    def _open(self, path, w):
        from retrospec.datastores.documents import DocumentStore

        store = DocumentStore.open(path)
        store._embedder = w.embedder  # one embedder for every mutant (loading it takes a second)
        return store

    def probe(self, path, w):
        store = self._open(path, w)
        out = []
        for c in w.setup.contexts[:3]:
            text = " ".join(map(str, c))
            hits = store.search(text, 3, mode="hybrid", tokenizer=w.tokenizer)
            out.append([[h.chunk, h.document, h.text, round(h.score, 6)] for h in hits])
            out.append(sorted(store.chunks_containing(c[-3:])))
        return out

    def check(self, path, w):
        try:
            from retrospec.datastores.documents import verify_store
        except ImportError:
            return
        verify_store(path)

    def source(self, path, w):
        from retrospec.sources.documents import DocumentSource

        return DocumentSource(w.tokenizer, store=self._open(path, w))

    def write(self, op, path, w, scratch):
        from retrospec.datastores.corpus import Document
        from retrospec.datastores.documents import build_document_store

        build_document_store(None, w.tokenizer, Path(w.setup.root) / "user", documents=[Document("1 2 3 4 5 6 7 8 9", "d", {})],
                             chunk_tokens=16, overlap=4, progress=False)


class RecyclingFormat(Format):
    name = "recycling"
    kind = "file"
    writes = ("save-planted", "save-over-user")

    def make(self, root, setup, model):
        import torch

        import retrospec

        rec = retrospec.TokenRecycling.for_model(model)
        ids = torch.tensor([setup.prompt])
        spec = retrospec.Speculator([rec], budget=16)
        retrospec.generate(model, ids, speculator=spec, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=48, pad_token_id=0)
        out = root / "pristine" / "recycling.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        rec.save(out)
        return out

    def mutate(self, path, rng, setup):
        kinds = ["flip", "truncate", "extend", "values", "values", "dtype", "shape", "header", "header", "members", "npy-header"]
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind in ("flip", "truncate", "extend"):
            return {"flip": flip_bytes, "truncate": truncate, "extend": extend}[kind](path, rng)
        with np.load(path, allow_pickle=False) as data:
            members = {k: np.array(data[k]) for k in data.files}
        matrix, meta = members["matrix"], json.loads(bytes(members["meta"]).decode())
        what = kind
        if kind == "values":
            value = [2**31 - 1, -(10**9), VOCAB, -2, matrix.shape[0] + 1][int(rng.integers(5))]
            cells = int(rng.integers(1, 5))
            for _ in range(cells):
                matrix[int(rng.integers(matrix.shape[0])), int(rng.integers(matrix.shape[1]))] = value
            what = f"{cells} entries set to {value}"
        elif kind == "dtype":
            dtype = ["<i8", "<f4", ">i4", "<u1", "<i2"][int(rng.integers(5))]
            matrix = matrix.astype(dtype)
            what = f"matrix as {dtype}"
        elif kind == "shape":
            choice = int(rng.integers(3))
            matrix = matrix[: matrix.shape[0] // 2] if choice == 0 else matrix[:, :-1] if choice == 1 else matrix.reshape(-1)
            if choice == 0 and rng.random() < 0.5:
                meta["vocab_size"] = int(matrix.shape[0])  # half the rows, and a header that agrees
            what = ["half the rows", "one column less", "flattened"][choice]
        elif kind == "header":
            meta, what = edit_json(meta, rng, [str(Path(setup.root) / "secret" / "key.bin")])
            if rng.random() < 0.3 and isinstance(meta, dict):
                meta["fingerprint"] = ""
                what += ", empty fingerprint"
        elif kind == "members":
            if rng.random() < 0.5:
                members.pop("meta")
                what = "no meta member"
            else:
                members["extra"] = np.zeros(3)
                what = "an extra member"
        buf = io.BytesIO()
        if kind == "npy-header":
            import zipfile

            with zipfile.ZipFile(buf, "w") as zf:
                header = {"descr": "<i4", "fortran_order": False, "shape": (2**31, 8)}
                npy = io.BytesIO()
                np.lib.format.write_array_header_1_0(npy, header)
                zf.writestr("matrix.npy", npy.getvalue() + b"\x00" * 64)
                zf.writestr("meta.npy", _npy(np.frombuffer(json.dumps(meta).encode(), np.uint8)))
            path.write_bytes(buf.getvalue())
            return "matrix.npy declares 2**31 x 8 entries"
        arrays = {k: v for k, v in members.items() if k not in ("matrix", "meta")}
        if "matrix" in members:
            arrays["matrix"] = matrix
        if "meta" in members:
            arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        np.savez(buf, **arrays)
        path.write_bytes(buf.getvalue())
        return what

    def probe(self, path, w):
        from retrospec.sources.recycling import TokenRecycling

        rec = TokenRecycling.load(path, w.model)
        return [tree_key(rec.draft(t, 80, 6)) for t in range(0, VOCAB, 5)]

    def source(self, path, w):
        from retrospec.sources.recycling import TokenRecycling

        return TokenRecycling.load(path, w.model)

    def write(self, op, path, w, scratch):
        from retrospec.sources.recycling import TokenRecycling

        rec = TokenRecycling.for_model(w.model)
        if op == "save-planted":  # the old predictable temporary name, planted as a link to a user file
            target = scratch / "rec.npz"
            with w.unwatched():
                os.symlink(Path(w.setup.root) / "secret" / "key.bin", scratch / f".rec.npz.{os.getpid()}.tmp")
            rec.save(target)
        else:
            rec.save(Path(w.setup.root) / "user" / "notes.txt")


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


class BudgetCacheFormat(Format):
    name = "budget-cache"
    kind = "file"
    writes = ("measure-planted",)

    def make(self, root, setup, model):
        from retrospec.verify import step_cost

        cache = root / "cache"
        with _env("RETROSPEC_CACHE", str(cache)):  # measured and written whatever the machine's load
            found = step_cost.cache_path(model)
            step_cost.store(found, step_cost.measure_step_cost(model))
        setup.extra["budget_target"] = str(found)
        out = root / "pristine" / "budget.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, out)
        return out

    def mutate(self, path, rng, setup):
        kinds = ["flip", "truncate", "extend", "edit", "edit", "edit", "crafted"]
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind in ("flip", "truncate", "extend"):
            return {"flip": flip_bytes, "truncate": truncate, "extend": extend}[kind](path, rng)
        if kind == "edit":
            data, what = edit_json(json.loads(path.read_text()), rng, [str(Path(setup.root) / "secret" / "key.bin")])
            path.write_text(json.dumps(data))
            return what
        data = json.loads(path.read_text())
        choice = int(rng.integers(5))
        if choice == 4:  # JSON that parses into a recursion too deep for the decoder
            path.write_text("[" * 200_000 + "]" * 200_000)
            return "crafted: 200,000 nested lists"
        if choice == 0:
            data["seconds"] = [0.0] * len(data["seconds"])
        elif choice == 1:
            data["sizes"] = data["sizes"][::-1]
        elif choice == 2:
            data["seconds"] = [-1.0] * len(data["seconds"])
        else:
            data["sizes"] = list(range(10_000))
            data["seconds"] = [1e-3] * 10_000
        path.write_text(json.dumps(data))
        return f"crafted values {choice}"

    def _placed(self, path, w):
        target = Path(w.setup.extra["budget_target"])
        with w.unwatched():
            if target.is_symlink():  # left by an earlier write that followed a planted link: not this mutant's doing
                target.unlink()
            shutil.copyfile(path, target)
        return target

    def probe(self, path, w):
        self._placed(path, w)
        from retrospec.verify.step_cost import step_cost_for

        with _env("RETROSPEC_CACHE", str(Path(w.setup.root) / "cache")), _warnings("retrospec.verify") as warned:
            cost = step_cost_for(w.model)  # what budget="auto" starts from
        if warned:
            raise CleanFallback(f"{path}: {warned[0]}")
        return [list(cost.sizes), list(cost.seconds), cost.context, cost.device]

    def source(self, path, w):
        self._placed(path, w)
        return "auto-budget"

    def write(self, op, path, w, scratch):
        from retrospec.verify.step_cost import step_cost_for

        target = self._placed(path, w)
        planted = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # the old predictable temporary name
        with w.unwatched():
            target.write_text("not json")  # unreadable: it is measured again and written back
            with contextlib.suppress(FileNotFoundError):
                planted.unlink()
            os.symlink(Path(w.setup.root) / "secret" / "key.bin", planted)
        try:
            with _env("RETROSPEC_CACHE", str(Path(w.setup.root) / "cache")), _warnings("retrospec.verify.step_cost"):
                step_cost_for(w.model)
        finally:
            with w.unwatched(), contextlib.suppress(FileNotFoundError):
                planted.unlink()


FORMATS: dict[str, Format] = {f.name: f for f in (SuffixIndexFormat(), DocumentStoreFormat(), RecyclingFormat(), BudgetCacheFormat())}


class CleanFallback(Exception):
    """A format that recovers by itself (the budget cache measures again) and said so."""


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def _warnings(logger: str):
    found: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                found.append(record.getMessage())

    handler = Catch()
    logging.getLogger(logger).addHandler(handler)
    try:
        yield found
    finally:
        logging.getLogger(logger).removeHandler(handler)


# --------------------------------------------------------------------------- the worker
AUDITED = {"open": (0,), "os.link": (0, 1), "os.symlink": (0, 1), "os.mkdir": (0,), "os.rename": (0, 1), "os.remove": (0,),
           "os.rmdir": (0,), "shutil.copyfile": (0, 1), "shutil.rmtree": (0,), "os.listdir": (0,), "os.scandir": (0,),
           "sqlite3.connect": (0,), "os.truncate": (0,), "os.chmod": (0,)}


class Worker:
    """Runs tasks in a separate process (so a segfault is a count, not the end of the run)."""

    def __init__(self, setup: Setup):
        import torch

        import retrospec

        torch.set_num_threads(1)
        self.setup = setup
        self.root = os.path.realpath(setup.root)
        self.tokenizer = IdTokenizer()
        self.model = tiny_model()
        self.prompt = torch.tensor([setup.prompt])
        self.retrospec = retrospec
        self.embedder = None
        if "document-store" in setup.pristine:
            from retrospec.datastores.documents import Embedder

            self.embedder = Embedder()
        assert greedy(self.model, self.prompt)[0].tolist() == setup.reference, "the tiny model differs between processes"
        self.allowed: list[str] = []
        self.beside: str | None = None
        self.events: list[str] = []
        self.watching = False
        self.reference = {name: FORMATS[name].probe(Path(p), self) for name, p in setup.pristine.items()}
        sys.addaudithook(self._audit)

    @contextlib.contextmanager
    def unwatched(self):
        """For the harness's own file work inside a task (planting links, placing files)."""
        was, self.watching = self.watching, False
        try:
            yield
        finally:
            self.watching = was

    def _audit(self, event: str, args: tuple) -> None:
        if not self.watching or event not in AUDITED:
            return
        for i in AUDITED[event]:
            if i >= len(args):
                continue
            value = args[i]
            if isinstance(value, (bytes, os.PathLike)):
                value = os.fsdecode(value)
            if not isinstance(value, str):
                continue
            if value.startswith("file:"):
                value = value[5:].split("?", 1)[0].lstrip("/")
                value = "/" + value
            real = os.path.realpath(value)
            inside = real == self.root or real.startswith(self.root + os.sep)
            if self.beside and inside:
                first = os.path.relpath(real, self.root).split(os.sep)[0]
                if (first == "." and event in ("os.listdir", "os.scandir")) or first.startswith(f".{self.beside}."):
                    continue
            if (inside or real in ("/etc/passwd",)) and not any(real == a or real.startswith(a + os.sep) for a in self.allowed):
                self.events.append(f"{event} {real}")

    def _clean(self, err: BaseException, path: Path) -> bool:
        """retrospec's own error, or a ValueError that names the datastore (as retrospec's do)."""
        try:
            from retrospec.datastores.files import IndexFormatError
        except ImportError:  # pragma: no cover
            IndexFormatError = ValueError
        if isinstance(err, (IndexFormatError, CleanFallback)):
            return True
        return type(err) is ValueError and (str(path) in str(err) or path.name in str(err))

    def _leaks(self, err: BaseException) -> bool:
        """Whether a message tells a fact about a planted outside file (its size); echoing the
        manifest's own (bad) value is fine."""
        return f"{SECRET_BYTES} bytes" in str(err)

    def run(self, task: dict) -> dict:
        fmt = FORMATS[task["format"]]
        path = Path(task["path"])
        scratch = Path(task["scratch"])
        # the mutant's own folder (its builds and swaps happen beside it), the pristine copy a
        # merge reads, the cache, and the --out a write names: everything else is outside
        allowed = [path.parent, self.setup.pristine[fmt.name], Path(self.root) / "cache"]
        self.beside = None
        if task.get("write") in ("out-user", "save-over-user"):
            allowed.append(Path(self.root) / "user")
            self.beside = "user"  # a build lists --out's parent and works in hidden folders beside it
        self.allowed = [os.path.realpath(p) for p in allowed]
        self.events = []
        out: dict = {"leak": False}
        self.watching = True
        try:
            # 1) open and query
            try:
                answer = json.loads(json.dumps(fmt.probe(path, self)))
                out["outcome"] = "correct" if answer == self.reference[fmt.name] else "silent wrong"
            except Exception as err:
                out["outcome"] = "clean error" if self._clean(err, path) else "crash"
                out["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                out["leak"] |= self._leaks(err)
            # 2) the full check
            try:
                fmt.check(path, self)
                out["verify"] = "ok"
            except Exception as err:
                out["verify"] = "clean" if self._clean(err, path) else "crash"
                out["verify_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                out["leak"] |= self._leaks(err)
            # 3) a write
            if task.get("write"):
                try:
                    fmt.write(task["write"], path, self, scratch)
                    out["write"] = "ok"
                except Exception as err:
                    out["write"] = "clean" if self._clean(err, path) or "refusing" in str(err) else "crash"
                    out["write_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            # 4) generate with the mutant as a source
            if task.get("generate"):
                out["generate"] = self._generate(fmt, path)
        finally:
            self.watching = False
        out["outside"] = self.events[:5]
        return out

    def _generate(self, fmt: Format, path: Path) -> str:
        import torch

        rs = self.retrospec
        try:
            source = fmt.source(path, self)
        except Exception as err:
            if not self._clean(err, path):
                return f"crash: source {type(err).__name__}: {str(err)[:120]}"
            source = None  # refused: generate without it
        budget = 16
        sources = [rs.ContextSource()]
        if source == "auto-budget":
            from retrospec.verify import step_cost

            budget = "auto"
            step_cost.reset_live_costs()  # read this mutant's file, not the prior an earlier mutant left in this process
        elif source is not None:
            sources.insert(0, source)
        try:
            with _env("RETROSPEC_CACHE", str(Path(self.root) / "cache")), _warnings("retrospec"):
                spec = rs.Speculator(sources, budget=budget)
                out = rs.generate(self.model, self.prompt, speculator=spec, attention_mask=torch.ones_like(self.prompt),
                                  do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
        except Exception as err:
            return f"crash: generate {type(err).__name__}: {str(err)[:120]}"
        return "ok" if out.sequences[0].tolist() == self.setup.reference else "wrong"


WORKER_MEMORY = 12 << 30
"""Address-space limit of a worker: a mutant that makes a reader allocate without bound
fails there (a MemoryError: a crash) instead of pressing on the machine."""


def worker_main(setup_path: str) -> None:
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    logging.basicConfig(level=logging.WARNING)  # to stderr, which the parent discards; handlers here count warnings
    setup = Setup(**json.loads(Path(setup_path).read_text()))
    worker = Worker(setup)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        task = json.loads(line)
        print(json.dumps(worker.run(task)), flush=True)


class WorkerProcess:
    """The parent's handle on a worker: one task at a time, with a timeout."""

    def __init__(self, setup_path: Path, timeout: float):
        self.setup_path, self.timeout = setup_path, timeout
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        # this file, run as a script: the same harness whichever retrospec PYTHONPATH holds
        path = os.pathsep.join(p or os.getcwd() for p in sys.path)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(self.setup_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self._read(600)
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError("the fuzz worker did not start")

    def _read(self, timeout: float) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def run(self, task: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(task) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._read(self.timeout)
        if line:
            return json.loads(line)
        if line is None:  # no answer in time: a hang
            self.proc.kill()
            self.proc.wait()
            self.proc, self.restarts = None, self.restarts + 1
            return {"outcome": "hang"}
        code = self.proc.wait()  # end of output: the worker died
        self.proc, self.restarts = None, self.restarts + 1
        return {"outcome": "segfault" if code < 0 else "crash", "error": f"worker died with {code}"}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()


# --------------------------------------------------------------------------- the run
def build_setup(root: Path, formats: list[str], seed: int) -> tuple[Setup, Any]:
    import torch

    torch.set_num_threads(1)
    model = tiny_model()
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, VOCAB, 12).tolist()
    reference = greedy(model, torch.tensor([prompt]))[0].tolist()
    # the datastores hold the tiny model's own continuations: drafts from them are accepted,
    # so a mutant that changes them changes what generation does (but never its output)
    corpus = [reference]
    for _ in range(40):
        start = rng.integers(3, VOCAB, 8).tolist()
        corpus.append(greedy(model, torch.tensor([start]))[0].tolist())
    contexts = [reference[: len(prompt) + k] for k in range(0, NEW_TOKENS, 3)] + [d[: 4 + i % 6] for i, d in enumerate(corpus[1:12])]
    setup = Setup(str(root), prompt, reference, contexts, corpus)
    for name in formats:
        setup.pristine[name] = str(FORMATS[name].make(root, setup, model))
    return setup, model


def plant_user_files(root: Path) -> None:
    """The files a careless command could destroy: a secret beside the datastores, a user folder."""
    secret = root / "secret"
    secret.mkdir(exist_ok=True)
    (secret / "key.bin").write_bytes(b"\x5a" * SECRET_BYTES)
    user = root / "user"
    if user.exists():
        shutil.rmtree(user)
    (user / "data").mkdir(parents=True)
    (user / "notes.txt").write_text("my notes\n")
    (user / "data" / "table.csv").write_text("a,b\n1,2\n")


@dataclass
class Tally:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, fmt: str, outcome: str, flags: list[str], note: str) -> None:
        row = self.counts.setdefault(fmt, dict.fromkeys(("tried", *OUTCOMES, *EXTRA), 0))
        row["tried"] += 1
        row[outcome] += 1
        for flag in flags:
            row[flag] += 1
        if outcome in ("silent wrong", "crash", "hang", "segfault") or set(flags) & {"lost files", "outside access"}:
            self.examples.setdefault(f"{fmt}: {outcome}{' + ' + ', '.join(flags) if flags else ''}", []).append(note)

    def table(self) -> str:
        cols = ("tried", *OUTCOMES, "lost files", "outside access", "generate runs", "verify caught")
        rows = [["format", *cols]] + [[fmt, *(str(row[c]) for c in cols)] for fmt, row in self.counts.items()]
        total = ["all", *(str(sum(row[c] for row in self.counts.values())) for c in cols)]
        rows.append(total)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)


def run_fuzz(mutants: int, seed: int = 0, formats: list[str] | None = None, workdir: str | Path | None = None,
             generate_every: int = 3, write_every: int = 4, timeout: float = 60.0, progress: bool = False) -> Tally:
    """Fuzz ``mutants`` mutants spread over ``formats`` (default: all); return the tallies."""
    formats = list(formats or FORMATS)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; known: {', '.join(FORMATS)}")
    owned = workdir is None
    root = Path(tempfile.mkdtemp(prefix="retrospec-fuzz-")) if owned else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tally = Tally()
    worker = None
    try:
        plant_user_files(root)
        setup, _ = build_setup(root, formats, seed)
        setup_path = root / "setup.json"
        setup_path.write_text(json.dumps(setup.__dict__))
        worker = WorkerProcess(setup_path, timeout)
        guarded = snapshot(root / "secret")
        started = time.perf_counter()
        for i in range(mutants):
            name = formats[i % len(formats)]
            fmt = FORMATS[name]
            pristine = Path(setup.pristine[name])
            work = root / "mutants" / f"{i:06d}"
            scratch = work / "scratch"
            scratch.mkdir(parents=True)
            path = work / pristine.name
            if fmt.kind == "dir":
                shutil.copytree(pristine, path, symlinks=True)
            else:
                shutil.copyfile(pristine, path)
            note = fmt.mutate(path, rng, setup)
            user_before = snapshot(root / "user")
            k = i // len(formats)  # this format's k-th mutant
            task = {"format": name, "path": str(path), "scratch": str(scratch),
                    "generate": k % generate_every == 0,
                    "write": fmt.writes[int(rng.integers(len(fmt.writes)))] if k % write_every == 1 else None}
            result = worker.run(task)
            outcome = result["outcome"]
            crashed = [k for k in ("verify", "write") if result.get(k) == "crash"]
            gen = result.get("generate")
            if outcome in ("correct", "silent wrong", "clean error") and (crashed or (gen not in (None, "ok"))):
                outcome = "crash"
            flags = []
            if gen is not None:
                flags.append("generate runs")
            if outcome == "silent wrong" and result.get("verify") == "clean":
                flags.append("verify caught")
            if snapshot(root / "secret") != guarded or snapshot(root / "user") != user_before:
                flags.append("lost files")
            if result.get("outside") or result.get("leak"):
                flags.append("outside access")
            detail = "; ".join(str(result[k]) for k in ("error", "verify_error", "write_error", "generate", "outside") if result.get(k))
            tally.add(name, outcome, flags, f"#{i} {note} -> {detail[:300]}")
            if "lost files" in flags:
                plant_user_files(root)
                guarded = snapshot(root / "secret")
            shutil.rmtree(work, ignore_errors=True)
            if progress and (i + 1) % 100 == 0:
                print(f"{i + 1}/{mutants} mutants, {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    finally:
        if worker is not None:
            worker.close()
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrospec.tools.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, default=1000, help="mutants in all, spread evenly over the formats (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", help=f"comma-separated, default all: {', '.join(FORMATS)}")
    parser.add_argument("--generate-every", type=int, default=3, help="run generate() on every N-th mutant (default: %(default)s)")
    parser.add_argument("--write-every", type=int, default=4, help="run a write on every N-th mutant (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per mutant before it counts as a hang (default: %(default)s)")
    parser.add_argument("--workdir", help="keep the datastores here (default: a temporary folder, removed)")
    parser.add_argument("--json", help="also write the counts and example notes to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: serve tasks for the setup file given
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    formats = [f.strip() for f in args.formats.split(",")] if args.formats else None
    start = time.perf_counter()
    tally = run_fuzz(args.mutants, args.seed, formats, args.workdir, args.generate_every, args.write_every, args.timeout, progress=True)
    print(tally.table())
    print(f"\n{args.mutants} mutants in {time.perf_counter() - start:.0f}s")
    for key, notes in sorted(tally.examples.items()):
        print(f"\n{key} ({len(notes)}):")
        for note in notes[:3]:
            print(f"  {note}")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": tally.counts, "examples": tally.examples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
