"""The document source: continuations of the current suffix inside the request's documents.

In retrieval-augmented generation the answer is largely copied from the retrieved passages
(RASD, RAPID). For each request this source takes the documents that came with it (a RAG
pipeline's retrieved passages) or retrieves the top chunks for the prompt from a
:class:`~retrospec.datastores.documents.DocumentStore`, tokenizes them with the target's tokenizer,
and drafts:

1. **exact**: the continuations, inside the documents, of every recent occurrence of the
   longest suffix of the context (as the context source does over the prompt);
2. **fuzzy**: when the model paraphrases, so that no long suffix matches exactly, it aligns
   the recently generated text to the documents with ``rapidfuzz`` and proposes what
   follows the aligned span.

No match crosses from one document into the next.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrospec.sources.base import Verified
from retrospec.sources.context import NgramIndex
from retrospec.sources.trie import PAD, continuation_trie
from retrospec.tree import DraftTree

log = logging.getLogger(__name__)

DOC_SEP = PAD
"""Separator between documents in the per-request index: no token has this id, and as the
trie's padding value it ends every continuation that reaches it."""


@dataclass(frozen=True)
class DocumentConfig:
    """Settings of :class:`DocumentSource`."""

    max_ngram: int = 10
    min_ngram: int = 2
    """Shortest exact suffix that anchors a draft."""
    max_matches: int = 16
    max_depth: int = 16
    match_weight: float = 2.0
    fuzzy_below: int = 3
    """Try fuzzy anchoring when the longest exact match is shorter than this."""
    fuzzy_tokens: int = 12
    """Recent tokens aligned to the documents."""
    fuzzy_threshold: float = 80.0
    """Least rapidfuzz ``partial_ratio`` (0-100) of an alignment that anchors a draft."""
    top_chunks: int = 5
    """Chunks retrieved from a store when the request brings no documents."""
    query_tokens: int = 256
    """Prompt tokens (from the end) used as the retrieval query."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if not 0 <= self.fuzzy_threshold <= 100:
            raise ValueError(f"fuzzy_threshold is a rapidfuzz score in [0, 100], got {self.fuzzy_threshold}")


class DocumentSource:
    """Drafts from documents (see the module docstring).

    Args:
        tokenizer: the target model's tokenizer.
        store: a :class:`~retrospec.datastores.documents.DocumentStore` to retrieve from when a request
            brings no documents (optional).
    """

    name = "documents"
    topk_wanted = 0

    def __init__(self, tokenizer, store=None, config: DocumentConfig | None = None):
        if tokenizer is None:
            raise ValueError("DocumentSource needs the target model's tokenizer")
        self.tokenizer = tokenizer
        self.store = store
        self.config = config or DocumentConfig()

    @classmethod
    def for_model(cls, tokenizer, store: str | None = None, config: DocumentConfig | None = None) -> DocumentSource:
        """A source over ``tokenizer``, retrieving from the store directory ``store`` if given."""
        opened = None
        if store:
            from retrospec.datastores.documents import DocumentStore

            opened = DocumentStore.open(store)
        return cls(tokenizer, opened, config)

    @classmethod
    def from_stores(cls, model=None, tokenizer=None, store: str | None = None) -> DocumentSource:
        """The registry's constructor: over ``tokenizer``, retrieving from ``store`` if given."""
        return cls.for_model(tokenizer, store=store)

    def documents_for(self, prompt: np.ndarray, documents: Sequence[str]) -> list[str]:
        """The request's own documents, else the top chunks the store retrieves for the prompt."""
        if documents:
            return [d for d in documents if d]
        if self.store is None or prompt.shape[0] == 0:
            return []
        query = self.tokenizer.decode(prompt[-self.config.query_tokens :].tolist(), skip_special_tokens=True)
        return [hit.text for hit in self.store.search(query, self.config.top_chunks)]

    def start_request(self, prompt: np.ndarray, documents: Sequence[str] = ()) -> DocumentSession:
        return DocumentSession(self, self.documents_for(np.asarray(prompt), documents))


class DocumentSession:
    """One request's documents, tokenized and indexed."""

    def __init__(self, source: DocumentSource, documents: list[str]):
        self.config = source.config
        self.tokenizer = source.tokenizer
        self.texts = documents
        self.index = NgramIndex(self.config.max_ngram)
        self.starts: list[int] = []  # index position of each document's first token
        self.offsets: list[np.ndarray] = []  # char end of each document token
        if documents:
            encoded = self.tokenizer(documents, add_special_tokens=False, return_offsets_mapping=True)
            for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"]):
                self.starts.append(len(self.index))
                self.index.extend(ids)
                self.index.extend([DOC_SEP])
                self.offsets.append(np.asarray(offsets, np.int64).reshape(-1, 2)[:, 1])

    def _fuzzy(self, context: np.ndarray) -> list[tuple[int, float]]:
        """Index positions that end the document spans the recent text aligns with, and the
        alignment scores (0-1).

        ``partial_ratio_alignment`` finds the span; when it covers less of the document than
        the recent text is long (the model paraphrased its last words: "finished" for
        "completed"), the anchor moves on by the difference, to the nearest token end.
        """
        from rapidfuzz import fuzz

        cfg = self.config
        recent = self.tokenizer.decode(context[-cfg.fuzzy_tokens :].tolist(), skip_special_tokens=True).strip()
        if len(recent) < 8:
            return []
        found = []
        for text, start, ends in zip(self.texts, self.starts, self.offsets):
            hit = fuzz.partial_ratio_alignment(recent, text, score_cutoff=cfg.fuzzy_threshold)
            if hit is None or ends.shape[0] == 0:
                continue
            unmatched = max((hit.src_end - hit.src_start) - (hit.dest_end - hit.dest_start), 0)
            target = hit.dest_end + unmatched
            token = int(np.argmin(np.abs(ends - target)))  # the document token that ends the anchor
            found.append((start + token, hit.score / 100.0))
        return found

    def propose(self, context: np.ndarray, max_nodes: int, max_depth: int) -> DraftTree:
        cfg = self.config
        if not self.texts or max_nodes <= 0 or max_depth <= 0:
            return DraftTree.empty()
        depth = min(max_depth, cfg.max_depth)
        tail = np.asarray(context[-cfg.max_ngram :]).tolist()
        matches = self.index.occurrences(tail, cfg.min_ngram, cfg.max_matches)
        ends = [end for end, _ in matches]
        weights = [cfg.match_weight**n for _, n in matches]
        longest = matches[0][1] if matches else 0
        if longest < cfg.fuzzy_below:
            for end, score in self._fuzzy(np.asarray(context)):
                ends.append(end)
                weights.append(score * cfg.match_weight**cfg.fuzzy_below)
                longest = max(longest, cfg.fuzzy_below)
        if not ends:
            return DraftTree.empty()
        # continuations end at a document separator (DOC_SEP is the trie's padding value)
        rows = self.index.continuation_rows(ends, depth)
        root_conf = longest / (longest + 1.0)
        return continuation_trie(rows, np.asarray(weights), root_conf=root_conf, decay=0.92, max_nodes=max_nodes)

    def observe(self, step: Verified) -> None:
        """The documents are fixed for the request: nothing to learn."""
