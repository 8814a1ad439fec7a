"""The default source mix of the fused speculator (``method retrospec`` in the benchmark)."""

from __future__ import annotations

import logging
from pathlib import Path

from retrospec.sources.context import ContextSource
from retrospec.sources.recycling import TokenRecycling

log = logging.getLogger(__name__)


def recycling_for(model, path: str | None = None) -> TokenRecycling:
    """A Token Recycling source for ``model``: loaded from ``path`` when it exists, else empty."""
    if path and Path(path).exists():
        log.info("recycling: starting from %s", path)
        return TokenRecycling.load(path, model)
    return TokenRecycling.for_model(model)


def default_sources(model=None, tokenizer=None, *, index: str | None = None, drafter: str | None = None, recycling: str | None = None) -> list:
    """Context + Token Recycling (with a model), plus the optional datastores the caller names."""
    sources: list = [ContextSource()]
    if model is not None:
        sources.append(recycling_for(model, recycling))
    return sources
