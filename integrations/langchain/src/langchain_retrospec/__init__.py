"""LangChain integration of retrospec: a local chat model with lossless speculative decoding,
and the retrieval-chain step that turns retrieved documents into drafts."""

from langchain_retrospec.chat_models import ChatRetrospec
from langchain_retrospec.rag import join_documents, with_documents

__all__ = ["ChatRetrospec", "join_documents", "with_documents"]
