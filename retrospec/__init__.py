"""retrospec: training-free, lossless speculative decoding for HuggingFace transformers.

Cheap sources (the request's own context, corpus indexes, the model's recycled
predictions, retrieved documents, a small drafter) guess the next tokens as a tree; the
model verifies the whole tree in one forward pass and keeps the longest branch it agrees
with, so greedy output is token for token that of plain ``generate()``.
"""

from retrospec.compat import check_transformers

check_transformers()

from retrospec.assistant import AssistantChain  # noqa: E402
from retrospec.hooks import SpecOutput, custom_generate, generate  # noqa: E402
from retrospec.models import load_model  # noqa: E402
from retrospec.defaults import Datastores, default_sources  # noqa: E402
from retrospec.documents import DocumentStore  # noqa: E402
from retrospec.sources.documents import DocumentConfig, DocumentSource  # noqa: E402
from retrospec.sources.drafter import DrafterConfig, ModelDrafter  # noqa: E402
from retrospec.sources.recycling import TokenRecycling  # noqa: E402
from retrospec.sources.suffix_index import SuffixConfig, SuffixIndex  # noqa: E402
from retrospec.sources import ContextConfig, ContextSource, Source, Verified  # noqa: E402
from retrospec.speculator import Speculator, SpeculatorConfig  # noqa: E402
from retrospec.stats import SpecStats  # noqa: E402
from retrospec.tree import DraftTree, TreeBuffers, fuse, prune, to_buffers  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Datastores",
    "DocumentConfig",
    "DocumentSource",
    "DocumentStore",
    "DrafterConfig",
    "ModelDrafter",
    "SuffixConfig",
    "SuffixIndex",
    "TokenRecycling",
    "default_sources",
    "AssistantChain",
    "ContextConfig",
    "ContextSource",
    "DraftTree",
    "Source",
    "SpecOutput",
    "SpecStats",
    "Speculator",
    "SpeculatorConfig",
    "TreeBuffers",
    "Verified",
    "custom_generate",
    "fuse",
    "generate",
    "load_model",
    "prune",
    "to_buffers",
]
