"""Token caches check themselves (issue 27, item 2): a truncated shard, an index that lists fewer shards, an
index or meta that disagrees with the shards, ids beyond the vocabulary are each one line, never less data or an
IndexError; ``moetrain-prepare-data`` verifies an existing cache and rebuilds what is damaged, saying so.

Every test here failed on main before this change: it opened the shards the index listed, whatever their size
(a truncated shard or a shortened index trained on less data, exit 0), passed out-of-vocabulary ids to the
embedding (an IndexError), and ``prepare-data`` returned at once when ``index.json`` existed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moetrain.config import DataConfig
from moetrain.data import ByteTokenizer, DataError, prepare_data
from moetrain.data.packing import token_directory
from moetrain.data.prepare import prepare
from tests.data.test_pipeline import write_corpus


def data_config(tmp_path: Path) -> DataConfig:
    """A few small files cut into shards of 500 tokens (several shards per split)."""
    paths = write_corpus(tmp_path / "corpus")
    return DataConfig(
        source="files", paths=paths, seq_len=32, val_fraction=0.25, cache_dir=str(tmp_path / "cache"), shard_tokens=500
    )


def built(tmp_path: Path) -> tuple[DataConfig, Path, dict[Path, bytes]]:
    """A prepared cache: its config, its train split's directory and every file's bytes."""
    cfg = data_config(tmp_path)
    prepare(cfg, progress=False)
    directory = token_directory(cfg, ByteTokenizer())
    files = {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}
    assert len(list((directory / "train").glob("shard_*.bin"))) >= 3
    return cfg, directory / "train", files


def one_line_error(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as err:
        data = prepare_data(cfg, ByteTokenizer())
        np.asarray(data.train[np.arange(len(data.train))])  # read every row (the ids are checked as read)
    message = str(err.value)
    assert "\n" not in message
    return message


def truncate(path: Path, drop: int = 2) -> None:
    path.write_bytes(path.read_bytes()[:-drop])


@pytest.mark.unit
def test_a_truncated_shard_is_one_line_naming_it(tmp_path):
    """Catches a shard opened at whatever size it has (main: fewer tokens, trained on without a word)."""
    cfg, train, _ = built(tmp_path)
    truncate(train / "shard_00001.bin")
    message = one_line_error(cfg)
    assert "shard_00001.bin" in message and "its marker records" in message and "moetrain-prepare-data" in message


@pytest.mark.unit
def test_an_index_listing_fewer_shards_is_refused(tmp_path):
    """Catches an index trusted for the shard count (main: ``"shards": n - 1`` dropped the last shard's data);
    edited consistently (counts and records cut too), the shard beyond it and the build's meta still disagree."""
    cfg, train, _ = built(tmp_path)
    index_path = train / "index.json"
    original = json.loads(index_path.read_text())
    index = {**original, "shards": original["shards"] - 1}
    index_path.write_text(json.dumps(index))
    assert "index.json" in one_line_error(cfg)
    last = original["files"][-1]
    index["files"] = original["files"][:-1]
    index["tokens"] = original["tokens"] - last["tokens"]
    index["documents"] = (
        original["documents"] - json.loads((train / f"shard_{index['shards']:05d}.json").read_text())["documents"]
    )
    index_path.write_text(json.dumps(index))
    message = one_line_error(cfg)
    assert f"lists {index['shards']} shards, but shard_{index['shards']:05d}.bin exists too" in message
    (train / f"shard_{index['shards']:05d}.bin").unlink()  # and without it: the build's meta.json disagrees
    assert "the build's meta.json records train_tokens" in one_line_error(cfg)


@pytest.mark.unit
def test_ids_beyond_the_vocabulary_are_one_line_checked_once_per_shard(tmp_path, monkeypatch):
    """Catches out-of-vocabulary ids reaching the embedding (main: an IndexError traceback), and a check per batch
    instead of per shard (each shard's ids are scanned once, however many rows are read)."""
    from moetrain.data import integrity, shards

    cfg, train, _ = built(tmp_path)
    calls: list[str] = []
    original = integrity.check_ids
    monkeypatch.setattr(shards, "check_ids", lambda s, v, p: (calls.append(p.name), original(s, v, p))[1])
    data = prepare_data(cfg, ByteTokenizer())
    for _ in range(3):
        np.asarray(data.train[np.arange(len(data.train))])
    assert sorted(calls) == sorted(set(calls)) and len(calls) == len(list(train.glob("shard_*.bin")))
    tokens = np.fromfile(train / "shard_00002.bin", dtype=np.uint16)
    tokens[10] = 60000  # the same size: only the ids give it away
    tokens.tofile(train / "shard_00002.bin")
    message = one_line_error(cfg)
    assert "shard_00002.bin: token 10 is id 60000, outside the vocabulary [0, 259)" in message


@pytest.mark.unit
@pytest.mark.parametrize("damage", ["truncated", "flipped", "index", "marker", "meta"])
def test_prepare_data_verifies_an_existing_cache_and_rebuilds_what_is_damaged(tmp_path, capsys, damage):
    """Rerunning ``prepare`` over a damaged cache says what is damaged and leaves the cache byte for byte as a
    fresh build. Catches a prepare that returns on the first ``index.json`` it finds (main: full counts, 0.0 s,
    nothing changed) and one that checks sizes only (a flipped byte keeps the size)."""
    cfg, train, files = built(tmp_path)
    capsys.readouterr()
    if damage == "truncated":
        truncate(train / "shard_00001.bin")
    elif damage == "flipped":
        data = bytearray((train / "shard_00001.bin").read_bytes())
        data[5] ^= 0x01
        (train / "shard_00001.bin").write_bytes(bytes(data))
    elif damage == "index":
        index = json.loads((train / "index.json").read_text())
        (train / "index.json").write_text(json.dumps({**index, "shards": index["shards"] - 1}))
    elif damage == "marker":
        (train / "shard_00002.json").write_text("{")
    else:
        meta_path = train.parent / "meta.json"
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "train_tokens": 5}))
    (summary,) = prepare(cfg, progress=False)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "damaged" in line]
    assert len(lines) == 1 and lines[0].startswith(f"moetrain-prepare-data: {train}: damaged ("), out
    after = {p: p.read_bytes() for p in sorted(train.parent.rglob("*")) if p.is_file() and p.name != ".lock"}
    assert after == files
    assert summary["train_tokens"] == json.loads((train / "index.json").read_text())["tokens"]
    prepare(cfg, progress=False)  # intact now: nothing said, nothing rebuilt
    assert "damaged" not in capsys.readouterr().out
