"""Optional dependencies, grouped as the package's extras, and a clear error when one is missing.

A generate-only install (``pip install retrospec``) has torch, transformers, numpy, numba and
rapidfuzz; features that need more say which extra brings it, before any work starts.
"""

from __future__ import annotations

import importlib.util

EXTRAS: dict[str, tuple[str, ...]] = {
    "models": ("gguf", "accelerate"),
    "datastores": ("pydivsufsort", "faiss", "pyroaring", "sqlite_utils"),
    "plots": ("matplotlib",),
    "ray": ("ray",),
}
"""Extra name -> the modules it brings (module names, not distribution names)."""


def require(extra: str, what: str) -> None:
    """Raise ``ImportError`` naming ``extra`` when a module of it is not installed.

    >>> require("models", "fetching a model")
    >>> EXTRAS["nothing"] = ("no_such_module_here",)
    >>> require("nothing", "this feature")
    Traceback (most recent call last):
    ...
    ImportError: this feature needs no_such_module_here: pip install 'retrospec[nothing]'
    >>> del EXTRAS["nothing"]
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{what} needs {', '.join(missing)}: pip install 'retrospec[{extra}]'")
