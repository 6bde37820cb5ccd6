"""Tokenise documents into one token stream per split, cache it, cut it into sequences.

Each document is tokenised, followed by the EOS id, and all documents of a split
are concatenated in order into one stream. Streams are cached as ``.npy`` files
(uint16 when the vocabulary fits, else int32) under
``<cache root>/tokens/<key>/``, where the key hashes everything the stream
depends on (corpus fingerprint, text field, split, tokenizer, format version) but
not ``seq_len``: the stream is cut into windows at load time, as a view of the
memory-mapped file. Files are written to a temporary name and ``os.replace``-d,
so ranks racing to build the same cache all end up reading a complete file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

from moetrain.config import DataConfig
from moetrain.data.corpus import DataError, cache_root, corpus_fingerprint, load_documents

FORMAT_VERSION = 1
"""Bump when the stream layout changes, so old caches are not reused."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65535), else int32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.int32)


def cache_key(cfg: DataConfig, tokenizer) -> str:
    """Hash of everything the token streams of ``cfg`` depend on."""
    key = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "corpus": corpus_fingerprint(cfg),
        "hub_config": cfg.hub_config,
        "text_field": cfg.text_field,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def tokenize_documents(texts: Iterable[str], tokenizer) -> np.ndarray:
    """One stream: each document's ids followed by ``tokenizer.eos_id``."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    pieces = []
    for text in texts:
        ids = np.asarray(tokenizer.encode(text))
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            raise ValueError(f"tokenizer {tokenizer.name} produced ids outside [0, {tokenizer.vocab_size})")
        pieces.append(ids.astype(dtype, copy=False))
        pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _iter_texts(ds, batch_size: int = 1024) -> Iterator[str]:
    for batch in ds.iter(batch_size=batch_size):
        yield from batch["text"]


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(file)`` to a temporary file in the same directory, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def token_streams(cfg: DataConfig, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The (train, val) token streams of ``cfg``, memory-mapped from the cache (built on a miss)."""
    directory = cache_root(cfg) / "tokens" / cache_key(cfg, tokenizer)
    train_path, val_path = directory / "train.npy", directory / "val.npy"
    if not (train_path.exists() and val_path.exists()):
        train_docs, val_docs = load_documents(cfg)
        train = tokenize_documents(_iter_texts(train_docs), tokenizer)
        val = tokenize_documents(_iter_texts(val_docs), tokenizer)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(val_path, lambda f: np.save(f, val))
        _atomic_write(train_path, lambda f: np.save(f, train))
        meta = {
            "source": cfg.source,
            "tokenizer": tokenizer.name,
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "train_tokens": int(train.size),
            "val_tokens": int(val.size),
        }
        _atomic_write(directory / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    try:
        return np.load(train_path, mmap_mode="r"), np.load(val_path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"data cache {directory} is unreadable ({exc}); delete it to rebuild") from exc


def pack_sequences(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows ``[n, seq_len + 1]`` of ``stream`` (a view; the ragged tail is dropped).

    Row ``w`` trains on input ``w[:-1]`` and target ``w[1:]``.
    """
    width = seq_len + 1
    n = stream.shape[0] // width
    return stream[: n * width].reshape(n, width)
