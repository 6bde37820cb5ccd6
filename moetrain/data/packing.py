"""Tokenise documents into one sharded token stream per split, cache it, cut it into sequences.

Each document is tokenised, followed by the EOS id, and all documents of a split
are concatenated in order into one stream, stored as sharded token files
(:mod:`moetrain.data.shards`) under ``<cache root>/tokens/<key>/<split>/``, where
the key hashes everything the stream depends on (corpus fingerprint, text field,
split, tokenizer, format version) but not ``seq_len`` nor the shard size: the
stream is cut into windows at load time (:class:`PackedSequences`, a view of the
memory-mapped shards; windows may straddle shards). Any run with the same corpus
and tokenizer reuses the cache; an interrupted build resumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from moetrain.config import DataConfig
from moetrain.data.corpus import DataError, cache_root, corpus_fingerprint, load_documents
from moetrain.data.integrity import INDEX_FILE, META_FILE, damaged_from
from moetrain.data.shards import TokenStream, atomic_write, auto_num_proc, encode_batch, write_split

FORMAT_VERSION = 3
"""Bump when the stream layout changes, so old caches are not reused (2: sharded token files; 3: each shard's
size and SHA-256 recorded in its marker and the index)."""


def cache_key(cfg: DataConfig, tokenizer: Any) -> str:
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
    if getattr(cfg, "streaming", False):  # a stream skips the whole-corpus split rule: its own cache
        key["streaming"] = True
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def tokenize_documents(texts: Iterable[str], tokenizer: Any) -> np.ndarray:
    """One stream: each document's ids followed by ``tokenizer.eos_id`` (in memory; small inputs)."""
    tokens, _ = encode_batch(tokenizer, list(texts))
    return tokens


def token_directory(cfg: DataConfig, tokenizer: Any) -> Path:
    """``<cache root>/tokens/<cache key>``: the shards of ``cfg``'s train and val splits."""
    return cache_root(cfg) / "tokens" / cache_key(cfg, tokenizer)


def build_token_streams(
    cfg: DataConfig, tokenizer: Any, progress: bool = False, verify: Callable[[str], None] | None = None
) -> Path:
    """Tokenise ``cfg``'s corpus into sharded token files (resuming a partial build); returns the directory.
    With ``verify`` (``moetrain-prepare-data``), an existing cache is checked whole first and what is damaged
    is deleted, said through ``verify(line)``, and rebuilt (:func:`drop_damaged`)."""
    directory = token_directory(cfg, tokenizer)
    if verify is not None and directory.is_dir():
        drop_damaged(directory, tokenizer.vocab_size, verify)
    if (directory / META_FILE).exists() and all((directory / s / INDEX_FILE).exists() for s in ("train", "val")):
        return directory
    docs = dict(zip(("train", "val"), load_documents(cfg)))
    meta: dict[str, Any] = {"source": cfg.source, "tokenizer": tokenizer.name}
    for split, ds in docs.items():
        sized = hasattr(ds, "__len__")  # a stream's size is unknown: as big as a corpus gets
        num_proc = auto_num_proc(cfg.num_proc, ds.data.nbytes if sized else 2**62)
        report = None
        if progress:
            total = f"/{len(ds)}" if sized else ""

            def report(done: int, split: str = split, total: str = total) -> None:
                print(f"\r{directory.name} {split}: {done}{total} documents", end="", flush=True)

        index = write_split(directory / split, ds, tokenizer, cfg.shard_tokens, num_proc, report)
        if progress:
            print()
        meta[f"{split}_documents"], meta[f"{split}_tokens"] = index["documents"], index["tokens"]
    atomic_write(directory / META_FILE, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return directory


def drop_damaged(directory: Path, vocab_size: int, say: Callable[[str], None]) -> None:
    """Check both splits of a built cache whole (:func:`~moetrain.data.integrity.damaged_from`); delete a damaged
    split's index and its shards from the first damaged one on (the build then resumes there), and say so."""
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    except (OSError, ValueError):
        meta = None
    for split in ("train", "val"):
        split_dir = directory / split
        if (
            not (split_dir / INDEX_FILE).exists()
            or (damage := damaged_from(split_dir, vocab_size, meta, split)) is None
        ):
            continue
        first, why = damage
        say(f"{split_dir}: damaged ({why}); rebuilding from shard {first}")
        (split_dir / INDEX_FILE).unlink()
        meta_path.unlink(missing_ok=True)
        for path in split_dir.glob("shard_*"):
            if int(path.name[6:11]) >= first:
                path.unlink()


def token_streams(cfg: DataConfig, tokenizer: Any) -> tuple[TokenStream, TokenStream]:
    """The (train, val) token streams of ``cfg``, memory-mapped from the cache (built on a miss), each checked
    against its records when opened and its ids against the vocabulary as read (:mod:`moetrain.data.integrity`)."""
    directory = build_token_streams(cfg, tokenizer)
    try:
        meta = json.loads((directory / META_FILE).read_text())
        vocab = tokenizer.vocab_size
        return tuple(TokenStream(directory / s, vocab, meta, s) for s in ("train", "val"))  # type: ignore[return-value]
    except DataError as exc:
        raise DataError(f"data cache {directory} is damaged: {exc}; run moetrain-prepare-data to rebuild it") from None
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"data cache {directory} is unreadable ({exc}); delete it to rebuild") from exc


class PackedSequences:
    """Non-overlapping windows ``[n, seq_len + 1]`` of a sharded :class:`TokenStream`, read on demand.

    Row ``w`` is tokens ``[w * (seq_len + 1), (w + 1) * (seq_len + 1))`` of the stream (the ragged
    tail is dropped), whichever shards hold them; indexing returns ndarrays of the stream's dtype.
    """

    def __init__(self, stream: TokenStream, seq_len: int, rows: int | None = None) -> None:
        self.stream, self.width = stream, seq_len + 1
        n = len(stream) // self.width
        self.rows = n if rows is None else min(rows, n)
        self.dtype = stream.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.width)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.rows

    def _row(self, i: int) -> np.ndarray:
        if not -self.rows <= i < self.rows:
            raise IndexError(f"row {i} out of range for {self.rows} sequences")
        i %= self.rows
        return self.stream.read(i * self.width, (i + 1) * self.width)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return np.asarray(self._row(int(key)))
        rows = range(self.rows)[key] if isinstance(key, slice) else np.asarray(key).reshape(-1)
        out = np.empty((len(rows), self.width), dtype=self.dtype)
        for j, i in enumerate(rows):
            out[j] = self._row(int(i))
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every row (materialised: for small splits and statistics)."""
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class ConcatRows:
    """The rows of several row sets (ndarrays or :class:`PackedSequences`) one after another."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts], dtype=np.int64)])
        self.width = parts[0].shape[1]
        self.dtype = np.result_type(*(p.dtype for p in parts))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.offsets[-1]), self.width)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        rows = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key).reshape(-1)
        rows = np.where(rows < 0, rows + len(self), rows)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.width), dtype=self.dtype)
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            out[sel] = self.parts[p][rows[sel] - self.offsets[p]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every row (materialised)."""
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def token_counts(seqs: Any, size: int) -> np.ndarray:
    """How often each id in ``[0, size)`` occurs in the rows ``seqs`` (ndarray, :class:`PackedSequences` or
    :class:`ConcatRows`), read shard by shard: nothing the size of the corpus is copied into memory."""
    if isinstance(seqs, ConcatRows):
        return sum((token_counts(p, size) for p in seqs.parts), np.zeros(size, dtype=np.int64))
    if not isinstance(seqs, PackedSequences):
        return np.bincount(np.asarray(seqs).reshape(-1), minlength=size)[:size]
    counts, end = np.zeros(size, dtype=np.int64), seqs.rows * seqs.width
    for i, start in enumerate(seqs.stream.offsets[:-1]):
        if start < end:
            counts += np.bincount(seqs.stream.shard(i)[: end - start], minlength=size)[:size]
    return counts


def pack_stream(stream: TokenStream, seq_len: int, rows: int | None = None) -> np.ndarray | PackedSequences:
    """The windows of ``stream``: a plain memory-mapped view when it is one shard, else :class:`PackedSequences`."""
    if len(stream.shards) == 1:
        seqs = pack_sequences(stream.shard(0), seq_len)
        return seqs if rows is None else seqs[:rows]
    return PackedSequences(stream, seq_len, rows)


def pack_sequences(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows ``[n, seq_len + 1]`` of ``stream`` (a view; the ragged tail is dropped).

    Row ``w`` trains on input ``w[:-1]`` and target ``w[1:]``.
    """
    width = seq_len + 1
    n = stream.shape[0] // width
    return stream[: n * width].reshape(n, width)
