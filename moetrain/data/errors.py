"""What the corpus loaders share: the data error and the stable per-document hash of the split."""

from __future__ import annotations

import hashlib


class DataError(ValueError):
    """Bad data input (missing file, empty corpus, missing column, ...); the message names it."""


def _first_line(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause (loaders wrap the useful error)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _hash_unit(seed: int, key: str) -> float:
    """A stable number in [0, 1) for ``(seed, key)``."""
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
