"""The supported transformers range and the few API differences inside it.

transformers 5.17 (what the GPU machine has) names the forward/cache keyword
``past_key_values``; 5.24 renamed it ``cache`` (the old name stays deprecated until 5.40)
and 5.17 would silently swallow ``cache=``. Everything that calls a model's ``forward``
goes through :func:`cache_kwarg` so that both work.
"""

from __future__ import annotations

import functools
import inspect

import transformers
from packaging.version import Version

MIN_TRANSFORMERS = Version("5.17.0")
MAX_TRANSFORMERS = Version("6.0.0")


def check_transformers(version: str = transformers.__version__) -> None:
    """Fail with a clear message outside the supported transformers range.

    >>> check_transformers("5.24.0")
    >>> check_transformers("4.57.1")
    Traceback (most recent call last):
    ...
    ImportError: retrospec supports transformers >=5.17.0,<6.0.0; found 4.57.1. ...
    """
    found = Version(version)
    if not (MIN_TRANSFORMERS <= Version(found.base_version) < MAX_TRANSFORMERS):
        raise ImportError(
            f"retrospec supports transformers >={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS}; found {version}. "
            f"Install a supported release, e.g. pip install 'transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS}'."
        )


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_kwarg(model) -> str:
    """The keyword under which ``model.forward`` takes its KV cache (``cache`` or ``past_key_values``)."""
    params = _forward_parameters(type(model))
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`; it cannot be sped up")


def accepts(model, name: str) -> bool:
    """Whether ``model.forward`` declares the keyword ``name``."""
    return name in _forward_parameters(type(model))


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover, or None if unbounded/unknown."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def pad_token_id(source) -> int:
    """The pad id of a tokenizer or generation config: its own, else its (first) EOS, else 0 —
    what ``generate()`` pads finished rows with. A pad id of 0 is a pad id.

    >>> from types import SimpleNamespace as NS
    >>> pad_token_id(NS(pad_token_id=0, eos_token_id=2)), pad_token_id(NS(pad_token_id=None, eos_token_id=[2, 3]))
    (0, 2)
    """
    pad = getattr(source, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    eos = getattr(source, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else 0
