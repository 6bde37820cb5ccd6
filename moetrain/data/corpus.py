"""Corpora as ``datasets.Dataset`` objects, split into train and validation by document.

Three sources (``data.source``):

* ``stdlib``: the running Python's standard library source, one document per
  ``.py`` file (test folders excluded). Always available, no network.
* ``files``: local files or globs in ``data.paths``. ``.txt`` / ``.md`` / ``.py``
  files are one document each; ``.jsonl`` / ``.json`` / ``.parquet`` files give one
  document per row, read from the ``data.text_field`` column.
* anything else: a Hugging Face hub dataset ``load_dataset(source, hub_config)``
  (a local dataset folder works too). Its ``validation`` split is used when it
  has one, otherwise its ``train`` split is split like the local sources.

Every document has a stable key (``source`` column: the relative path, ``path:row``
or ``split:row``; for ``data.source=files`` paths are relative to the deepest folder
holding every file, so moving or copying the corpus keeps its split). A document goes to validation iff ``sha1(f"{seed}:{key}")``,
read as a number in [0, 1), is below ``val_fraction``: the split does not depend
on file order or on the other documents, except that at least one document is
always moved to each side. Empty (whitespace-only) documents are dropped.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from moetrain.config import DataConfig
from moetrain.data.errors import DataError, _first_line, _hash_unit
from moetrain.data.streaming import load_streaming

STDLIB_SKIP_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
TEXT_SUFFIXES = (".txt", ".md", ".py")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$MOETRAIN_CACHE``, else ``~/.cache/moetrain``."""
    root = cfg.cache_dir or os.environ.get("MOETRAIN_CACHE") or "~/.cache/moetrain"
    return Path(root).expanduser()


# ----------------------------------------------------------------------------- stdlib


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_candidates() -> list[Path]:
    """Every stdlib ``*.py`` outside test folders and site-packages, sorted by relative path."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_PARTS]  # prune, don't descend
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py"):
                found.append(((rel_dir / name).as_posix(), Path(dirpath) / name))
    return [path for _, path in sorted(found)]


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` sources (no tests, no site-packages), valid UTF-8 only."""
    files = []
    for path in _stdlib_candidates():
        try:
            path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(path)
    return files


# ----------------------------------------------------------------------------- local files


def resolve_paths(patterns: list[str]) -> list[Path]:
    """Expand ``data.paths`` (globs sorted, order of entries kept, duplicates dropped) and check them."""
    if not patterns:
        raise DataError("data.paths is empty: list at least one file when data.source=files")
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(str(pattern))
        if glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise DataError(f"data.paths: glob {pattern!r} matched no files")
        else:
            if not os.path.exists(expanded):
                raise DataError(f"data.paths: no such file: {pattern}")
            if not os.path.isfile(expanded):
                raise DataError(f"data.paths: {pattern} is not a file (use a glob such as {pattern}/*.txt)")
            matches = [expanded]
        for match in matches:
            path = Path(os.path.normpath(match))
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise DataError(
                    f"data.paths: unsupported file type {path.suffix or '(none)'!r} of {path} "
                    f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
                )
            if path not in seen:
                seen.add(path)
                out.append(path)
    return out


def relative_names(paths: list[Path]) -> list[str]:
    """Each path relative to the deepest folder holding all of them (POSIX form): the documents' keys."""
    root = os.path.commonpath([str(p.resolve().parent) for p in paths])
    return [Path(os.path.relpath(p.resolve(), root)).as_posix() for p in paths]


def corpus_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """What identifies the raw corpus, cheaply (stat only): part of the token cache key."""
    if cfg.source == "stdlib":
        files = _stdlib_candidates()
        return {
            "stdlib": str(stdlib_root()),
            "python": sys.version,
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
        }
    if cfg.source == "files":
        paths = resolve_paths(cfg.paths)
        names = relative_names(paths)
        return {"files": [[n, p.stat().st_size, p.stat().st_mtime_ns] for n, p in zip(names, paths)]}
    fingerprint: dict[str, Any] = {"hub": cfg.source, "hub_config": cfg.hub_config}
    if os.path.isdir(cfg.source):  # a local dataset folder: its files' stats, like source=files
        files = sorted(p for p in Path(cfg.source).rglob("*") if p.is_file() and ".cache" not in p.parts)
        fingerprint["files"] = [[p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return fingerprint


def _load_local(builder: str, files: list[Path], cache_dir: Path, what: str = "data.paths", **kwargs: Any):
    """``load_dataset(builder, data_files=files)["train"]``; failures become one :class:`DataError` line."""
    import datasets
    from datasets.utils.logging import is_progress_bar_enabled

    bars = is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per local file is noise
    try:
        return datasets.load_dataset(
            builder, data_files=[str(p) for p in files], split="train", cache_dir=str(cache_dir), **kwargs
        )
    except Exception as exc:
        if builder == "text":  # name the file that is not UTF-8, the usual cause
            for path in files:
                try:
                    path.read_bytes().decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{what}: {path} is not valid UTF-8 text") from exc
        where = str(files[0]) if len(files) == 1 else f"{len(files)} files from {files[0]}"
        raise DataError(f"{what}: cannot load {where} with the {builder} loader ({_first_line(exc)})") from exc
    finally:
        if bars:
            datasets.enable_progress_bars()


def _text_column(ds, text_field: str, where: str):
    """Keep only ``text_field`` (renamed ``text``), checking it exists and holds strings."""
    if text_field not in ds.column_names:
        columns = ", ".join(ds.column_names)
        raise DataError(f"data.text_field={text_field!r}: no such column in {where} (columns: {columns})")
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(f"data.text_field={text_field!r}: column in {where} holds {dtype or 'non-text'}, not text")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _with_source(ds, keys: list[str]):
    import datasets

    ds = ds.add_column("source", keys)
    features = datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string")})
    return ds if ds.features == features else ds.cast(features)


def _load_files(cfg: DataConfig):
    """All documents of ``data.paths`` in path order, columns ``text`` and ``source``."""
    import datasets

    paths = resolve_paths(cfg.paths)
    names = dict(zip(paths, relative_names(paths)))
    hf_cache = cache_root(cfg) / "hf_datasets"
    parts = []
    i = 0
    while i < len(paths):
        suffix = paths[i].suffix.lower()
        if suffix in TEXT_SUFFIXES:  # a run of text files: one loader call, one row per file
            run = []
            while i < len(paths) and paths[i].suffix.lower() in TEXT_SUFFIXES:
                run.append(paths[i])
                i += 1
            ds = _load_local("text", run, hf_cache, sample_by="document")
            parts.append(_with_source(ds, [names[p] for p in run]))
            continue
        path = paths[i]
        i += 1
        builder = "json" if suffix in JSON_SUFFIXES else "parquet"
        ds = _text_column(_load_local(builder, [path], hf_cache), cfg.text_field, str(path))
        parts.append(_with_source(ds, [f"{names[path]}:{row}" for row in range(len(ds))]))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _load_stdlib(cfg: DataConfig):
    files = stdlib_files()
    if not files:
        raise DataError(f"data.source=stdlib: no .py files found under {stdlib_root()}")
    root = stdlib_root()
    ds = _load_local("text", files, cache_root(cfg) / "hf_datasets", "data.source=stdlib", sample_by="document")
    return _with_source(ds, [p.relative_to(root).as_posix() for p in files])


def _load_hub(cfg: DataConfig):
    """``(train, val or None)`` of a hub dataset."""
    import datasets

    name = f"{cfg.source}" + (f" ({cfg.hub_config})" if cfg.hub_config else "")
    # a local dataset folder caches under our root; hub datasets share the usual HF cache
    local = os.path.isdir(cfg.source)
    try:
        dd = datasets.load_dataset(
            cfg.source, cfg.hub_config, cache_dir=str(cache_root(cfg) / "hf_datasets") if local else None
        )
    except Exception as exc:
        raise DataError(f"data.source={cfg.source!r}: cannot load hub dataset {name} ({_first_line(exc)})") from exc
    if "train" not in dd:
        raise DataError(f"data.source={cfg.source!r}: hub dataset {name} has no train split (has {list(dd)})")
    out = []
    for split in ("train", "validation"):
        if split not in dd:
            out.append(None)
            continue
        ds = _text_column(dd[split], cfg.text_field, f"{name} split {split}")
        out.append(_with_source(ds, [f"{split}:{row}" for row in range(len(ds))]))
    return out[0], out[1]


# ----------------------------------------------------------------------------- split


CHUNK_ROWS = 4096
"""Rows per chunk when a whole column is scanned (empty-document check, split keys)."""
MAX_MISSING_TEXT_FRACTION = 0.1
"""Rows without a text value (the ``data.text_field`` key absent or null) beyond this fraction stop the run."""


def _drop_empty(ds, what: str):
    """Drop empty / whitespace-only / null documents; fail if none is left.

    Rows without a text value are counted and reported (one line), and stop the run when they are more
    than :data:`MAX_MISSING_TEXT_FRACTION` of the rows: a wrong ``data.text_field`` or a broken export.
    """
    import pyarrow.compute as pc

    missing, masks = 0, []
    for batch in ds.with_format("arrow").iter(batch_size=CHUNK_ROWS):  # chunk by chunk: bounded memory
        text = batch["text"]
        missing += text.null_count
        keep = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(text, ""))), 0)
        masks.append(np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool))
    keep = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    if missing:
        share = missing / len(keep)
        line = f"{what}: {missing} of {len(keep)} rows have no text value (data.text_field)"
        if share > MAX_MISSING_TEXT_FRACTION:
            raise DataError(f"{line}: more than {MAX_MISSING_TEXT_FRACTION:.0%}, check the field name and the data")
        print(f"moetrain: warning: {line}; they are skipped", flush=True)
    if not keep.any():
        raise DataError(f"{what}: the corpus is empty (no non-empty documents)")
    return ds if keep.all() else ds.select(np.flatnonzero(keep))


def split_by_hash(keys: Iterable[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask, True = validation; at least one document on each side (needs >= 2 keys)."""
    h = np.fromiter((_hash_unit(seed, k) for k in keys), dtype=np.float64)
    if len(h) < 2:
        raise DataError(f"data: need at least 2 non-empty documents to split train/val, got {len(h)}")
    is_val = h < val_fraction
    if not is_val.any():
        is_val[np.argmin(h)] = True
    if is_val.all():
        is_val[np.argmax(h)] = False
    return is_val


def load_documents(cfg: DataConfig):
    """The corpus of ``cfg`` as ``(train, val)`` ``datasets.Dataset`` with columns ``text`` and ``source``
    (with ``data.streaming``: ``datasets.IterableDataset`` with column ``text``).

    Raises :class:`DataError` (one line naming the path or key) on bad input.
    """
    what = f"data.source={cfg.source!r}"
    if cfg.streaming:
        return load_streaming(cfg)
    if cfg.source == "stdlib":
        docs = _load_stdlib(cfg)
    elif cfg.source == "files":
        docs = _load_files(cfg)
    else:
        docs, val = _load_hub(cfg)
        if val is not None:
            return _drop_empty(docs, what + " train"), _drop_empty(val, what + " validation")
    docs = _drop_empty(docs, what)
    keys = (k for batch in docs.select_columns(["source"]).iter(batch_size=CHUNK_ROWS) for k in batch["source"])
    is_val = split_by_hash(keys, cfg.val_fraction, cfg.seed)
    return docs.select(np.flatnonzero(~is_val)), docs.select(np.flatnonzero(is_val))
