"""Data at scale: sharded token files, resumable tokenisation, mixtures, document masking (tiny corpora)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moetrain.config import ConfigError, DataConfig, ModelConfig, MoEConfig, SourceConfig, TrainConfig, validate
from moetrain.data import (
    ByteTokenizer,
    ConcatRows,
    GlobalBatchLoader,
    MixtureLoader,
    PackedSequences,
    TokenStream,
    build_loader,
    pack_sequences,
    prepare_data,
    rank_slice,
    tokenize_documents,
    write_split,
)
from moetrain.data import shards as shards_mod
from moetrain.data.packing import token_counts
from moetrain.data.sampling import mixture_choices
from moetrain.model.layers import document_ids
from moetrain.model.transformer import build_model
from tests.data.test_pipeline import write_corpus
from tests.helpers import spawned


def texts(n: int = 40) -> list[str]:
    """Documents of varied lengths (1 to ~60 bytes), some non-ASCII."""
    return [f"doc {i} " + "héllo " * (i % 9) + "x" * (i % 5) for i in range(n)]


def dataset(items: list[str]) -> Any:
    import datasets

    return datasets.Dataset.from_dict({"text": items})


def build(directory: Path, items: list[str], shard_tokens: int = 50, num_proc: int = 1, **kw) -> TokenStream:
    write_split(directory, dataset(items), ByteTokenizer(), shard_tokens, num_proc, **kw)
    return TokenStream(directory)


# ----------------------------------------------------------------------------- shards


@pytest.mark.unit
def test_shards_hold_whole_documents_and_the_index_marks_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a shard's document index losing its running token offset: with 3 documents per tokenisation
    batch, shards span several batches, so the second batch's ends must be shifted by the tokens already in
    the open shard."""
    monkeypatch.setattr(shards_mod, "BATCH_DOCS", 3)
    items = texts()
    tok = ByteTokenizer()
    stream = build(tmp_path / "s", items)
    spans = [
        (s["first_doc"] // 3, (s["first_doc"] + s["documents"] - 1) // 3)
        for s in shards_mod.complete_shards(stream.directory)
    ]
    assert any(a != b for a, b in spans)  # a shard holds documents of two tokenisation batches
    reference = tokenize_documents(items, tok)
    assert len(stream.shards) > 3
    np.testing.assert_array_equal(stream.read(0, len(stream)), reference)
    lengths = np.array([len(t.encode()) + 1 for t in items])
    np.testing.assert_array_equal(stream.document_ends(), np.cumsum(lengths))
    for i, shard in enumerate(stream.shards):
        ends = np.load(shards_mod.shard_files(stream.directory, i)[1])
        assert ends[-1] == len(shard) and (shard[ends - 1] == tok.eos_id).all()  # ends at a document's EOS
        if i < len(stream.shards) - 1:  # closed by the first document that reaches shard_tokens
            assert len(shard) >= 50 and (len(ends) == 1 or ends[-2] < 50)
    assert stream.index["documents"] == len(items) and stream.index["tokens"] == len(reference)


@pytest.mark.unit
def test_workers_write_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards_mod, "BATCH_DOCS", 3)
    one, two = build(tmp_path / "one", texts()), build(tmp_path / "two", texts(), num_proc=2)
    assert len(one.shards) == len(two.shards)
    for a, b in zip(one.shards, two.shards):
        np.testing.assert_array_equal(a, b)


@pytest.mark.unit
def test_interrupted_tokenisation_resumes_without_duplicated_or_missing_documents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards_mod, "BATCH_DOCS", 4)
    items = texts(60)

    def stop_after(n: int) -> Callable[[int], None]:
        def on_batch(done: int) -> None:
            if done >= n:
                raise KeyboardInterrupt

        return on_batch

    directory = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        build(directory, items, on_batch=stop_after(25))
    complete = shards_mod.complete_shards(directory)
    assert complete and not (directory / "index.json").exists()
    # a crash while writing the next shard: its tokens are there, its marker is not, and a temp file lingers
    tokens_path, _, _ = shards_mod.shard_files(directory, len(complete))
    tokens_path.write_bytes(b"\0" * 6)
    (directory / ".shard_00099.npy.1.tmp").write_bytes(b"partial")
    with pytest.raises(KeyboardInterrupt):  # a second interruption, later
        build(directory, items, on_batch=stop_after(45))
    stream = build(directory, items)
    np.testing.assert_array_equal(stream.read(0, len(stream)), tokenize_documents(items, ByteTokenizer()))
    firsts = [s["first_doc"] for s in shards_mod.complete_shards(directory)]
    counts = [s["documents"] for s in shards_mod.complete_shards(directory)]
    assert firsts == list(np.cumsum([0, *counts[:-1]])) and sum(counts) == len(items)
    assert not list(directory.glob("*.tmp"))


@pytest.mark.unit
def test_packed_sequences_straddle_shards_and_loader_resumes_mid_shard_bitwise(tmp_path: Path) -> None:
    items = texts(80)
    stream = build(tmp_path / "s", items, shard_tokens=37)
    flat = tokenize_documents(items, ByteTokenizer())
    packed, plain = PackedSequences(stream, seq_len=6), pack_sequences(flat, seq_len=6)
    assert packed.shape == plain.shape
    np.testing.assert_array_equal(packed[np.arange(len(plain))[::-1]], plain[::-1])
    np.testing.assert_array_equal(packed[3:9], plain[3:9])
    np.testing.assert_array_equal(np.asarray(packed), plain)
    both = ConcatRows([packed, plain[:5]])
    np.testing.assert_array_equal(token_counts(both, 300), np.bincount(np.asarray(both).reshape(-1), minlength=300))

    loader, reference = GlobalBatchLoader(packed, 5, seed=3), GlobalBatchLoader(plain, 5, seed=3)
    for _ in range(7):  # into the second epoch, mid-shard
        assert torch.equal(loader.next_batch(), reference.next_batch())
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(9)]
    resumed = GlobalBatchLoader(PackedSequences(TokenStream(tmp_path / "s"), seq_len=6), 5, seed=3)
    resumed.load_state_dict(state)
    for batch in expected:
        assert torch.equal(resumed.next_batch(), batch)


# ----------------------------------------------------------------------------- mixtures


def rows(n: int, tag: int) -> np.ndarray:
    """``n`` rows of width 4: [tag, i, i, i]."""
    out = np.repeat(np.arange(n)[:, None], 4, axis=1)
    out[:, 0] = tag
    return out


@pytest.mark.unit
@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (0.05, 0.95)])
def test_mixture_proportions_within_one_row_and_deterministic(weights: tuple[float, ...]) -> None:
    w = np.array(weights)
    counts = np.zeros(len(w), dtype=np.int64)
    choice = mixture_choices(w, counts, 1000)
    for t in range(1, 1001):
        realised = np.bincount(choice[:t], minlength=len(w))
        assert np.abs(realised - w * t).max() < 1.0 + 1e-9
    np.testing.assert_array_equal(choice, mixture_choices(w, np.zeros(len(w), dtype=np.int64), 1000))


@pytest.mark.unit
def test_mixture_loader_resumes_exactly_and_logs_proportions() -> None:
    sources = {"code": rows(23, 0), "prose": rows(11, 1)}
    weights = {"code": 0.7, "prose": 0.3}
    a, b = MixtureLoader(sources, weights, 10, seed=5), MixtureLoader(sources, weights, 10, seed=5)
    for _ in range(6):
        assert torch.equal(a.next_batch(), b.next_batch())
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(8)]
    c = MixtureLoader(sources, weights, 10, seed=5)
    c.load_state_dict(state)
    for batch in expected:
        got = c.next_batch()
        assert torch.equal(got, batch)
        for world in (1, 2, 5):  # the ranks' slices reassemble the same global batch
            assert torch.equal(torch.cat([rank_slice(got, r, world) for r in range(world)]), got)
    assert c.metrics() == pytest.approx({"data/source/code": 0.7, "data/source/prose": 0.3}, abs=1 / 140)
    tags = torch.cat(expected)[:, 0]
    assert abs((tags == 0).float().mean().item() - 0.7) <= 0.1 / len(tags) + 1e-6


@pytest.mark.unit
def test_mixture_metrics_are_the_cumulative_proportions_not_the_last_batchs() -> None:
    """Catches the realised proportions taken from the last batch only: batches of 4 rows cannot hold 0.7 / 0.3,
    so a batch's own share differs from the share of every row drawn so far, which is what is logged."""
    loader = MixtureLoader({"code": rows(23, 0), "prose": rows(11, 1)}, {"code": 0.7, "prose": 0.3}, 4, seed=5)
    tags: list[torch.Tensor] = []
    batch_shares = set()
    for _ in range(9):
        batch = loader.next_batch()
        tags.append(batch[:, 0])
        batch_shares.add((batch[:, 0] == 0).float().mean().item())
        drawn = torch.cat(tags)
        n_code = (drawn == 0).sum().item()
        want = {"data/source/code": n_code / len(drawn), "data/source/prose": (len(drawn) - n_code) / len(drawn)}
        assert loader.metrics() == want
        code = want["data/source/code"]
        assert abs(code - 0.7) < 1 / len(drawn) + 1e-9
    assert len(batch_shares) > 1  # batches differ: the last one's share is not the cumulative one


@pytest.mark.unit
def test_prepare_data_mixture_of_files(tmp_path: Path) -> None:
    code, prose = write_corpus(tmp_path / "code", 20), write_corpus(tmp_path / "prose", 12)
    cfg = DataConfig(
        seq_len=8,
        val_fraction=0.2,
        max_val_sequences=10,
        cache_dir=str(tmp_path / "cache"),
        sources=[
            SourceConfig(name="code", source="files", paths=code, weight=3.0),
            SourceConfig(name="prose", source="files", paths=prose, weight=1.0),
        ],
    )
    data = prepare_data(cfg, ByteTokenizer())
    assert data.weights == {"code": 0.75, "prose": 0.25}
    assert len(data.train) == sum(len(s) for s in data.sources.values())
    assert len(data.val) == 8 + 2  # round(10 * weight) per source
    loader = build_loader(data, 8, cfg.seed)
    assert isinstance(loader, MixtureLoader) and loader.next_batch().shape == (8, 9)


@pytest.mark.unit
def test_mixture_config_errors_name_the_key() -> None:
    cfg = TrainConfig()
    cfg.data.sources = [SourceConfig(name="a"), SourceConfig(name="a")]
    with pytest.raises(ConfigError, match=r"^data\.sources\[1\]\.name="):
        validate(cfg)
    cfg.data.sources = [SourceConfig(name="a", weight=0.0)]
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.weight=0\.0: must be"):
        validate(cfg)
    assert DataConfig(sources=[{"name": "x", "weight": 2.0}]).sources[0] == SourceConfig(name="x", weight=2.0)


# ----------------------------------------------------------------------------- document masking


@pytest.mark.unit
def test_document_ids_start_after_each_eos() -> None:
    tokens = torch.tensor([[5, 9, 1, 9, 9, 2]])
    assert document_ids(tokens, 9).tolist() == [[0, 0, 1, 1, 2, 3]]  # an EOS ends its own document


@pytest.mark.parity
@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_document_mask_logits_equal_each_document_alone(n_kv_heads: int) -> None:
    eos = 63
    model_cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, ffn_hidden_size=64, first_k_dense=1)
    moe_cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16)
    masked = build_model(model_cfg, moe_cfg, 64, 32, seed=0, doc_eos=eos).eval()
    plain = build_model(model_cfg, moe_cfg, 64, 32, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, eos, (n,), generator=g) for n in (5, 9, 1, 7)]
    docs = [torch.cat([d, torch.tensor([eos])]) for d in docs[:-1]] + [docs[-1]]  # the last one is cut
    packed = torch.cat(docs)[None]
    with torch.no_grad():
        together = masked(packed).logits[0]
        alone = torch.cat([plain(d[None]).logits[0] for d in docs])
        unmasked = plain(packed).logits[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # without the mask, documents see each other


# ----------------------------------------------------------------------------- trainer


def mixture_config(root: Path, **trainer_kw: Any) -> TrainConfig:
    """A tiny run on a 3:1 mixture of two small corpora, document masking on."""
    from tests.conftest import tiny_train_config
    from tests.conftest import write_corpus as write_code

    cfg = tiny_train_config(root, **trainer_kw)
    code, prose = write_code(root / "code"), write_corpus(root / "prose", 12)
    cfg.data.sources = [
        SourceConfig(name="code", source="files", paths=code, weight=0.75),
        SourceConfig(name="prose", source="files", paths=prose, weight=0.25),
    ]
    cfg.data.shard_tokens, cfg.data.doc_mask = 500, True
    cfg.trainer.eval_at_start, cfg.trainer.eval_every = False, 0
    cfg.checkpoint.enabled = False
    return cfg


@pytest.mark.parity
def test_trainer_masks_documents_when_doc_mask_is_on(tmp_path: Path) -> None:
    """Catches the trainer's model built without ``doc_eos`` (the meta-device build dropping it): the
    trainer's model must give the tokens after an EOS the logits of their document alone."""
    from moetrain.train.trainer import Trainer

    cfg = mixture_config(tmp_path)
    trainer = Trainer(cfg, tmp_path / "run")
    model, eos = trainer.model.eval(), trainer.tokenizer.eos_id
    assert model.doc_eos == eos
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, eos, (9,), generator=g), torch.randint(0, eos, (12,), generator=g)
    packed = torch.cat([first, torch.tensor([eos]), second])[None]
    with torch.no_grad():
        together, alone = model(packed).logits[0, 10:], model(second[None]).logits[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def _mixture_two_ranks(rank: int, world: int, tmp: str) -> list[float]:
    """Two steps of :func:`mixture_config` on ``world`` gloo ranks (rank 0 tokenises, the other waits)."""
    import torch.distributed as dist

    from moetrain.parallel.context import init_parallel
    from moetrain.train.trainer import Trainer

    root = Path(tmp) / "mixture"
    box = [mixture_config(root, micro_batch_size=2) if rank == 0 else None]  # rank 0 writes the corpora
    dist.broadcast_object_list(box, src=0)
    cfg = box[0]
    assert cfg is not None
    trainer = Trainer(cfg, root / f"rank{rank}", init_parallel(cfg.parallel, "cpu"))
    assert trainer.model.doc_eos == trainer.tokenizer.eos_id  # masking is on in the model each rank built
    return [trainer.train_step(trainer.loader.next_batch()).loss.item() for _ in range(2)]


spawned.register(2, "data/mixture_doc_mask", _mixture_two_ranks)


@pytest.mark.parity
def test_mixture_with_doc_mask_trains_the_same_on_two_ranks(tmp_path: Path) -> None:
    """The global batch of a mixture, hence the loss, does not depend on the world size or micro-batch split."""
    from moetrain.train.trainer import Trainer

    cfg = mixture_config(tmp_path)
    one = Trainer(cfg, tmp_path / "one")
    ref = [one.train_step(one.loader.next_batch()).loss.item() for _ in range(2)]
    for losses in spawned.result(2, "data/mixture_doc_mask"):
        assert losses == pytest.approx(ref, rel=1e-5)


@pytest.mark.parity
def test_trainer_mixture_with_doc_mask_resumes_exactly_and_logs_proportions(tmp_path: Path) -> None:
    """4 steps straight == 2 steps, resume, 2 more (a mixture of two sharded sources, document masking)."""
    from moetrain.train.trainer import Trainer
    from tests.train.checkpoint.test_checkpoint import ckpt_config, losses, records

    cfg = ckpt_config(tmp_path, max_steps=4, every=2)
    code, prose = write_corpus(tmp_path / "code", 20), write_corpus(tmp_path / "prose", 12)
    cfg.data.sources = [
        SourceConfig(name="code", source="files", paths=code, weight=0.75),
        SourceConfig(name="prose", source="files", paths=prose, weight=0.25),
    ]
    cfg.data.shard_tokens, cfg.data.doc_mask = 500, True
    cfg.trainer.eval_at_start, cfg.trainer.eval_every = False, 0
    straight = Trainer(cfg, tmp_path / "straight")
    assert straight.model.doc_eos == straight.tokenizer.eos_id  # document masking is on
    assert len(straight.data.sources["code"].stream.shards) > 1  # windows straddle shards
    straight.fit()
    first = Trainer(cfg, tmp_path / "resumed")
    for _ in range(2):
        first.train_step(first.loader.next_batch())
        first.checkpointer.after_step(False)
    del first
    second = Trainer(cfg, tmp_path / "resumed")
    second.fit()
    ref, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [got[s] for s in (3, 4)] == [ref[s] for s in (3, 4)]
    last = [r for r in records(tmp_path / "straight") if "data/source/code" in r][-1]
    assert last["data/source/code"] == 0.75 and last["data/source/prose"] == 0.25  # 4 x 8 rows, 24 + 8


@pytest.mark.e2e
def test_prepare_data_command_builds_the_cache_the_trainer_reuses(tmp_path: Path) -> None:
    from moetrain.data.prepare import compose_data_config, prepare

    paths = write_corpus(tmp_path / "docs", 12)
    overrides = ["data=files", "data.paths=[" + ",".join(paths) + "]", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_data_config([*overrides, "data.seq_len=16", "data.shard_tokens=100"])
    (summary,) = prepare(cfg, progress=False)
    assert summary["train_documents"] + summary["val_documents"] == 12
    assert len(list(Path(summary["directory"]).glob("train/shard_*.bin"))) > 1

    class NoEncode(ByteTokenizer):
        def encode(self, text: str) -> np.ndarray:
            raise AssertionError("the trainer re-tokenised a prepared corpus")

    assert len(prepare_data(cfg, NoEncode()).train) > 0  # same key: served from the prepared shards
    with pytest.raises(ConfigError, match=r"^data\.shard_tokens=0: must be > 0$"):
        compose_data_config([*overrides, "data.shard_tokens=0"])


@pytest.mark.unit
def test_streaming_a_dataset_gives_the_same_splits_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from moetrain.data.corpus import load_documents

    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"body": t} for t in texts(50)] + [{"body": "  "}] + [{"body": f"late {i}"} for i in range(9)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"source": str(folder), "text_field": "body", "val_fraction": 0.3, "cache_dir": str(tmp_path / "c")}
    whole = [list(d["text"]) for d in load_documents(DataConfig(**base))]
    streamed = load_documents(DataConfig(**base, streaming=True))
    assert [[b for batch in d.iter(batch_size=7) for b in batch["text"]] for d in streamed] == whole

    monkeypatch.setattr(shards_mod, "BATCH_DOCS", 5)

    def stop(done: int) -> None:
        if done >= 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_split(tmp_path / "s", streamed[0], ByteTokenizer(), 40, on_batch=stop)
    write_split(tmp_path / "s", streamed[0], ByteTokenizer(), 40)
    stream = TokenStream(tmp_path / "s")
    np.testing.assert_array_equal(stream.read(0, len(stream)), tokenize_documents(whole[0], ByteTokenizer()))
    data = prepare_data(DataConfig(**base, streaming=True, seq_len=8), ByteTokenizer())
    assert len(data.train) == len(stream) // 9
    with pytest.raises(ConfigError, match=r"^data\.streaming=True: is for one hub dataset"):
        validate(TrainConfig(data=DataConfig(streaming=True)))
