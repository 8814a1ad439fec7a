"""Draft sources by name, and the default mix of the fused speculator.

Names are those of the benchmark's methods: ``context``, ``suffix-index``, ``recycling``,
``documents``, ``drafter`` (a draft model reading everything), ``rapid`` (the draft model
reading only the parts of a long prompt most related to its end), ``rapid-transfer``
(rapid plus RAPID's knowledge transfer with weight 0.5: **lossy**, its output differs from
plain greedy by design). ``retrospec`` (the fused speculator) uses every source that is
available: context and Token Recycling always, a suffix index / document store / draft
model when one is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from retrospec.sources.context import ContextSource
from retrospec.sources.recycling import TokenRecycling

log = logging.getLogger(__name__)

SOURCE_NAMES = ("context", "suffix-index", "recycling", "documents", "drafter", "rapid", "rapid-transfer")


@dataclass(frozen=True)
class Datastores:
    """Paths and names of the optional datastores."""

    index: str | None = None
    """A suffix index directory."""
    recycling: str | None = None
    """A saved Token Recycling matrix to start from."""
    documents: str | None = None
    """A document store directory (otherwise document sources use each request's own documents)."""
    drafter: str | None = None
    """A draft model (short name, path or hub id) sharing the target's tokenizer."""


def recycling_for(model, path: str | None = None) -> TokenRecycling:
    """A Token Recycling source for ``model``: loaded from ``path`` when it exists, else empty."""
    if path and Path(path).exists():
        log.info("recycling: starting from %s", path)
        return TokenRecycling.load(path, model)
    return TokenRecycling.for_model(model)


def make_source(name: str, model, tokenizer, stores: Datastores = Datastores()):
    """A fresh source by name (see ``SOURCE_NAMES``)."""
    if name == "context":
        return ContextSource()
    if name == "recycling":
        if model is None:
            raise ValueError("the recycling source needs the model")
        return recycling_for(model, stores.recycling)
    if name == "suffix-index":
        if not stores.index:
            raise ValueError("the suffix-index source needs an index directory (--index DIR)")
        from retrospec.datastores.suffix_index import SuffixIndex

        return SuffixIndex.open(stores.index, tokenizer=tokenizer)
    if name == "documents":
        from retrospec.sources.documents import DocumentSource

        return DocumentSource.for_model(tokenizer, store=stores.documents)
    if name in ("drafter", "rapid", "rapid-transfer"):
        if not stores.drafter:
            raise ValueError(f"the {name} source needs a draft model (--drafter NAME)")
        from retrospec.sources.drafter import DrafterConfig, ModelDrafter

        # rapid: the drafter reads only the chunks of a long prompt most related to its end;
        # rapid-transfer also shifts the target toward the drafter (LOSSY, see DrafterConfig.transfer)
        config = {
            "drafter": None,
            "rapid": DrafterConfig(rapid_threshold=2048),
            "rapid-transfer": DrafterConfig(rapid_threshold=2048, transfer=0.5),
        }[name]
        drafter = ModelDrafter.load(stores.drafter, like=model, config=config)
        drafter.name = name
        return drafter
    raise ValueError(f"unknown source {name!r}; known: {', '.join(SOURCE_NAMES)}")


def default_sources(model=None, tokenizer=None, stores: Datastores = Datastores()) -> list:
    """Context + Token Recycling (given the model) + documents (given the tokenizer), plus
    every datastore ``stores`` names."""
    names = ["context"]
    if model is not None:
        names.append("recycling")
    if stores.index:
        names.append("suffix-index")
    if tokenizer is not None:
        names.append("documents")  # drafts only when a request brings documents (or a store is given)
    if stores.drafter:
        names.append("drafter")
    return [make_source(n, model, tokenizer, stores) for n in names]

