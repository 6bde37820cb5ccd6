"""Sharded token files: parallel, bounded-memory, resumable tokenisation of one split.

A split's token stream (each document's ids followed by the EOS id, documents in
order) is stored as consecutive shards in one directory::

    shard_00000.bin        raw tokens (uint16 when the vocabulary fits, else uint32), memory-mapped when read
    shard_00000.docs.npy   int64 end offset of every document inside the shard (the document index)
    shard_00000.json       {"first_doc", "documents", "tokens", "dtype", "bytes", "sha256"}: written last, it
                           marks the shard complete
    index.json             written when the whole split is done: {"shards", "documents", "tokens", "dtype",
                           "files": [{"tokens", "bytes", "sha256"} of each shard]}

A shard holds whole documents and is closed as soon as it reaches ``shard_tokens``
tokens, so its boundaries depend only on the documents and ``shard_tokens``, not
on the number of workers. Tokens are appended to the open shard's temporary file
batch by batch; every file is renamed into place once complete.
An interrupted build resumes after its last complete shard: the files of later
(incomplete) shards are deleted and tokenisation restarts at the first document
that no complete shard holds, so no document is missing or duplicated. A lock
file serialises builders of the same directory (ranks, concurrent jobs).

Memory: the batches in flight (``2 * num_proc`` batches of :data:`BATCH_DOCS`
documents) and the open shard's document index (8 bytes a document), whatever the
corpus size; the open shard's tokens go straight to its file.

Reading checks these records (:mod:`moetrain.data.integrity`): sizes and counts when a split is opened, ids
against the vocabulary once per shard, everything (hashes too) in ``moetrain-prepare-data``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from moetrain.data.integrity import check_ids, check_split
from moetrain.data.integrity import shard_paths as shard_files

BATCH_DOCS = 256
"""Documents per tokenisation task."""
AUTO_PARALLEL_BYTES = 64 * 2**20
"""``data.num_proc=0`` tokenises in worker processes only for splits with more text than this."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through ``write(file)`` to a temporary file in the same directory, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def complete_shards(directory: Path) -> list[dict[str, int]]:
    """Metadata of shards 0, 1, ... up to the first one that is not complete."""
    out: list[dict[str, int]] = []
    while True:
        tokens, docs, marker = shard_files(directory, len(out))
        if not (marker.exists() and tokens.exists() and docs.exists()):
            return out
        out.append(json.loads(marker.read_text()))


def encode_batch(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, ends)``: each document's ids then EOS, concatenated; ``ends`` = cumulative end offsets."""
    dtype = token_dtype(tokenizer.vocab_size)
    batch = getattr(tokenizer, "encode_batch", None)
    pieces = batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
    lengths = np.fromiter((len(p) + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    start = 0
    for ids, end in zip(pieces, ends):
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            raise ValueError(f"tokenizer {tokenizer.name} produced ids outside [0, {tokenizer.vocab_size})")
        out[start : end - 1] = ids
        out[end - 1] = tokenizer.eos_id
        start = int(end)
    return out, ends


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_batch(_WORKER_TOKENIZER, texts)


def _encoded(texts: Iterator[list[str]], tokenizer: Any, num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in input order; at most ``2 * num_proc`` batches in flight (bounded memory)."""
    if num_proc <= 1:
        for batch in texts:
            yield encode_batch(tokenizer, batch)
        return
    # fork, like torch's DataLoader workers and datasets' map: spawn and forkserver would re-run an
    # unguarded __main__ (``python -m moetrain.train``) in every worker
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque[Future] = deque()
        for batch in texts:
            pending.append(pool.submit(_worker_encode, batch))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class ShardWriter:
    """Appends encoded batches and closes a shard of whole documents once it holds ``shard_tokens`` tokens."""

    def __init__(self, directory: Path, shard_tokens: int, index: int, first_doc: int, dtype: np.dtype) -> None:
        self.directory, self.shard_tokens, self.dtype = directory, shard_tokens, dtype
        self.index, self.first_doc = index, first_doc
        self.file: IO[bytes] | None = None
        self.ends: list[np.ndarray] = []
        self.tokens = 0
        self.digest = hashlib.sha256()

    def _tmp(self) -> Path:
        path = shard_files(self.directory, self.index)[0]
        return path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def add(self, tokens: np.ndarray, ends: np.ndarray) -> None:
        """Append whole documents (``ends`` cumulative within ``tokens``), flushing full shards."""
        start = 0
        while start < len(tokens):
            need = self.shard_tokens - self.tokens
            # the first document whose end reaches the shard size closes the shard
            k = int(np.searchsorted(ends, start + need, side="left"))
            stop_doc = min(k, len(ends) - 1)
            stop = int(ends[stop_doc])
            first = int(np.searchsorted(ends, start, side="right"))
            if self.file is None:
                self.file = open(self._tmp(), "wb")  # noqa: SIM115 - open across add() calls until flush/abort
            data = np.ascontiguousarray(tokens[start:stop], dtype=self.dtype).data
            self.file.write(data)
            self.digest.update(data)
            self.ends.append(ends[first : stop_doc + 1] - start + self.tokens)
            self.tokens += stop - start
            start = stop
            if self.tokens >= self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        """Publish the open shard (tokens, index, then the completion marker) and start the next one."""
        if self.file is None:
            return
        self.file.close()
        self.file = None
        tokens_path, docs_path, marker = shard_files(self.directory, self.index)
        os.replace(self._tmp(), tokens_path)
        ends = np.concatenate(self.ends).astype(np.int64, copy=False)
        atomic_write(docs_path, lambda f: np.save(f, ends))
        info = {"first_doc": self.first_doc, "documents": len(ends), "tokens": int(self.tokens)}
        size = {"bytes": int(self.tokens) * self.dtype.itemsize, "sha256": self.digest.hexdigest()}
        _write_json(marker, {**info, "dtype": self.dtype.name, **size})
        self.index, self.first_doc = self.index + 1, self.first_doc + len(ends)
        self.ends, self.tokens, self.digest = [], 0, hashlib.sha256()

    def abort(self) -> None:
        """Drop the open shard (an interrupted build; the next build restarts it)."""
        if self.file is not None:
            self.file.close()
            self.file = None
            self._tmp().unlink(missing_ok=True)


@contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock on ``directory/.lock`` while a split is built (other builders wait)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clean_incomplete(directory: Path, done: int) -> None:
    """Delete temporary files and the files of shards >= ``done`` (an interrupted build's tail)."""
    for path in directory.iterdir():
        if path.name.endswith(".tmp") or (path.name.startswith("shard_") and int(path.name[6:11]) >= done):
            path.unlink()


def auto_num_proc(num_proc: int, text_bytes: int) -> int:
    """``data.num_proc``, or for 0 one worker per core when the split has more than 64 MB of text."""
    if num_proc > 0:
        return num_proc
    return (os.cpu_count() or 1) if text_bytes > AUTO_PARALLEL_BYTES else 1


def write_split(
    directory: Path,
    docs: Any,
    tokenizer: Any,
    shard_tokens: int,
    num_proc: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Tokenise the ``text`` column of ``docs`` (a ``datasets.Dataset`` or ``IterableDataset``) into shards.

    Resumes a partial build; returns (and writes) ``index.json``. ``on_batch(documents_done)``
    is called after each batch (progress; tests interrupt the build from it).
    """
    with build_lock(directory):
        index_path = directory / "index.json"
        if index_path.exists():
            return json.loads(index_path.read_text())
        shards = complete_shards(directory)
        _clean_incomplete(directory, len(shards))
        first_doc = shards[-1]["first_doc"] + shards[-1]["documents"] if shards else 0
        dtype = token_dtype(tokenizer.vocab_size)
        writer = ShardWriter(directory, shard_tokens, len(shards), first_doc, dtype)
        sized = hasattr(docs, "__len__")  # a Dataset; an IterableDataset (data.streaming) is skipped into
        every_doc_done = sized and first_doc >= len(docs)  # only the index was lost: nothing to tokenise
        if first_doc and not every_doc_done:
            rest = docs.select(range(first_doc, len(docs))) if sized else docs.skip(first_doc)
        else:
            rest = docs
        texts = iter(()) if every_doc_done else (batch["text"] for batch in rest.iter(batch_size=BATCH_DOCS))
        done = first_doc
        try:
            for tokens, ends in _encoded(texts, tokenizer, num_proc):
                writer.add(tokens, ends)
                done += len(ends)
                if on_batch is not None:
                    on_batch(done)
        except BaseException:
            writer.abort()
            raise
        writer.flush()
        shards = complete_shards(directory)
        index = {
            "shards": len(shards),
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "dtype": dtype.name,
            "files": [{k: s.get(k) for k in ("tokens", "bytes", "sha256")} for s in shards],
        }
        if sized and index["documents"] != len(docs):
            raise RuntimeError(f"{directory}: {index['documents']} documents in the shards, {len(docs)} expected")
        _write_json(index_path, index)
        return index


class TokenStream:
    """The read side: a split's shards as one logical token stream (memory-mapped, read-only).

    Opening checks the index against the shards' markers and files (and against the build's ``meta`` for
    ``split`` when given); with ``vocab_size``, each shard's ids are checked the first time it is read
    (:mod:`moetrain.data.integrity`). Damage is one :class:`~moetrain.data.errors.DataError` line."""

    def __init__(
        self, directory: Path, vocab_size: int | None = None, meta: dict[str, Any] | None = None, split: str = ""
    ) -> None:
        self.directory = directory
        self.index = check_split(directory, meta, split or None)
        dtype = np.dtype(self.index["dtype"])
        paths = [shard_files(directory, i)[0] for i in range(self.index["shards"])]
        self.shards = [np.memmap(path, dtype=dtype, mode="r") for path in paths]
        sizes = [len(s) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.checked = [vocab_size is None] * len(self.shards)

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i``, its ids checked against the vocabulary the first time."""
        if not self.checked[i]:
            check_ids(self.shards[i], int(self.vocab_size or 0), shard_files(self.directory, i)[0])
            self.checked[i] = True
        return self.shards[i]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream (a view when inside one shard, else a copy)."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        lo = start - int(self.offsets[i])
        if stop <= self.offsets[i + 1]:
            return self.shard(i)[lo : lo + stop - start]
        parts, j = [self.shard(i)[lo:]], i + 1
        while stop > self.offsets[j + 1]:
            parts.append(self.shard(j))
            j += 1
        parts.append(self.shard(j)[: stop - int(self.offsets[j])])
        return np.concatenate(parts)

    def document_ends(self) -> np.ndarray:
        """End offset (exclusive, EOS included) of every document in the stream (int64)."""
        ends = [np.load(shard_files(self.directory, i)[1]) + self.offsets[i] for i in range(len(self.shards))]
        return np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
