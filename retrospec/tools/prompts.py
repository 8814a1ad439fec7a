"""Benchmark prompts: reading JSONL records and rendering them as the model sees them.

Two schemas are understood:

* Spec-Bench style: ``question_id`` or ``id``, ``category``, ``turns`` (user turns; several
  turns are run one after the other with the model's own previous answers); an optional
  ``passages`` field feeds document sources.
* HumanEval: ``task_id`` + ``prompt``, category ``code``, completed as raw text without a
  chat template.

MT-Bench's eight sub-categories are grouped as Spec-Bench's ``multi-turn``.
"""

from __future__ import annotations

import ast
import gzip
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)
MULTI_TURN = "multi-turn"


@dataclass(frozen=True)
class PromptRecord:
    """One benchmark item."""

    id: str
    category: str
    turns: tuple[str, ...]
    raw: bool = False
    """Complete ``turns[0]`` as plain text (no chat template), as for HumanEval."""
    passages: tuple[str, ...] = field(default=(), compare=False)
    """Documents that come with the item (RAG), for document sources."""


def _listish(value) -> list:
    """Fields are lists, or (in some files) Python-literal strings of lists."""
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        return list(parsed) if isinstance(parsed, (list, tuple)) else [value]
    return list(value) if value is not None else []


def _passage_text(p) -> str:
    if isinstance(p, dict):
        title, text = p.get("title", ""), p.get("text", "")
        return f"{title}\n{text}".strip()
    return str(p)


def parse_record(obj: dict, line: int = 0) -> PromptRecord:
    """A :class:`PromptRecord` from one JSON object (either schema)."""
    if "turns" in obj:
        rid = obj.get("question_id", obj.get("id", line))
        category = str(obj.get("category", "default"))
        if category in MT_BENCH_CATEGORIES:
            category = MULTI_TURN
        turns = tuple(str(t) for t in _listish(obj["turns"]))
        if not turns:
            raise ValueError(f"record {rid} (line {line}) has no turns")
        passages = tuple(_passage_text(p) for p in _listish(obj.get("passages")))
        return PromptRecord(str(rid), category, turns, passages=passages)
    if "task_id" in obj and "prompt" in obj:
        return PromptRecord(str(obj["task_id"]), "code", (str(obj["prompt"]),), raw=True)
    raise ValueError(f"line {line}: neither a Spec-Bench record (turns) nor a HumanEval one (task_id + prompt); keys: {sorted(obj)}")


def read_jsonl(path: str | Path):
    """Yield JSON objects of a (optionally gzipped) JSONL file, with clear errors on bad lines."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None


def load_prompts(path: str | Path, per_category: int | None = None, categories: list[str] | None = None) -> list[PromptRecord]:
    """Records of a JSONL file, the first ``per_category`` of each category, in file order."""
    taken: OrderedDict[str, int] = OrderedDict()
    out = []
    for line_no, obj in read_jsonl(path):
        record = parse_record(obj, line_no)
        if categories and record.category not in categories:
            continue
        if per_category is not None and taken.get(record.category, 0) >= per_category:
            continue
        taken[record.category] = taken.get(record.category, 0) + 1
        out.append(record)
    if not out:
        raise ValueError(f"{path}: no prompts selected")
    return out


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict], raw: bool = False):
    """Token ids ``LongTensor [1, L]`` of a conversation ending in a user turn, as the model
    expects it: its chat template with the generation prompt, or plain text for raw
    completions and models without a template."""
    if raw or not has_chat_template(tokenizer):
        text = messages[-1]["content"] if raw else "\n\n".join(m["content"] for m in messages)
        return tokenizer(text, return_tensors="pt").input_ids
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return ids["input_ids"]
