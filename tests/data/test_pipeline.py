"""Tests of the data pipeline: tokenizers, corpora, split, packing, cache, loaders."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moetrain.config import DataConfig
from moetrain.data import (
    ByteTokenizer,
    DataError,
    GlobalBatchLoader,
    build_tokenizer,
    load_documents,
    pack_sequences,
    prepare_data,
    rank_slice,
    split_by_hash,
    split_micro_batches,
    stdlib_files,
    tokenize_documents,
    val_batches,
)

# ----------------------------------------------------------------------------- helpers


def write_corpus(root: Path, n: int = 30) -> list[str]:
    """``n`` small text files of different lengths; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"doc{i:03d}.txt"
        path.write_text(f"document {i}: " + "hello wörld " * (5 + i % 7) + "\n", encoding="utf-8")
        paths.append(str(path))
    return paths


def files_cfg(tmp_path: Path, paths: list[str], **kwargs) -> DataConfig:
    kwargs.setdefault("seq_len", 16)
    kwargs.setdefault("val_fraction", 0.2)
    return DataConfig(source="files", paths=paths, cache_dir=str(tmp_path / "cache"), **kwargs)


class CountingTokenizer(ByteTokenizer):
    """A byte tokenizer that counts encode calls and can be told to fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def encode(self, text: str) -> np.ndarray:
        if self.fail:
            raise AssertionError("encode called although the cache should have been hit")
        self.calls += 1
        return super().encode(text)


# ----------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_roundtrip() -> None:
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 259 and tok.name == "byte"
    text = "héllo, wörld — ∑ 🚀\n\tend"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == text
    with_specials = np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])
    assert tok.decode(with_specials) == text
    assert tok.decode(tok.encode("")) == ""
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"  # invalid UTF-8 is replaced, not raised


# ----------------------------------------------------------------------------- corpus


def test_stdlib_files_excludes_tests_and_site_packages() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    assert len(files) > 100
    rels = [p.relative_to(root) for p in files]
    assert [r.as_posix() for r in rels] == sorted(r.as_posix() for r in rels)
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert all(p.suffix == ".py" for p in files)
    assert not any(skip & set(r.parts) for r in rels)
    assert Path("json/decoder.py") in rels
    if (root / "test").is_dir():  # the folder exists but none of its files is listed
        assert any((root / "test").rglob("*.py"))


def test_split_disjoint_deterministic_and_order_free(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "docs", 40)
    train, val = load_documents(files_cfg(tmp_path, paths, seed=1))
    train_keys, val_keys = set(train["source"]), set(val["source"])
    assert train_keys.isdisjoint(val_keys)
    assert train_keys | val_keys == {Path(p).name for p in paths}  # relative to the corpus folder
    assert len(val_keys) >= 1 and len(train_keys) >= 1
    assert train.column_names == ["text", "source"]

    again = load_documents(files_cfg(tmp_path, list(reversed(paths)), seed=1))
    assert set(again[1]["source"]) == val_keys  # same seed, any file order: same split

    other = load_documents(files_cfg(tmp_path, paths, seed=2))
    assert set(other[1]["source"]) != val_keys  # different seed: different split

    # the text of each document is kept whole
    doc = dict(zip(train["source"], train["text"]))
    some = next(iter(doc))
    assert doc[some] == (tmp_path / "docs" / some).read_text(encoding="utf-8")

    moved = tmp_path / "elsewhere" / "corpus"  # moving the corpus keeps its split
    moved.parent.mkdir()
    (tmp_path / "docs").rename(moved)
    after = load_documents(files_cfg(tmp_path, [str(moved / Path(p).name) for p in paths], seed=1))
    assert set(after[1]["source"]) == val_keys


def test_split_keeps_one_document_on_each_side() -> None:
    keys = [f"k{i}" for i in range(5)]
    assert split_by_hash(keys, 1e-12, seed=0).sum() == 1
    assert split_by_hash(keys, 1 - 1e-12, seed=0).sum() == 4
    with pytest.raises(DataError):
        split_by_hash(["only"], 0.5, seed=0)


def test_jsonl_parquet_and_text_loading(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"json row {i}", "id": i}) for i in range(5)) + "\n")
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": [f"parquet row {i}" for i in range(4)], "n": list(range(4))}), parquet)
    (tmp_path / "c.md").write_text("# markdown doc\nline two\n")
    (tmp_path / "d.txt").write_text("   \n")  # whitespace only: dropped
    cfg = files_cfg(
        tmp_path,
        [str(jsonl), str(parquet), str(tmp_path / "*.md"), str(tmp_path / "d.txt")],
        text_field="body",
    )
    train, val = load_documents(cfg)
    docs = dict(zip(list(train["source"]) + list(val["source"]), list(train["text"]) + list(val["text"])))
    assert len(docs) == 10
    assert docs["a.jsonl:3"] == "json row 3"  # keys relative to the folder holding every file
    assert docs["b.parquet:0"] == "parquet row 0"
    assert docs["c.md"] == "# markdown doc\nline two\n"
    assert train.column_names == ["text", "source"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: [str(d / "missing.txt")], "no such file: .*missing.txt"),
        (lambda d: [str(d / "nothing*.txt")], "glob .*nothing\\*.txt.* matched no files"),
        (lambda d: [str(d / "x.csv")], "unsupported file type '.csv' of .*x.csv"),
        (lambda d: [str(d / "rows.jsonl")], "data.text_field='content': no such column in .*rows.jsonl"),
        (lambda d: [str(d / "empty.txt")], "corpus is empty"),
    ],
)
def test_data_errors_are_one_line(tmp_path: Path, make, match: str) -> None:
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "rows.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "empty.txt").write_text("")
    cfg = files_cfg(tmp_path, make(tmp_path), text_field="content")
    with pytest.raises(DataError, match=match) as info:
        prepare_data(cfg, ByteTokenizer())
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- packing and cache


def test_pack_sequences_shapes_and_shifted_targets() -> None:
    stream = np.arange(53, dtype=np.uint16)
    seqs = pack_sequences(stream, seq_len=9)
    assert seqs.shape == (5, 10)  # 53 // 10 windows, ragged tail of 3 dropped
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    np.testing.assert_array_equal(targets, inputs + 1)
    np.testing.assert_array_equal(seqs.reshape(-1), stream[:50])

    tok = ByteTokenizer()
    ids = tokenize_documents(["ab", "c"], tok)
    np.testing.assert_array_equal(ids, [97, 98, tok.eos_id, 99, tok.eos_id])
    assert ids.dtype == np.uint16


def test_prepare_data_and_cache_hit(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "docs", 30)
    tok = CountingTokenizer()
    cfg = files_cfg(tmp_path, paths)
    data = prepare_data(cfg, tok)
    assert tok.calls == 30
    assert data.vocab_size == 259
    assert data.train.ndim == 2 and data.train.shape[1] == cfg.seq_len + 1 and len(data.val) >= 1
    # the train windows are the train documents, each followed by eos, in order
    train_docs, _ = load_documents(cfg)
    stream = tokenize_documents(train_docs["text"], ByteTokenizer())
    np.testing.assert_array_equal(data.train.reshape(-1), stream[: data.train.size])
    assert (data.train == tok.eos_id).sum() >= 1

    tok.fail = True  # second call, and another seq_len: served from the cache
    again = prepare_data(cfg, tok)
    np.testing.assert_array_equal(again.train, data.train)
    longer = prepare_data(files_cfg(tmp_path, paths, seq_len=32, max_val_sequences=1), tok)
    assert longer.train.shape[1] == 33 and len(longer.val) == 1

    time_ns = os.stat(paths[0]).st_mtime_ns + 10**9  # a changed file invalidates the cache
    Path(paths[0]).write_text("changed\n")
    os.utime(paths[0], ns=(time_ns, time_ns))
    tok.fail = False
    prepare_data(cfg, tok)
    assert tok.calls == 60


def test_prepare_data_stdlib(tmp_path: Path) -> None:
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), seq_len=64, max_val_sequences=8)
    data = prepare_data(cfg, ByteTokenizer())
    assert data.train.shape[1] == 65 and data.train.shape[0] > 10_000
    assert data.val.shape == (8, 65)
    assert data.train.dtype == np.uint16 and data.train.max() <= 256


def test_too_short_corpus_is_an_error(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "docs", 3)
    with pytest.raises(DataError, match="fewer than one sequence"):
        prepare_data(files_cfg(tmp_path, paths, seq_len=4096), ByteTokenizer())


# ----------------------------------------------------------------------------- loaders


def make_seqs(n: int, width: int = 5) -> np.ndarray:
    """Row i is filled with i, so a batch's rows name the sequences it holds."""
    return np.repeat(np.arange(n, dtype=np.uint16)[:, None], width, axis=1)


def test_global_batch_loader_deterministic_and_wraps_epochs() -> None:
    seqs = make_seqs(10)
    a, b = GlobalBatchLoader(seqs, 4, seed=3), GlobalBatchLoader(seqs, 4, seed=3)
    batches = [a.next_batch() for _ in range(5)]
    for batch in batches:
        assert batch.dtype == torch.long and batch.shape == (4, 5)
        torch.testing.assert_close(batch, b.next_batch())
    ids = torch.cat(batches)[:, 0].tolist()
    assert sorted(ids[:10]) == list(range(10))  # epoch 0 visits every sequence once
    assert sorted(ids[10:20]) == list(range(10))  # the batch crossing the boundary continues epoch 1
    assert ids[:10] != ids[10:20]  # epochs are reshuffled
    expected = np.random.default_rng([3, 0]).permutation(10).tolist()
    assert ids[:10] == expected
    assert a.state_dict() == {"epoch": 2, "position": 0}
    other = GlobalBatchLoader(seqs, 4, seed=4).next_batch()
    assert not torch.equal(other, batches[0])


def test_global_batch_loader_state_dict_restore() -> None:
    seqs = make_seqs(13)
    loader = GlobalBatchLoader(seqs, 5, seed=7)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(6)]
    restored = GlobalBatchLoader(seqs, 5, seed=7)
    restored.load_state_dict(dict(state))
    for batch in expected:
        torch.testing.assert_close(restored.next_batch(), batch)


def test_batch_larger_than_dataset_spans_epochs() -> None:
    batch = GlobalBatchLoader(make_seqs(3), 7, seed=0).next_batch()
    ids = batch[:, 0].tolist()
    assert sorted(ids[:3]) == sorted(ids[3:6]) == [0, 1, 2]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_reassemble_the_global_batch(world_size: int) -> None:
    batch = GlobalBatchLoader(make_seqs(50), 8, seed=0).next_batch()
    parts = [rank_slice(batch, r, world_size) for r in range(world_size)]
    assert all(p.shape[0] == 8 // world_size for p in parts)
    torch.testing.assert_close(torch.cat(parts), batch)
    micro = [m for p in parts for m in split_micro_batches(p, 1)]
    torch.testing.assert_close(torch.cat(micro), batch)


def test_slicing_errors() -> None:
    batch = torch.zeros(6, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="not divisible by world size 4"):
        rank_slice(batch, 0, 4)
    with pytest.raises(ValueError, match="micro_batch_size=4"):
        split_micro_batches(batch, 4)
    assert [m.shape[0] for m in split_micro_batches(batch, 2)] == [2, 2, 2]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n, batch_size", [(10, 4), (3, 8), (16, 4)])
def test_val_batches_cover_each_sequence_once(world_size: int, n: int, batch_size: int) -> None:
    seqs = make_seqs(n)
    per_rank = [list(val_batches(seqs, batch_size, r, world_size)) for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1  # ranks stay in step
    seen = [int(row[0]) for batches in per_rank for batch in batches for row in batch]
    assert sorted(seen) == list(range(n))
    # in batch order, the ranks' shares concatenate to the fixed val order
    in_order = [int(row[0]) for step in zip(*per_rank) for batch in step for row in batch]
    assert in_order == list(range(n))


def test_dataset_folder_source_uses_its_validation_split(tmp_path: Path) -> None:
    """``source`` = a local dataset folder goes through ``load_dataset(source)`` (no network)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [json.dumps({"text": f"train row {i} " * 20}) for i in range(6)]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "validation.jsonl").write_text(json.dumps({"text": "held out " * 20}) + "\n")
    cfg = DataConfig(source=str(folder), cache_dir=str(tmp_path / "cache"), seq_len=16)
    train, val = load_documents(cfg)
    assert list(train["source"]) == [f"train:{i}" for i in range(6)]
    assert list(val["source"]) == ["validation:0"]
    data = prepare_data(cfg, ByteTokenizer())
    assert ByteTokenizer().decode(data.val[0]).startswith("held out")
