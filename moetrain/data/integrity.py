"""Checks of a token cache against its own records: nothing damaged is read as less (or other) data.

What is recorded (:mod:`moetrain.data.shards`): each shard's marker holds its token and document counts, its
file's size in bytes and SHA-256; ``index.json`` lists every shard's ``tokens`` / ``bytes`` / ``sha256`` and the
split's totals; the cache's ``meta.json`` holds each split's totals as the build counted them.

* Opening a split (every run, :func:`check_split`): the index against the markers and the build's meta, each
  shard file's size against its recorded count, no shard beyond the index's count. Sizes and a few small JSON
  files only; a mismatch is one :class:`~moetrain.data.errors.DataError` line naming the file.
* Reading (:class:`~moetrain.data.shards.TokenStream`): each shard's ids against the vocabulary, once per shard,
  the first time it is read (:func:`check_ids`).
* ``moetrain-prepare-data`` (:func:`damaged_from`): all of the above plus every shard's SHA-256 and ids; the
  first damaged shard and everything after it are deleted and rebuilt, and it says so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from moetrain.data.errors import DataError

INDEX_FILE = "index.json"
META_FILE = "meta.json"
HASH_CHUNK = 2**24
TOKEN_DTYPES = ("uint16", "uint32")
"""What :func:`~moetrain.data.shards.token_dtype` writes."""


def shard_paths(directory: Path, i: int) -> tuple[Path, Path, Path]:
    """Tokens, document index and completion marker of shard ``i`` (as :func:`~moetrain.data.shards.shard_files`)."""
    stem = directory / f"shard_{i:05d}"
    return stem.with_suffix(".bin"), stem.with_suffix(".docs.npy"), stem.with_suffix(".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a JSON object")
    return data


def _count(data: dict[str, Any], key: str, path: Path) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DataError(f"{path}: {key}={value!r} is not a count")
    return value


def read_index(directory: Path) -> dict[str, Any]:
    """``index.json`` with its counts and per-shard records checked for type (one line naming it otherwise)."""
    path = directory / INDEX_FILE
    index = _read_json(path)
    for key in ("shards", "documents", "tokens"):
        _count(index, key, path)
    if index.get("dtype") not in TOKEN_DTYPES:
        raise DataError(f"{path}: dtype={index.get('dtype')!r} is not a token type ({', '.join(TOKEN_DTYPES)})")
    files = index.get("files")
    if not isinstance(files, list) or len(files) != index["shards"] or not all(isinstance(f, dict) for f in files):
        raise DataError(f"{path}: lists {index['shards']} shards but records {len(files or [])} shard files")
    return index


def check_shard(directory: Path, i: int, index: dict[str, Any]) -> dict[str, Any]:
    """Shard ``i``'s marker against the index's record, and its files' sizes against the marker; its marker."""
    tokens_path, docs_path, marker_path = shard_paths(directory, i)
    marker = _read_json(marker_path)
    tokens, documents = _count(marker, "tokens", marker_path), _count(marker, "documents", marker_path)
    record = index["files"][i]
    for key in ("tokens", "bytes", "sha256"):
        if record.get(key) != marker.get(key):
            raise DataError(
                f"{directory / INDEX_FILE}: shard {i} {key}={record.get(key)!r}, its marker {marker_path.name} "
                f"records {marker.get(key)!r}"
            )
    expected = tokens * np.dtype(index["dtype"]).itemsize
    size = tokens_path.stat().st_size if tokens_path.exists() else None
    if size != expected or record.get("bytes") != expected:
        found = "missing" if size is None else f"{size} bytes"
        raise DataError(f"{tokens_path}: {found}, its marker records {tokens} tokens ({expected} bytes)")
    try:
        ends = np.load(docs_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{docs_path}: unreadable ({exc})") from None
    if ends.ndim != 1 or len(ends) != documents or (documents and int(ends[-1]) != tokens):
        raise DataError(f"{docs_path}: does not end {documents} documents at token {tokens}")
    return marker


def check_split(directory: Path, meta: dict[str, Any] | None = None, split: str | None = None) -> dict[str, Any]:
    """The cheap checks of a built split (no token is read): every shard the index lists is complete and of its
    recorded size, their counts add up to the index's (and to the build's ``meta`` for ``split``), and no shard
    lies beyond the index's count. Returns the index; raises :class:`DataError` with one line."""
    index = read_index(directory)
    markers = [check_shard(directory, i, index) for i in range(index["shards"])]
    extra = shard_paths(directory, index["shards"])[0]
    if extra.exists():
        raise DataError(f"{directory / INDEX_FILE}: lists {index['shards']} shards, but {extra.name} exists too")
    for key in ("tokens", "documents"):
        total = sum(m[key] for m in markers)
        if total != index[key]:
            raise DataError(f"{directory / INDEX_FILE}: {key}={index[key]}, its shards hold {total}")
        if meta is not None and split is not None and meta.get(f"{split}_{key}") != index[key]:
            raise DataError(
                f"{directory / INDEX_FILE}: {key}={index[key]}, the build's {META_FILE} records "
                f"{split}_{key}={meta.get(f'{split}_{key}')!r}"
            )
    return index


def check_ids(shard: np.ndarray, vocab_size: int, path: Path) -> None:
    """Every id of a shard below the vocabulary size (one pass over the shard)."""
    if len(shard) and int(shard.max()) >= vocab_size:
        bad = int(np.argmax(shard >= vocab_size))
        raise DataError(
            f"{path}: token {bad} is id {int(shard[bad])}, outside the vocabulary [0, {vocab_size}); "
            "the cache is damaged: run moetrain-prepare-data to rebuild it"
        )


def damaged_from(directory: Path, vocab_size: int, meta: dict[str, Any] | None, split: str) -> tuple[int, str] | None:
    """``(first damaged shard, why)`` of a built split, checking everything (hashes and ids too), or ``None``.
    A broken index or meta (the shards intact) gives the shard count: only the index is rebuilt."""
    try:
        index = read_index(directory)
    except DataError as exc:
        return _first_bad_marker(directory, vocab_size), str(exc)
    for i in range(index["shards"]):
        try:
            marker = check_shard(directory, i, index)
            tokens_path = shard_paths(directory, i)[0]
            if file_sha256(tokens_path) != marker.get("sha256"):
                raise DataError(f"{tokens_path}: its SHA-256 differs from the one its marker records")
            check_ids(np.memmap(tokens_path, dtype=np.dtype(index["dtype"]), mode="r"), vocab_size, tokens_path)
        except DataError as exc:
            return i, str(exc)
    try:
        check_split(directory, meta, split)
    except DataError as exc:
        return _first_bad_marker(directory, vocab_size), str(exc)
    return None


def _first_bad_marker(directory: Path, vocab_size: int) -> int:
    """The first shard whose files disagree with its own marker (the index not trusted)."""
    i = 0
    while True:
        tokens_path, _, marker_path = shard_paths(directory, i)
        if not marker_path.exists():
            return i
        try:
            marker = _read_json(marker_path)
            record = {k: marker.get(k) for k in ("tokens", "bytes", "sha256")}
            check_shard(directory, i, {"files": {i: record}, "dtype": marker.get("dtype")})
            if file_sha256(tokens_path) != marker.get("sha256"):
                return i
            check_ids(np.memmap(tokens_path, dtype=np.dtype(marker["dtype"]), mode="r"), vocab_size, tokens_path)
        except (DataError, TypeError, KeyError):
            return i
        i += 1
