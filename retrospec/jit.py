"""``njit``: numba's compiler for retrospec's kernels, or plain Python in lean processes.

Every hot loop (suffix-array search, trie merging, tree fusion, acceptance walks) is
written once, in the subset of Python numba compiles. By default it is compiled. A process
that sets ``RETROSPEC_JIT=0`` before importing retrospec runs the same functions as
ordinary Python instead and never imports numba — whose LLVM runtime is ~130 MB of
resident memory, most of a process that only serves suffix-index queries (which peaks at
~70 MB without it on a 500M-token index, at several times the query latency). Generation
itself should keep the default.

``njit(py=f)`` names a faster plain-Python stand-in for a kernel whose numba form is slow
when interpreted (each must return what the kernel returns: tests run both).
"""

from __future__ import annotations

import os
from collections.abc import Callable

ENABLED = os.environ.get("RETROSPEC_JIT", "1").strip().lower() not in ("0", "false", "no", "off")
"""Whether kernels are compiled (read once, when retrospec is first imported)."""

if ENABLED:
    import numba


def njit(*, py: Callable | None = None, **options) -> Callable[[Callable], Callable]:
    """``numba.njit(cache=True, nogil=True, **options)`` when compiling, else the function
    itself (or its stand-in ``py``)."""

    def decorate(fn: Callable) -> Callable:
        if ENABLED:
            return numba.njit(cache=True, nogil=True, **options)(fn)
        return py or fn

    return decorate
