"""Draft sources by name, and the default mix of the fused speculator.

:data:`SOURCES` is the one table of sources: one line each. A line names the module and
class of a source, the datastore it reads (its key in :class:`Datastores` and its command
line flag), what it needs, and whether ``retrospec`` (the fused speculator) uses it by
default. The class builds itself with ``from_stores(model, tokenizer, store, **options)``.
Nothing else needs to know a source by name: the bench's methods (``context+suffix-index``),
the CLI's datastore flags and ``retrospec.<Class>`` all come from here.

Names: ``context``, ``suffix-index``, ``recycling``, ``documents``, ``drafter`` (a draft
model reading everything), ``history`` (earlier requests of the same speculator),
``rapid`` (the draft model reading only the parts of a long prompt most related to its
end), ``rapid-transfer`` (rapid plus RAPID's knowledge transfer with weight 0.5: **lossy**, its output differs from plain greedy by design).
"""

from __future__ import annotations

import importlib
import logging
from typing import NamedTuple

log = logging.getLogger(__name__)


class Entry(NamedTuple):
    """One registered source."""

    module: str
    cls: str
    store: str | None = None
    """Key of its datastore in :class:`Datastores` (and the CLI flag ``--<store>``), if any."""
    store_help: str = ""
    needs: tuple[str, ...] = ()
    """What it cannot be built without: ``model``, ``tokenizer``, ``store``."""
    default: bool = False
    """Part of :func:`default_sources` whenever what it needs is there."""
    options: tuple[tuple[str, object], ...] = ()
    """Keyword arguments for ``from_stores``."""


SOURCES: dict[str, Entry] = {
    "context": Entry("retrospec.sources.context", "ContextSource", default=True),
    "recycling": Entry("retrospec.sources.recycling", "TokenRecycling", "recycling",
                       "a saved Token Recycling matrix (.npz) to start from", needs=("model",), default=True),
    "suffix-index": Entry("retrospec.datastores.suffix_index", "SuffixIndex", "index",
                          "a suffix index directory (retrospec index build)", needs=("store",), default=True),
    "documents": Entry("retrospec.sources.documents", "DocumentSource", "documents",
                       "a document store directory (default: each request's own documents)", needs=("tokenizer",), default=True),
    "drafter": Entry("retrospec.sources.drafter", "ModelDrafter", "drafter",
                     "a draft model (short name, path or hub id) sharing the target's tokenizer", needs=("model", "store"), default=True),
    # default: on Spec-Bench (no cross-request repetition) it did not lower the fused MAT
    # (2.69 -> 2.71 at budget 16, benchmarks/history); on repetitive workloads it adds 8-27%
    "history": Entry("retrospec.sources.history", "HistorySource", "history",
                     "a saved history directory (loaded when it exists; HistorySource.save writes it)", default=True),
    "rapid": Entry("retrospec.sources.drafter", "ModelDrafter", "drafter", needs=("model", "store"),
                   options=(("rapid_threshold", 2048),)),
    "rapid-transfer": Entry("retrospec.sources.drafter", "ModelDrafter", "drafter", needs=("model", "store"),
                            options=(("rapid_threshold", 2048), ("transfer", 0.5))),
}

SOURCE_NAMES = tuple(SOURCES)
STORE_KEYS = tuple(dict.fromkeys(e.store for e in SOURCES.values() if e.store))


class Datastores:
    """Paths (or names) of the datastores the sources read, by key (see :data:`SOURCES`):
    ``index``, ``recycling``, ``documents``, ``drafter``, ``history``.

    >>> Datastores(index="runs/idx").index, Datastores().drafter
    ('runs/idx', None)
    """

    def __init__(self, **stores: str | None):
        unknown = set(stores) - set(STORE_KEYS)
        if unknown:
            raise ValueError(f"unknown datastore {sorted(unknown)}; known: {', '.join(STORE_KEYS)}")
        self._stores = {k: v for k, v in stores.items() if v}

    def __getattr__(self, key: str):
        if key.startswith("_"):
            raise AttributeError(key)
        if key not in STORE_KEYS:
            raise AttributeError(f"no datastore {key!r}; known: {', '.join(STORE_KEYS)}")
        return self._stores.get(key)

    def __repr__(self) -> str:
        return f"Datastores({', '.join(f'{k}={v!r}' for k, v in self._stores.items())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Datastores) and self._stores == other._stores


def source_class(name: str):
    """The class of the registered source ``name``."""
    entry = SOURCES[name]
    return getattr(importlib.import_module(entry.module), entry.cls)


def recycling_for(model, path: str | None = None):
    """A Token Recycling source for ``model``: loaded from ``path`` when it exists, else empty."""
    return source_class("recycling").from_stores(model, None, path)


def make_source(name: str, model, tokenizer, stores: Datastores | None = None):
    """A fresh source by name (see :data:`SOURCES`)."""
    entry = SOURCES.get(name)
    if entry is None:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(SOURCE_NAMES)}")
    store = getattr(stores or Datastores(), entry.store) if entry.store else None
    if "model" in entry.needs and model is None:
        raise ValueError(f"the {name} source needs the model")
    if "tokenizer" in entry.needs and tokenizer is None:
        raise ValueError(f"the {name} source needs the model's tokenizer")
    if "store" in entry.needs and not store:
        raise ValueError(f"the {name} source needs {entry.store_help or 'a datastore'} (--{entry.store})")
    source = source_class(name).from_stores(model, tokenizer, store, **dict(entry.options))
    source.name = name
    return source


def default_sources(model=None, tokenizer=None, stores: Datastores | None = None) -> list:
    """Every default source whose needs are met: context, Token Recycling (given the
    model), the documents source (given the tokenizer; it drafts only when a request
    brings documents or a store is given), the history of earlier requests (loaded from
    ``stores.history`` when that exists), and each source whose datastore ``stores`` names."""
    stores = stores or Datastores()
    have = {"model": model is not None, "tokenizer": tokenizer is not None}
    names = []
    for name, entry in SOURCES.items():
        met = all(have.get(need, bool(entry.store and getattr(stores, entry.store))) for need in entry.needs)
        if entry.default and met:
            names.append(name)
    return [make_source(n, model, tokenizer, stores) for n in names]
