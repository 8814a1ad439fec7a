"""``with_documents``: the step of a retrieval chain that hands the retrieved documents both
to the prompt (as text) and to retrospec's document source (as drafts)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.prompts import BasePromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda

from langchain_retrospec.chat_models import ChatRetrospec


def join_documents(documents: Sequence[Document]) -> str:
    """The documents' texts, one per paragraph.

    >>> join_documents([Document("Harlow Lighthouse, 1871."), Document("Gull Island.")])
    'Harlow Lighthouse, 1871.\\n\\nGull Island.'
    """
    return "\n\n".join(d.page_content for d in documents)


def with_documents(
    prompt: BasePromptTemplate,
    llm: ChatRetrospec,
    *,
    documents_key: str = "documents",
    context_key: str = "context",
    format_documents: Callable[[Sequence[Document]], str] = join_documents,
) -> Runnable[dict[str, Any], Any]:
    """A runnable ``{question, documents, ...} -> AIMessage`` for retrieval chains.

    The input's ``documents`` (``list[Document]``, as a retriever returns them) are formatted
    into the prompt variable ``context`` (the other input keys go to the prompt as they are)
    and passed to ``llm`` as ``documents=``, so the reply is drafted from them::

        chain = {"question": RunnablePassthrough(), "documents": retriever} | with_documents(prompt, llm) | StrOutputParser()

    ``stream`` streams the model's chunks, one per committed block.
    """
    if not isinstance(llm, ChatRetrospec):
        raise TypeError(f"with_documents needs a ChatRetrospec (whose drafts the documents feed), got {type(llm).__name__}")

    def route(inputs: dict[str, Any]) -> Runnable:
        if documents_key not in inputs:
            raise ValueError(f"with_documents: the input has no {documents_key!r} key (keys: {sorted(inputs)})")
        docs = list(inputs[documents_key] or [])
        values = {k: v for k, v in inputs.items() if k != documents_key}
        values[context_key] = format_documents(docs)
        texts = [d.page_content if isinstance(d, Document) else str(d) for d in docs]
        # a Runnable returned here is invoked (or streamed) by LangChain in this one's place
        return RunnableLambda(lambda _: values, name="prompt_values") | prompt | llm.bind(documents=texts)

    return RunnableLambda(route, name="with_documents")
