"""The default source mix of the fused speculator (``method retrospec`` in the benchmark)."""

from __future__ import annotations

import logging

from retrospec.sources.context import ContextSource

log = logging.getLogger(__name__)


def default_sources(model=None, tokenizer=None, *, index: str | None = None, drafter: str | None = None, recycling: str | None = None) -> list:
    """The context source, plus whatever optional datastores the caller names."""
    sources: list = [ContextSource()]
    return sources
