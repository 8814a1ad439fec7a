"""``retrospec index``: build, inspect, verify, query and merge datastores."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger("retrospec.index")

OUT_HELP = (
    "index directory. It may be absent, an empty folder, or an index of the same kind holding only its own files "
    "(replaced atomically when the build completes); anything else is refused: see --force"
)
FORCE_HELP = (
    "also replace a file, a symbolic link or an index of another kind at --out. A folder that holds files no "
    "index manifest accounts for is never replaced, even with --force"
)
LOCAL_RAY = "local"
"""``--ray`` without an address: start a local Ray instance."""
HUB_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"


def load_tokenizer(name_or_path: str):
    """A tokenizer by model short name, local directory or hub id."""
    from transformers import AutoTokenizer

    from retrospec.models import resolve

    return AutoTokenizer.from_pretrained(resolve(name_or_path))


def local_tokenizer(name: str):
    """The tokenizer an index names, found without the network, or a ``ValueError`` that
    says how to get it.

    Tried in order: a short name (already fetched), a local directory, the cache directory
    of a short name on another machine (``.../models/smollm2-135m``), a hub id already in the
    Hugging Face cache. Anything else would need a download, which a query never starts.
    """
    from transformers import AutoTokenizer

    from retrospec.models import MODELS, is_fetched, model_dir

    short = None
    if name in MODELS:
        short = name
    elif Path(name).name in MODELS and not os.path.isdir(name):
        short = Path(name).name
    if short is not None:
        if is_fetched(short):
            return AutoTokenizer.from_pretrained(model_dir(short))
        raise ValueError(f"the index's tokenizer {name!r} is model {short!r}, which is not fetched yet: run "
                         f"`retrospec models fetch {short}`, or pass --tokenizer NAME_OR_DIR")
    if os.path.isdir(name):
        return AutoTokenizer.from_pretrained(name)
    if re.fullmatch(HUB_ID, name):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str):
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
    raise ValueError(
        f"the index's tokenizer {name!r} is not available offline (not a short name, a local directory or in the "
        f"Hugging Face cache); pass --tokenizer NAME_OR_DIR (a short name from `retrospec models list` or a "
        f"directory), or download it first (e.g. `hf download {name}`)"
    )


def cmd_build(args) -> int:
    from retrospec.extras import require

    require("datastores", "retrospec index build")
    from retrospec.datastores.corpus import DEFAULT_TREE_GLOBS, ReadOptions
    from retrospec.datastores.suffix_build import BuildOptions, build_index

    tokenizer = load_tokenizer(args.tokenizer)
    if args.documents:
        if args.ray is not None or args.workers is not None:
            raise ValueError("--ray and --workers build suffix indexes; a document store (--documents) is built in one process")
        from retrospec.datastores.documents import build_document_store

        report = build_document_store(args.input, tokenizer, args.out, field=args.field, embedder=args.embedder,
                                      chunk_tokens=args.chunk_tokens, force=args.force)
        print(json.dumps(report, indent=1))
        return 0
    options = BuildOptions(shard_tokens=args.shard_tokens, shard_per_input=args.shard_per_input, add_eos=args.add_eos)
    read = ReadOptions(field=args.field, chat_template=args.chat_template, globs=tuple(args.glob or DEFAULT_TREE_GLOBS),
                       exclude=tuple(args.exclude or ()))
    if args.ray is None and args.workers is None:
        report = build_index(args.input, tokenizer, args.out, options, read, append=args.append, force=args.force)
    else:
        from retrospec.datastores.cluster_build import ClusterOptions, build_index_distributed

        cluster = ClusterOptions(engine="pool" if args.ray is None else "ray", address=None if args.ray in (None, LOCAL_RAY) else args.ray,
                                 workers=args.workers, piece_bytes=args.piece_mb << 20)
        report = build_index_distributed(args.input, tokenizer, args.out, options, read, cluster, append=args.append, force=args.force)
    print(report.summary())
    return 0


def cmd_info(args) -> int:
    index = _open_any(args.dir)
    print(json.dumps(index.manifest if args.raw else index.describe(), indent=1))
    return 0


def _kind(path: str) -> str | None:
    from retrospec.datastores.files import IndexFormatError, peek_format

    if not Path(path).is_dir():
        raise IndexFormatError(f"{path}: no such index directory")
    return peek_format(Path(path))


def _open_any(path: str):
    """A suffix index or a document store, whichever ``path`` holds."""
    if _kind(path) == "retrospec-document-store":
        from retrospec.datastores.documents import DocumentStore

        return DocumentStore.open(path)
    from retrospec.datastores.suffix_index import SuffixIndex

    return SuffixIndex.open(path)


def cmd_verify(args) -> int:
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    start = time.perf_counter()
    if _kind(args.dir) == "retrospec-document-store":
        from retrospec.datastores.documents import verify_store

        result = verify_store(args.dir, tokenizer=tokenizer)
        print(f"ok: {result['documents']:,} documents, {result['chunks']:,} chunks, every byte and the database checked "
              f"in {time.perf_counter() - start:.1f}s")
        return 0
    from retrospec.datastores.suffix_index import verify_index

    result = verify_index(args.dir, tokenizer=tokenizer)
    print(
        f"ok: {result['shards']} shard(s), {result['tokens_checked']:,} tokens, every byte and the suffix order checked "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return 0


def cmd_query(args) -> int:
    import numpy as np

    from retrospec.datastores.suffix_index import SuffixIndex

    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = local_tokenizer(SuffixIndex.open(args.dir).manifest["tokenizer"]["name"])
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

    print(json.dumps(merge_indexes(args.inputs, args.out, force=args.force), indent=1))
    return 0


def add_index_parser(sub) -> None:
    p = sub.add_parser("index", help="build, inspect, verify, query and merge datastores")
    isub = p.add_subparsers(dest="action", required=True)

    b = isub.add_parser("build", help="build a suffix index (or, with --documents, a document store) from corpora")
    b.add_argument("--tokenizer", required=True, help="model short name, local directory or hub id whose tokenizer to use")
    b.add_argument("--input", nargs="+", required=True, help="JSONL(.gz) files, text files or directories of source files")
    b.add_argument("--out", required=True, help=OUT_HELP)
    b.add_argument("--force", action="store_true", help=FORCE_HELP)
    b.add_argument(
        "--field", default="text", help="JSONL text field (default: %(default)s); chat records (conversations/messages) are detected"
    )
    b.add_argument("--chat-template", action="store_true", help="render chat records with the tokenizer's chat template")
    b.add_argument(
        "--glob", action="append", help="file pattern taken from directories (repeatable; default: common source and text files)"
    )
    b.add_argument("--exclude", action="append", help="path pattern (relative to an input directory) to leave out (repeatable)")
    b.add_argument("--shard-tokens", type=int, default=1 << 28, help="most tokens per shard (default: %(default)s)")
    b.add_argument("--shard-per-input", action="store_true", help="write one shard per input")
    b.add_argument("--append", action="store_true", help="add the inputs to the index already at --out")
    b.add_argument("--add-eos", action="store_true", help="end every document with the EOS token")
    b.add_argument("--ray", nargs="?", const=LOCAL_RAY, default=None, metavar="ADDRESS",
                   help="run tokenization and the shards' suffix arrays as Ray tasks: on the cluster at ADDRESS (e.g. "
                        "ray://head:10001 or auto), or without one on a local Ray instance with the machine's cores (or "
                        "--workers). Needs pip install 'retrospec[ray]'; without it, and without ADDRESS, a local process pool runs them "
                        "(with a warning). "
                        "Every worker must reach the inputs and write next to --out at the same paths (see indexes/cluster.md). "
                        "The shards are the same, byte for byte, as a build without it")
    b.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tasks run at once; without --ray, in a local process pool of N processes (a distributed build on "
                        "this machine)")
    b.add_argument("--piece-mb", type=int, default=64, metavar="MB",
                   help="with --ray/--workers: input MB per tokenization task, cut at document boundaries (default: %(default)s)")
    b.add_argument("--documents", action="store_true", help="build a document store (chunks, dense + lexical indexes) instead")
    b.add_argument("--embedder", default=None, help="sentence-transformers model for --documents (default: the offline all-MiniLM-L6-v2)")
    b.add_argument("--chunk-tokens", type=int, default=128, help="chunk size for --documents (default: %(default)s)")
    b.set_defaults(func=cmd_build)

    i = isub.add_parser("info", help="what an index holds")
    i.add_argument("dir")
    i.add_argument("--raw", action="store_true", help="print the whole manifest")
    i.set_defaults(func=cmd_info)

    v = isub.add_parser("verify", help="full check: every checksum, every token id, the suffix order (O(n)) or the store's database")
    v.add_argument("dir")
    v.add_argument("--tokenizer", help="also refuse an index built with another tokenizer or holding ids it lacks")
    v.set_defaults(func=cmd_verify)

    q = isub.add_parser("query", help="show the draft tree the index gives after a text")
    q.add_argument("dir")
    q.add_argument("text")
    q.add_argument("--tokenizer", help="tokenizer to encode the text (default: the one the index was built with, "
                   "found locally: a fetched short name, a directory or the Hugging Face cache; never downloaded)")
    q.add_argument("--max-nodes", type=int, default=32)
    q.set_defaults(func=cmd_query)

    m = isub.add_parser("merge", help="join indexes built with the same tokenizer into one")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--out", required=True, help=OUT_HELP)
    m.add_argument("--force", action="store_true", help=FORCE_HELP)
    m.set_defaults(func=cmd_merge)
