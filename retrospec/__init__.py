"""retrospec: training-free, lossless speculative decoding for HuggingFace transformers.

Cheap sources (the request's own context, corpus indexes, the model's recycled
predictions, retrieved documents, a small drafter) guess the next tokens as a tree; the
model verifies the whole tree in one forward pass and keeps the longest branch it agrees
with, so greedy output is token for token that of plain ``generate()``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Names resolve on first use (PEP 562), so a process that only queries an index
# (``retrospec.datastores.suffix_index``: numpy + numba) never imports torch or transformers.
_EXPORTS = {
    "AssistantChain": "retrospec.assistant",
    "SpecOutput": "retrospec.hooks",
    "custom_generate": "retrospec.hooks",
    "generate": "retrospec.hooks",
    "load_model": "retrospec.models",
    "Datastores": "retrospec.sources.registry",
    "default_sources": "retrospec.sources.registry",
    "DocumentStore": "retrospec.datastores.documents",
    "DocumentConfig": "retrospec.sources.documents",
    "DrafterConfig": "retrospec.sources.drafter",
    "SuffixConfig": "retrospec.datastores.suffix_index",
    "ContextConfig": "retrospec.sources.context",
    "Source": "retrospec.sources.base",
    "Verified": "retrospec.sources.base",
    "Speculator": "retrospec.drafting.speculator",
    "SpeculatorConfig": "retrospec.drafting.speculator",
    "SpecStats": "retrospec.stats",
    "DraftTree": "retrospec.tree",
    "TreeBuffers": "retrospec.buffers",
    "fuse": "retrospec.tree",
    "prune": "retrospec.tree",
    "to_buffers": "retrospec.buffers",
    "tree_buffers": "retrospec.buffers",
    "generate_many": "retrospec.hooks",
    "VerifierConfig": "retrospec.verify.verifiers",
}



def _register_sources() -> None:
    """Every registered source's class is ``retrospec.<Class>`` (see retrospec.sources.registry)."""
    from retrospec.sources.registry import SOURCES

    for entry in SOURCES.values():
        _EXPORTS.setdefault(entry.cls, entry.module)


_register_sources()


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrospec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from retrospec.assistant import AssistantChain
    from retrospec.buffers import TreeBuffers, to_buffers, tree_buffers
    from retrospec.datastores.documents import DocumentStore
    from retrospec.datastores.suffix_index import SuffixConfig, SuffixIndex
    from retrospec.drafting.speculator import Speculator, SpeculatorConfig
    from retrospec.hooks import SpecOutput, custom_generate, generate, generate_many
    from retrospec.models import load_model
    from retrospec.sources.base import Source, Verified
    from retrospec.sources.context import ContextConfig, ContextSource
    from retrospec.sources.documents import DocumentConfig, DocumentSource
    from retrospec.sources.drafter import DrafterConfig, ModelDrafter
    from retrospec.sources.recycling import TokenRecycling
    from retrospec.sources.registry import Datastores, default_sources
    from retrospec.stats import SpecStats
    from retrospec.tree import DraftTree, fuse, prune
    from retrospec.verify.verifiers import VerifierConfig

__version__ = "0.1.0"

__all__ = [
    "AssistantChain",
    "ContextConfig",
    "ContextSource",
    "Datastores",
    "DocumentConfig",
    "DocumentSource",
    "DocumentStore",
    "DraftTree",
    "DrafterConfig",
    "ModelDrafter",
    "Source",
    "SpecOutput",
    "SpecStats",
    "Speculator",
    "SpeculatorConfig",
    "SuffixConfig",
    "SuffixIndex",
    "TokenRecycling",
    "TreeBuffers",
    "Verified",
    "VerifierConfig",
    "custom_generate",
    "default_sources",
    "fuse",
    "generate",
    "generate_many",
    "load_model",
    "prune",
    "to_buffers",
    "tree_buffers",
]
