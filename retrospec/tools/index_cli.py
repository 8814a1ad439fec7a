"""``retrospec index``: build, inspect, verify, query and merge datastores."""

from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("retrospec.index")


def load_tokenizer(name_or_path: str):
    """A tokenizer by model short name, local directory or hub id."""
    from transformers import AutoTokenizer

    from retrospec.models import resolve

    return AutoTokenizer.from_pretrained(resolve(name_or_path))


def cmd_build(args) -> int:
    from retrospec.extras import require

    require("datastores", "retrospec index build")
    from retrospec.datastores.suffix_build import BuildOptions, build_index
    from retrospec.datastores.corpus import DEFAULT_TREE_GLOBS, ReadOptions

    tokenizer = load_tokenizer(args.tokenizer)
    if args.documents:
        from retrospec.datastores.documents import build_document_store

        report = build_document_store(args.input, tokenizer, args.out, field=args.field, embedder=args.embedder, chunk_tokens=args.chunk_tokens)
        print(json.dumps(report, indent=1))
        return 0
    options = BuildOptions(shard_tokens=args.shard_tokens, shard_per_input=args.shard_per_input, add_eos=args.add_eos)
    read = ReadOptions(field=args.field, chat_template=args.chat_template, globs=tuple(args.glob or DEFAULT_TREE_GLOBS),
                       exclude=tuple(args.exclude or ()))
    report = build_index(args.input, tokenizer, args.out, options, read, append=args.append)
    print(report.summary())
    return 0


def cmd_info(args) -> int:
    index = _open_any(args.dir)
    print(json.dumps(index.manifest if args.raw else index.describe(), indent=1))
    return 0


def _open_any(path: str):
    """A suffix index or a document store, whichever ``path`` holds."""
    from pathlib import Path

    from retrospec.datastores.files import MANIFEST, IndexFormatError

    manifest = Path(path) / MANIFEST
    kind = json.loads(manifest.read_text()).get("format") if manifest.exists() else None
    if kind == "retrospec-document-store":
        from retrospec.datastores.documents import DocumentStore

        return DocumentStore.open(path)
    from retrospec.datastores.suffix_index import SuffixIndex

    if kind is None and not Path(path).is_dir():
        raise IndexFormatError(f"{path}: no such index directory")
    return SuffixIndex.open(path)


def cmd_verify(args) -> int:
    from retrospec.datastores.suffix_index import verify_index

    start = time.perf_counter()
    result = verify_index(args.dir)
    print(f"ok: {result['shards']} shard(s), {result['tokens_checked']:,} tokens, every byte and the suffix order checked in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_query(args) -> int:
    import numpy as np

    from retrospec.datastores.suffix_index import SuffixIndex

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if tokenizer is None:
        from transformers import AutoTokenizer

        index = SuffixIndex.open(args.dir)
        tokenizer = AutoTokenizer.from_pretrained(index.manifest["tokenizer"]["name"])
    index = SuffixIndex.open(args.dir, tokenizer=tokenizer)
    ids = np.asarray(tokenizer(args.text, add_special_tokens=False).input_ids, np.int64)
    start = time.perf_counter()
    tree = index.query(ids, max_nodes=args.max_nodes)
    micros = (time.perf_counter() - start) * 1e6
    print(f"{len(tree)} nodes in {micros:.0f} µs after {len(ids)} context tokens")
    for i in range(len(tree)):
        depth, node = 0, i
        while tree.parents[node] >= 0:
            node, depth = int(tree.parents[node]), depth + 1
        print(f"{'  ' * depth}{tokenizer.decode([int(tree.tokens[i])])!r}  {tree.scores[i]:.3f}")
    return 0


def cmd_merge(args) -> int:
    from retrospec.datastores.suffix_build import merge_indexes

    print(json.dumps(merge_indexes(args.inputs, args.out), indent=1))
    return 0


def add_index_parser(sub) -> None:
    p = sub.add_parser("index", help="build, inspect, verify, query and merge datastores")
    isub = p.add_subparsers(dest="action", required=True)

    b = isub.add_parser("build", help="build a suffix index (or, with --documents, a document store) from corpora")
    b.add_argument("--tokenizer", required=True, help="model short name, local directory or hub id whose tokenizer to use")
    b.add_argument("--input", nargs="+", required=True, help="JSONL(.gz) files, text files or directories of source files")
    b.add_argument("--out", required=True, help="index directory (replaced atomically when the build completes)")
    b.add_argument("--field", default="text", help="JSONL text field (default: %(default)s); chat records (conversations/messages) are detected")
    b.add_argument("--chat-template", action="store_true", help="render chat records with the tokenizer's chat template")
    b.add_argument("--glob", action="append", help="file pattern taken from directories (repeatable; default: common source and text files)")
    b.add_argument("--exclude", action="append", help="path pattern (relative to an input directory) to leave out (repeatable)")
    b.add_argument("--shard-tokens", type=int, default=1 << 28, help="most tokens per shard (default: %(default)s)")
    b.add_argument("--shard-per-input", action="store_true", help="write one shard per input")
    b.add_argument("--append", action="store_true", help="add the inputs to the index already at --out")
    b.add_argument("--add-eos", action="store_true", help="end every document with the EOS token")
    b.add_argument("--documents", action="store_true", help="build a document store (chunks, dense + lexical indexes) instead")
    b.add_argument("--embedder", default=None, help="sentence-transformers model for --documents (default: the offline all-MiniLM-L6-v2)")
    b.add_argument("--chunk-tokens", type=int, default=128, help="chunk size for --documents (default: %(default)s)")
    b.set_defaults(func=cmd_build)

    i = isub.add_parser("info", help="what an index holds")
    i.add_argument("dir")
    i.add_argument("--raw", action="store_true", help="print the whole manifest")
    i.set_defaults(func=cmd_info)

    v = isub.add_parser("verify", help="full check: every checksum and the suffix order")
    v.add_argument("dir")
    v.set_defaults(func=cmd_verify)

    q = isub.add_parser("query", help="show the draft tree the index gives after a text")
    q.add_argument("dir")
    q.add_argument("text")
    q.add_argument("--tokenizer", help="tokenizer to encode the text (default: the one the index was built with)")
    q.add_argument("--max-nodes", type=int, default=32)
    q.set_defaults(func=cmd_query)

    m = isub.add_parser("merge", help="join indexes built with the same tokenizer into one")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_merge)
