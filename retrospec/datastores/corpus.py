"""Reading corpora into documents: JSONL (plain or ShareGPT chats), text files, source trees.

Each document is ``(text, source, meta)``. Chats can be rendered with the model's chat
template, so the index holds them exactly as the model sees conversations.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst")
DEFAULT_TREE_GLOBS = ("*.py", "*.md", "*.txt", "*.rst", "*.c", "*.h", "*.cpp", "*.js", "*.ts", "*.java", "*.go", "*.rs")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bing": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "system": "system"}


class CorpusError(ValueError):
    """An input cannot be read as a corpus."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    r"""``text`` with lone UTF-16 surrogates (which JSON's ``"\ud800"`` can produce and no
    tokenizer accepts) replaced by U+FFFD.

    >>> clean_text("a\ud800b") == "a\ufffdb"
    True
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    meta: dict


@dataclass(frozen=True)
class ReadOptions:
    field: str = "text"
    """JSONL field holding the text."""
    chat_template: bool = False
    """Render chat records (``conversations``/``messages``) with the tokenizer's chat template."""
    globs: tuple[str, ...] = DEFAULT_TREE_GLOBS
    """File patterns taken from directories."""
    exclude: tuple[str, ...] = ()
    """Patterns (of paths relative to the input directory) left out, e.g. ``site-packages/*``."""


def _messages(record: dict) -> list[dict] | None:
    turns = record.get("conversations") or record.get("messages")
    if not isinstance(turns, list):
        return None
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            continue
        out.append({"role": role, "content": content})
    return out


def _render_chat(messages: list[dict], tokenizer, use_template: bool) -> str:
    if use_template:
        if not getattr(tokenizer, "chat_template", None):
            raise CorpusError(f"--chat-template: tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


def jsonl_document(record_text: str, where: str, source: str, options: ReadOptions, tokenizer) -> Document | None:
    """The document of one JSONL line (``None`` for a blank line); ``where`` names the line in errors."""
    if not record_text.strip():
        return None
    try:
        record = json.loads(record_text)
    except json.JSONDecodeError as err:
        raise CorpusError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object")
    text = record.get(options.field)
    if not isinstance(text, str):
        messages = _messages(record)
        if messages is None:
            raise CorpusError(
                f"{where}: no text field {options.field!r} and no chat "
                f"('conversations'/'messages'); use --field to name the text field"
            )
        text = _render_chat(messages, tokenizer, options.chat_template)
    return Document(clean_text(text), source, {"id": record.get("id")} if "id" in record else {})


def read_jsonl(path: Path, options: ReadOptions, tokenizer) -> Iterator[Document]:
    """The documents of one JSONL (or .jsonl.gz) file, one per line that holds text (see
    :func:`jsonl_document`); a file that cannot be read raises :class:`CorpusError`."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                doc = jsonl_document(line, f"{path}:{line_no}", f"{path.name}:{line_no}", options, tokenizer)
                if doc is not None:
                    yield doc
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise CorpusError(f"{path}: unreadable ({err})") from None


def is_jsonl(path: Path) -> bool:
    """Whether ``path`` is read as JSON lines (else as one text document)."""
    return path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson"))


def tree_files(path: Path, options: ReadOptions = ReadOptions()) -> list[Path]:
    """The files of a directory input, in the order they are read."""
    files = sorted(
        p for p in {p for g in options.globs for p in path.rglob(g) if p.is_file()}
        if not any(fnmatch.fnmatch(str(p.relative_to(path)), x) for x in options.exclude)
    )
    if not files:
        raise CorpusError(f"{path}: no files matching {', '.join(options.globs)}")
    return files


def read_text(path: Path) -> Document:
    try:
        return Document(path.read_text(encoding="utf-8"), str(path), {})
    except (OSError, UnicodeDecodeError) as err:
        raise CorpusError(f"{path}: unreadable ({err})") from None


def iter_documents(inputs: list[str | Path], options: ReadOptions = ReadOptions(), tokenizer=None) -> Iterator[Document]:
    """Documents of every input, in order: JSONL(.gz) records, text files, or directory trees."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for file in tree_files(path, options):
                yield read_text(file)
        elif not path.exists():
            raise CorpusError(f"{path}: no such file or directory")
        elif is_jsonl(path):
            yield from read_jsonl(path, options, tokenizer)
        else:
            yield read_text(path)
