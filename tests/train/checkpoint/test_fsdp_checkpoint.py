"""FSDP checkpoints are the same checkpoints: saved with ``parallel.fsdp=true`` they resume with or without FSDP,
on another world and EP size, and export alike; saved without FSDP they resume with it.

Every run trains the same global batches (8 sequences a step, micro-batches of 2, so the micro-batch balance loss
is the same everywhere) for 5 steps, with a checkpoint at step 2. On 2 gloo ranks: FSDP with EP=1 (the routed
experts are DTensors over EDP=2, 2 rows a rank) and EP=2 (EDP=1: plain experts; its step-2 checkpoint is written
asynchronously while step 3 runs), and both without FSDP. A resumed run trains steps 3-5 from one of those
step-2 checkpoints; it must equal the uninterrupted run of its own config: the losses of steps 3-5, every
parameter and AdamW's moments and steps, all keyed per global expert (fp32 tolerance: FSDP reduces in another
order). A 4-rank FSDP EP=2 x DP=2 checkpoint (experts over EDP=2, one row a rank) resumes on 2 ranks with EP=1.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moetrain.config import TrainConfig, from_dict, to_dict
from moetrain.train.checkpoint import CheckpointError, hash_share, model_entries, optimizer_entries, read_entries
from moetrain.train.trainer import Trainer
from tests.conftest import tiny_train_config
from tests.helpers import spawned
from tests.helpers.distributed import merged, run_distributed

pytestmark = pytest.mark.parity

STEPS, SAVED = 5, 2
RUNS = {"fsdp_ep1": (True, 1), "fsdp_ep2": (True, 2), "plain_ep1": (False, 1), "plain_ep2": (False, 2)}
"""The uninterrupted 2-rank runs: name -> (parallel.fsdp, parallel.ep)."""
ASYNC = "fsdp_ep2"
"""The run whose checkpoints are written in the background."""
RESUMES = [("fsdp_ep1", "fsdp_ep1"), ("fsdp_ep2", ASYNC), ("plain_ep2", "fsdp_ep1"), ("plain_ep1", "fsdp_ep2")]
RESUMES += [("fsdp_ep1", "plain_ep2")]
"""(resumed run's config, the run whose step-2 checkpoint it starts from), on 2 ranks."""


def ckpt_config(root: Path) -> TrainConfig:
    """Warmup + cosine LR, loss-free bias on, a dense layer and a shared expert (more DTensors to shard)."""
    cfg = tiny_train_config(root, max_steps=STEPS, micro_batch_size=2, eval_at_start=False, eval_every=0)
    cfg.trainer.precision = "fp32"
    cfg.optim.warmup_steps = 2
    cfg.optim.lr = 3e-3
    cfg.moe.router.bias_update_rate = 1e-3
    cfg.data.max_val_sequences = 4
    cfg.checkpoint.every = SAVED
    cfg.checkpoint.keep_last = 0
    return cfg


def shared_config(rank: int, root: Path, build: Any = ckpt_config) -> TrainConfig:
    """``build(root)`` made by rank 0 alone (it writes the corpus) and given to every rank."""
    box = [to_dict(build(root)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return from_dict(box[0])


def run_config(cfg: TrainConfig, name: str) -> TrainConfig:
    out = copy.deepcopy(cfg)
    out.parallel.fsdp, out.parallel.ep = RUNS[name]
    return out


def gathered(entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint entries as plain tensors: DTensors gathered whole (a test's view; checkpoints never do this),
    expert rows as this rank holds them."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in entries.items()}


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and AdamW state, keyed per global expert (the same for every layout)."""
    return gathered({**model_entries(trainer.model), **optimizer_entries(trainer.model, trainer.optimizer)})


def fit(cfg: TrainConfig, run_dir: Path, pc: Any = None, rank: int = 0) -> dict[str, Any]:
    """Train to ``trainer.max_steps``; the final state, the logged losses (rank 0) and where checkpoints are."""
    trainer = Trainer(cfg, run_dir, pc)
    trainer.fit()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
    losses = {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}
    out = {"state": state(trainer), "losses": losses, "step": trainer.step, "cfg": to_dict(cfg)}
    trainer.close()
    return {**out, "ckpt": str(run_dir / "checkpoints" / f"step_{SAVED:06d}"), "run_dir": str(run_dir)}


def _init(cfg: TrainConfig) -> Any:
    from moetrain.parallel.context import init_parallel

    return init_parallel(cfg.parallel, "cpu", cfg.moe.num_experts)


# ------------------------------------------------------------------ the ranks' side
def _straight(rank: int, world: int, tmp: str, name: str, async_save: bool = False) -> dict[str, Any]:
    """The uninterrupted run ``name`` (checkpoints at steps 2, 4, 5)."""
    root = Path(tmp) / "fsdp_ckpt"
    cfg = run_config(shared_config(rank, root), name)
    cfg.checkpoint.async_save = async_save
    return fit(cfg, root / name, _init(cfg), rank)


def _resume(rank: int, world: int, tmp: str, name: str, source: str) -> dict[str, Any]:
    """Run ``name`` from the step-2 checkpoint of the 2-rank run ``source`` (same spawn, same corpus)."""
    root = Path(tmp) / "fsdp_ckpt"
    cfg = run_config(shared_config(rank, root), name)
    cfg.trainer.resume = str(root / source / "checkpoints" / f"step_{SAVED:06d}")
    cfg.checkpoint.enabled = False
    return fit(cfg, root / f"{name}_from_{source}", _init(cfg), rank)


def _resume_from(rank: int, world: int, ckpt: str, cfg_dict: dict[str, Any], name: str, run_dir: str) -> Any:
    """Run ``name`` (the saving run's config otherwise) from ``ckpt``."""
    cfg = run_config(from_dict(cfg_dict), name)
    cfg.trainer.resume, cfg.checkpoint.enabled = ckpt, False
    return fit(cfg, Path(run_dir), _init(cfg), rank)


def _async_and_sync(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """FSDP EP=1 after one step saves its state twice, synchronously and then asynchronously, the next step
    changing every weight and moment while the second is written."""
    root = Path(tmp) / "fsdp_ckpt"
    cfg = run_config(shared_config(rank, root), "fsdp_ep1")
    cfg.checkpoint.enabled = False
    trainer = Trainer(cfg, root / "async_sync", _init(cfg))
    trainer.train_step(trainer.loader.next_batch())
    saved, group = state(trainer), trainer.checkpointer.group
    trainer.module.save_checkpoint(root / "sync", group, False)
    future = trainer.module.save_checkpoint(root / "async", group, True)
    assert future is not None
    trainer.train_step(trainer.loader.next_batch())
    result = future.result()
    if hasattr(result, "upload_completion"):  # AsyncSaveResponse
        result.upload_completion.result()
    changed = [k for k, v in state(trainer).items() if not torch.equal(v, saved[k])]
    dist.barrier()
    return {"state": saved, "changed": changed, "cfg": to_dict(cfg), "dirs": [str(root / "sync"), str(root / "async")]}


def _bad_copies(good: Path, root: Path) -> dict[str, Path]:
    """Rank 0's broken copies of a checkpoint: meta.json's architecture emptied (so only the tensor shapes can
    tell a model with another ``ffn_hidden_size``), a data file cut in half with meta.json's checksums
    rewritten to match (so the index's lengths catch it), and one byte flipped in a file of rank 1's checksum
    share (the second file: the i-th is rank i % 2's), which only rank 1's share of the verification sees."""
    shape, truncated, flipped = root / "bad_shape", root / "bad_truncated", root / "bad_flipped"
    for path in (shape, truncated, flipped):
        shutil.copytree(good, path)
    meta = json.loads((shape / "meta.json").read_text())
    (shape / "meta.json").write_text(json.dumps({**meta, "arch": {}}))
    data = truncated / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    (truncated / "meta.json").write_text(json.dumps({**meta, "files": hash_share(truncated)}))
    target = flipped / sorted(meta["files"])[1]
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same length: only the SHA-256 tells
    target.write_bytes(bytes(raw))
    return {"shape": shape, "truncated": truncated, "flipped": flipped, "flipped_file": target.name}


def _bad_into_fsdp(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Each bad checkpoint into a fresh FSDP EP=1 model: the error line on this rank, and whether the model's
    shards, the optimizer and the step are untouched."""
    from moetrain.train.checkpoint.sharded import local_tensor

    root = Path(tmp) / "fsdp_ckpt"
    cfg = run_config(shared_config(rank, root), "fsdp_ep1")
    cfg.checkpoint.enabled = False
    box = [_bad_copies(root / "fsdp_ep1" / "checkpoints" / f"step_{SAVED:06d}", root) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    out: dict[str, Any] = {"flipped_file": box[0]["flipped_file"]}
    same = cfg.model.ffn_hidden_size
    for case, ffn in (("shape", 48), ("truncated", same), ("flipped", same)):
        cfg.model.ffn_hidden_size = ffn
        trainer = Trainer(cfg, root / f"probe_{case}", _init(cfg))
        before = {n: local_tensor(p).detach().clone() for n, p in trainer.model.named_parameters()}
        try:
            trainer.checkpointer.load(root / f"bad_{case}")
            error = None
        except CheckpointError as e:
            error = str(e)
        params = dict(trainer.model.named_parameters())
        untouched = params.keys() == before.keys() and all(
            torch.equal(local_tensor(params[n]).detach(), v) for n, v in before.items()
        )
        out[case] = {"error": error, "untouched": untouched, "fresh": not trainer.optimizer.state and not trainer.step}
    return out


def export_config(root: Path) -> TrainConfig:
    """A model transformers' Mixtral reproduces (no dense layer, no shared expert, renormalised top-2)."""
    cfg = tiny_train_config(root, max_steps=SAVED, micro_batch_size=2, eval_at_start=False, eval_every=0)
    cfg.trainer.precision = "fp32"
    cfg.model.first_k_dense = 0
    cfg.moe.num_shared_experts = 0
    cfg.moe.router.norm_topk_prob = True
    cfg.optim.lr = 1e-2  # away from the initial weights
    return cfg


def _export_source(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """FSDP EP=1 trains :func:`export_config` for 2 steps; its checkpoint and the whole trained parameters."""
    from torch.distributed.tensor import DTensor

    root = Path(tmp) / "fsdp_export"
    cfg = run_config(shared_config(rank, root, export_config), "fsdp_ep1")
    trainer = Trainer(cfg, root / "run", _init(cfg))
    trainer.fit()
    whole = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in trainer.model.named_parameters()
    }
    return {"whole": whole, "cfg": to_dict(cfg), "ckpt": str(root / "run" / "checkpoints" / f"step_{SAVED:06d}")}


def _uneven_rows(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """3 experts over EDP=2 (FSDP EP=1): rows 0-1 on rank 0, row 2 on rank 1 (FSDP pads it). One step and a
    checkpoint; another FSDP model reads it back. The whole expert stacks, the local rows and both states."""
    from torch.distributed.tensor import DTensor

    from moetrain.parallel.data_parallel import reshard
    from moetrain.train.checkpoint.sharded import local_rows

    root = Path(tmp) / "fsdp_ckpt"
    cfg = run_config(shared_config(rank, root), "fsdp_ep1")
    cfg.moe.num_experts, cfg.trainer.max_steps, cfg.checkpoint.every = 3, 1, 1
    trainer = Trainer(cfg, root / "uneven", _init(cfg))
    trainer.fit()
    reshard(trainer.model)  # the sharded parameters, whatever the last forward left gathered
    experts = {n: p for n, p in trainer.model.named_parameters() if ".experts." in n}
    assert all(isinstance(p, DTensor) for p in experts.values())
    cfg.checkpoint.enabled = False
    again = Trainer(cfg, root / "uneven_again", _init(cfg))
    again.checkpointer.load(root / "uneven" / "checkpoints" / "step_000001")
    return {
        "rows": {n: tuple(int(x) for x in (local_rows(p)[0], local_rows(p)[1].shape[0])) for n, p in experts.items()},
        "whole": {n: p.full_tensor().detach().clone() for n, p in experts.items()},
        "state": state(trainer),
        "reloaded": state(again),
        "cfg": to_dict(cfg),
        "ckpt": str(root / "uneven" / "checkpoints" / "step_000001"),
    }


for _name in RUNS:
    spawned.register(2, f"fsdp_ckpt/{_name}", functools.partial(_straight, name=_name, async_save=_name == ASYNC))
for _run, _source in RESUMES:
    spawned.register(2, f"fsdp_ckpt/{_run}<-{_source}", functools.partial(_resume, name=_run, source=_source))
for _check in (_async_and_sync, _bad_into_fsdp, _export_source, _uneven_rows):
    spawned.register(2, f"fsdp_ckpt/{_check.__name__.strip('_')}", _check)
spawned.register(4, "fsdp_ckpt/ep2xdp2", functools.partial(_straight, name="fsdp_ep2"))


# ----------------------------------------------------------------- the comparisons


def assert_continues(runs: list[dict[str, Any]], refs: list[dict[str, Any]], what: str) -> None:
    """``runs`` (resumed at step 2) equal the uninterrupted ``refs``: losses of steps 3-5, every tensor."""
    got_losses, ref_losses = runs[0]["losses"], refs[0]["losses"]
    assert sorted(got_losses) == list(range(SAVED + 1, STEPS + 1)), what
    for step, loss in got_losses.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), f"{what}: step {step}"
    assert all(r["step"] == STEPS for r in runs), what
    got, ref = merged(runs, "state"), merged(refs, "state")
    assert got.keys() == ref.keys(), f"{what}: {sorted(got.keys() ^ ref.keys())[:4]}"
    assert any(".experts." in k and k.endswith("exp_avg_sq") for k in got)  # per-expert moments are compared
    for k, v in ref.items():
        # each tensor to 1e-4 of its own scale: AdamW's second moments are ~1e-8, a fixed atol would pass anything
        atol = 1e-4 * float(v.abs().max()) if v.is_floating_point() and v.numel() else 0.0
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=atol, msg=f"{what}: {k}")


def test_one_checkpoint_format_with_or_without_fsdp():
    """The step-2 checkpoints of the four 2-rank runs index the same entries with the same whole shapes and
    dtypes (FSDP writes shards of them, the others whole tensors): nothing tells them apart but the layout."""
    from moetrain.train.checkpoint.reading import SafeFileSystemReader

    def index(ckpt: str) -> dict[str, Any]:
        md = SafeFileSystemReader(ckpt).read_metadata().state_dict_metadata
        return {k: (tuple(v.size), v.properties.dtype) for k, v in md.items()}  # type: ignore[union-attr]

    indexes = {name: index(spawned.result(2, f"fsdp_ckpt/{name}")[0]["ckpt"]) for name in RUNS}
    assert any(".experts." in k and k.endswith(".exp_avg") for k in indexes["fsdp_ep1"])
    for name, idx in indexes.items():
        assert idx == indexes["plain_ep1"], (name, sorted(idx.items() ^ indexes["plain_ep1"].items())[:4])


@pytest.mark.parametrize(("run", "source"), RESUMES)
def test_checkpoint_resumes_on_two_ranks_with_or_without_fsdp(run, source):
    """FSDP -> FSDP (EP=1 and EP=2, the latter saved asynchronously), FSDP -> without (EP 1 -> 2 and
    2 -> 1), and without FSDP -> FSDP (EP 2 -> 1)."""
    resumed = spawned.result(2, f"fsdp_ckpt/{run}<-{source}")
    assert_continues(resumed, spawned.result(2, f"fsdp_ckpt/{run}"), f"{run} from {source}")


@pytest.mark.parametrize("source", ["fsdp_ep1", "fsdp_ep2"])
def test_fsdp_checkpoint_resumes_in_one_process(tmp_path, source):
    saved = spawned.result(2, f"fsdp_ckpt/{source}")
    cfg = from_dict(saved[0]["cfg"])  # the spawn's corpus
    cfg.parallel.fsdp, cfg.parallel.ep, cfg.trainer.num_threads = False, 1, 1
    straight = fit(cfg, tmp_path / "straight")
    cfg.trainer.resume, cfg.checkpoint.enabled = saved[0]["ckpt"], False
    assert_continues([fit(cfg, tmp_path / "resumed")], [straight], f"one process from {source}")


def test_four_rank_fsdp_checkpoint_resumes_on_two_ranks_with_another_ep():
    """Saved by FSDP EP=2 x DP=2 (experts over EDP=2), resumed by FSDP EP=1 on 2 ranks (experts over EDP=2, two
    rows a rank): world and EP size both change. The 2-rank resume needs a spawn of its own (after the save)."""
    saved = spawned.result(4, "fsdp_ckpt/ep2xdp2")
    run_dir = str(Path(saved[0]["ckpt"]).parents[2] / "fsdp_ep1_from_4")
    resumed = run_distributed(_resume_from, 2, saved[0]["ckpt"], saved[0]["cfg"], "fsdp_ep1", run_dir)
    assert_continues(resumed, spawned.result(2, "fsdp_ckpt/fsdp_ep1"), "FSDP EP=1 on 2 from FSDP EP=2 x DP=2 on 4")
    assert_continues(resumed, saved, "the 4-rank run itself")


def one_process_trainer(cfg_dict: dict[str, Any], run_dir: Path) -> Trainer:
    """A trainer without FSDP in this process, of a spawn's config (its corpus)."""
    cfg = from_dict(cfg_dict)
    cfg.parallel.fsdp, cfg.parallel.ep, cfg.trainer.num_threads = False, 1, 1
    return Trainer(cfg, run_dir)


def test_async_save_with_fsdp_writes_what_a_sync_save_writes(tmp_path):
    runs = spawned.result(2, "fsdp_ckpt/async_and_sync")
    assert all(r["changed"] for r in runs)  # the step after the save changed the state while it was written
    one = one_process_trainer(runs[0]["cfg"], tmp_path / "one")
    wanted = {**model_entries(one.model), **optimizer_entries(one.model, one.optimizer)}
    sync_dir, async_dir = runs[0]["dirs"]
    written_sync, written_async = read_entries(Path(sync_dir), wanted), read_entries(Path(async_dir), wanted)
    saved = merged(runs, "state")
    assert saved.keys() == wanted.keys()
    for k, v in saved.items():
        assert torch.equal(written_sync[k], v), k
        assert torch.equal(written_async[k], v), k


def test_the_checkpoint_after_the_final_evaluation_holds_the_final_state(tmp_path):
    """The last step is evaluated, then saved: the evaluation's forward leaves FSDP's root and last block holding
    their gathered parameters (they are not resharded after forward); the save holds the sharded, final state."""
    runs = spawned.result(2, "fsdp_ckpt/fsdp_ep1")
    run_dir = Path(runs[0]["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == STEPS and "val/loss" in r for r in records)
    one = one_process_trainer(runs[0]["cfg"], tmp_path / "one")
    wanted = {**model_entries(one.model), **optimizer_entries(one.model, one.optimizer)}
    written = read_entries(run_dir / "checkpoints" / f"step_{STEPS:06d}", wanted)
    for k, v in merged(runs, "state").items():
        assert torch.equal(written[k], v), k


def test_bad_checkpoint_into_fsdp_fails_with_one_line_and_touches_nothing():
    for rank, out in enumerate(spawned.result(2, "fsdp_ckpt/bad_into_fsdp")):
        shape, truncated = out["shape"], out["truncated"]
        # a DTensor target is checked by its whole shape, (48, 32), not by this rank's shard, (24, 32)
        assert shape["error"] and "\n" not in shape["error"], (rank, shape["error"])
        assert "blocks.0.ffn.w1.weight has shape (64, 32) in the checkpoint, (48, 32) in this run" in shape["error"]
        assert truncated["error"] and "\n" not in truncated["error"], (rank, truncated["error"])
        assert "__0_0.distcp: truncated (" in truncated["error"] and "the index needs" in truncated["error"]
        # catches every rank verifying checksum share 0: the flipped file is in rank 1's share only
        flipped = out["flipped"]
        assert flipped["error"] and f"{out['flipped_file']}: checksum mismatch" in flipped["error"], (rank, flipped)
        for case in (shape, truncated, flipped):
            assert case["untouched"] and case["fresh"], (rank, case)


def test_uneven_expert_rows_round_trip_and_load_in_one_process(tmp_path):
    """FSDP's padded, uneven split of 3 experts: each rank writes and reads its own rows, and one process
    loads the whole stacks FSDP held."""
    from moetrain.train.weights import load_model_weights

    runs = spawned.result(2, "fsdp_ckpt/uneven_rows")
    assert set(runs[0]["rows"].values()) == {(0, 2)} and set(runs[1]["rows"].values()) == {(2, 1)}
    for r in runs:
        assert r["reloaded"].keys() == r["state"].keys()
        for k, v in r["state"].items():
            assert torch.equal(r["reloaded"][k], v), k
    one = one_process_trainer(runs[0]["cfg"], tmp_path / "one")
    load_model_weights(one.model, runs[0]["ckpt"])
    params = dict(one.model.named_parameters())
    for name, whole in runs[0]["whole"].items():
        assert torch.equal(params[name].detach(), whole), name


def test_fsdp_checkpoint_exports_like_the_same_weights_saved_without_fsdp(tmp_path):
    """moetrain-export of an FSDP checkpoint: the same files as the export of a checkpoint holding the same
    weights saved without FSDP (one process loads the FSDP one and saves), the FSDP run's trained weights, and
    transformers' logits equal to moetrain's."""
    from safetensors.torch import load_file

    from moetrain.tools.export import load_checkpoint_model, main
    from tests.tools.test_export import hf_logits, moetrain_logits, needs

    needs("transformers", "safetensors")
    runs = spawned.result(2, "fsdp_ckpt/export_source")
    ckpt = runs[0]["ckpt"]
    one = one_process_trainer(runs[0]["cfg"], tmp_path / "plain")
    one.checkpointer.load(Path(ckpt))
    plain = one.checkpointer.save()
    assert main([ckpt, str(tmp_path / "fsdp_out")]) == 0
    assert main([str(plain), str(tmp_path / "plain_out")]) == 0
    for rel in ("model.safetensors", "hf/model.safetensors"):
        a, b = load_file(str(tmp_path / "fsdp_out" / rel)), load_file(str(tmp_path / "plain_out" / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    exported = load_file(str(tmp_path / "fsdp_out" / "model.safetensors"))
    assert runs[0]["whole"].keys() <= exported.keys()  # every parameter (and the buffers)
    for name, whole in runs[0]["whole"].items():
        assert torch.equal(exported[name], whole), name
    model, _, _ = load_checkpoint_model(ckpt)
    tokens = torch.randint(0, model.vocab_size, (2, 32))
    ref = moetrain_logits(model, tokens)
    torch.testing.assert_close(hf_logits(tmp_path / "fsdp_out" / "hf", tokens), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.unit
def test_param_groups_map_by_role_across_the_fsdp_split(tmp_path):
    """FSDP splits each param group into its plain and DTensor halves (``decay`` / ``decay_fsdp``): a resume maps
    the schedule of each group by its role, and a group the checkpoint lacks is one line, before any read."""
    from moetrain.train.checkpoint.native import load_schedule, saved_groups_of

    w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"name": "decay", "params": [w]}, {"name": "no_decay", "params": [b]}], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    names, lrs = ("decay", "decay_fsdp", "no_decay", "no_decay_fsdp"), (0.1, 0.1, 0.2, 0.2)
    saved = [{"name": n, "lr": lr, "initial_lr": 2 * lr} for n, lr in zip(names, lrs)]
    scheduler = {"base_lrs": [2 * lr for lr in lrs], "_last_lr": list(lrs), "last_epoch": 3, "_step_count": 4}
    meta = {"param_groups": saved, "scheduler": scheduler}
    assert saved_groups_of(tmp_path, meta, opt) == [0, 2]
    load_schedule(tmp_path, opt, sched, meta)  # the position is the checkpoint's, the rates this run's (lr=1.0)
    assert [(g["lr"], g["initial_lr"]) for g in opt.param_groups] == [(1.0, 1.0), (1.0, 1.0)]
    assert sched.base_lrs == [1.0, 1.0] and sched.get_last_lr() == [1.0, 1.0] and sched.last_epoch == 3
    with pytest.raises(CheckpointError, match=r"meta\.json: no optimizer param group 'no_decay' was saved"):
        saved_groups_of(tmp_path, {"param_groups": saved[:2]}, opt)
