"""Where retrospec keeps what it downloads, converts and measures."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$RETROSPEC_CACHE``, else ``$XDG_CACHE_HOME/retrospec``, else ``~/.cache/retrospec``."""
    explicit = os.environ.get("RETROSPEC_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base).expanduser() / "retrospec"


def cache_dir(*parts: str) -> Path:
    """A sub-directory of the cache root, created on demand."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
