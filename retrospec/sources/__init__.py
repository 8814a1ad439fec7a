"""Draft sources: each turns a context into a scored draft tree."""

from retrospec.sources.base import Session, Source, Verified
from retrospec.sources.context import ContextConfig, ContextSource

__all__ = ["ContextConfig", "ContextSource", "Session", "Source", "Verified"]
