"""Pipeline checkpoints are the same checkpoints: a rank saves its stages' model and AdamW state through DCP
under the one-process names (experts per global index), so a checkpoint saved at one (pipeline, expert)
layout loads at any other, in one process, and exports alike.

Function level (no trainer): each saving layout builds its stages on the meta device (seed 7), runs one
training step by hand (torch's pipeline schedule, non-expert gradients averaged over a stage's EP ranks) with
an optimizer and LR schedule per stage, and saves with :func:`moetrain.train.checkpoint.native.save_state`
and a ``meta.json`` as the manager writes. Each loading layout builds its model from another seed (so nothing
equals by construction) and loads with :func:`~moetrain.train.checkpoint.native.load_state`. Every parameter,
every AdamW state tensor (``step``, ``exp_avg``, ``exp_avg_sq``) and every group's LR must equal the saving
ranks' bitwise, read straight from the modules and optimizers (keyed per global expert here, not through the
checkpoint's entry functions, so a name mix-up the save and load would share is still caught).

Layouts: 2 ranks, PP=2 with 2 stages a rank (interleaved 1F1B, an optimizer per stage) -> PP=1 x EP=2 and one
process; 4 ranks, PP=2 x EP=2 -> PP=4 and one process; PP=1 x EP=4 -> PP=2 x EP=2 with 2 stages a rank (ZBV).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moetrain.config import BalanceConfig, ModelConfig, MoEConfig, TrainConfig, resolve_num_groups, to_dict
from moetrain.config.pipeline_layout import stage_ids, stage_specs, stages_per_rank
from moetrain.model import build_model
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel import ParallelContext, apply_expert_parallel, expert_parameters
from moetrain.parallel.meta_init import build_local_model
from moetrain.parallel.pipeline import SCHEDULES, build_schedule
from moetrain.parallel.pipeline_stage import build_stage_modules, pipeline_stage
from moetrain.train.checkpoint import CheckpointError, arch_of, checkpoint_name, hash_share, read_meta
from moetrain.train.checkpoint.layout import FORMAT_VERSION, verify_checkpoint, write_meta_and_publish
from moetrain.train.checkpoint.native import load_state, save_state, schedule_meta
from moetrain.train.optim import build_optimizer, build_scheduler
from moetrain.train.step import lm_loss
from tests.helpers import spawned
from tests.helpers.distributed import merged
from tests.helpers.exported import assert_export_equals_one_process

pytestmark = pytest.mark.parity

VOCAB, SEQ, SEED, BATCH, MICRO = 264, 16, 7, 8, 4  # the byte tokenizer's 256 + specials fit (export)
CPU = torch.device("cpu")


def _config() -> TrainConfig:
    """5 blocks (a dense one first), 4 experts and a shared one, aux loss on; the optimizer's defaults."""
    cfg = TrainConfig()
    cfg.model = ModelConfig(dim=32, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=1)
    cfg.moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16, balance=BalanceConfig(expert_coef=0.1))
    cfg.data.seq_len = SEQ
    cfg.trainer.max_steps = 10
    cfg.optim.warmup_steps = 2
    return cfg


def _batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))


class Rank:
    """One rank of a (pp, ep) layout over ``pp * ep`` ranks: mesh ("pp", "ep"), its stages' modules (the whole
    model at pp=1), an AdamW and LR schedule per module."""

    def __init__(self, rank: int, pp: int, ep: int, schedule: str = "1f1b", seed: int = SEED) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        cfg = _config()
        self.rank, self.pp, self.ep, self.schedule = rank, pp, ep, schedule
        self.pp_rank, self.ep_rank = divmod(rank, ep)
        self.mesh = init_device_mesh("cpu", (pp, ep), mesh_dim_names=("pp", "ep"))
        ep_group = self.mesh["ep"].get_group() if ep > 1 else None
        pc = ParallelContext(rank=rank, world_size=pp * ep, ep_size=ep, ep_group=ep_group)
        n_per = stages_per_rank(schedule, 2)
        self.n_stages = pp * n_per
        self.specs = [
            stage_specs(5, self.n_stages)[i] for i in stage_ids(self.pp_rank, pp, n_per, SCHEDULES[schedule].style)
        ]
        args = (cfg.model, cfg.moe, VOCAB, SEQ)
        if pp == 1:
            self.modules: list[nn.Module] = [build_local_model(*args, ep=ep, ep_rank=self.ep_rank, seed=seed)]
        else:
            self.modules = list(
                build_stage_modules(*args, self.specs, self.n_stages, ep=ep, ep_rank=self.ep_rank, seed=seed)
            )
        for m in self.modules:
            apply_expert_parallel(m, pc)
        self.optimizers = [build_optimizer(m, cfg.optim) for m in self.modules]
        self.schedulers = [build_scheduler(o, cfg.optim, cfg.trainer.max_steps) for o in self.optimizers]

    def train_step(self) -> None:
        """One step on this rank's share of the batch (its EP rank's half), then AdamW and the LR schedule."""
        batch = _batch().chunk(self.ep)[self.ep_rank]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if self.pp == 1:
            out = self.modules[0](inputs)
            (lm_loss(out.logits, targets) + out.aux_loss).backward()
        else:
            stages = [
                pipeline_stage(
                    m,
                    self.n_stages,
                    microbatch=len(batch) // MICRO,
                    seq_len=SEQ,
                    dim=32,
                    vocab_size=VOCAB,
                    device=CPU,
                    group=self.mesh["pp"].get_group(),
                )
                for m in self.modules
            ]
            first, last = any(s.embedding for s in self.specs), any(s.head for s in self.specs)
            build_schedule(self.schedule, stages, MICRO, lm_loss).step(
                *((inputs,) if first else ()), tokens_BS=inputs, target=targets if last else None
            )
        for m in self.modules:  # a stage's replicas agree: average the non-expert gradients over its EP ranks
            experts = {id(p) for p in expert_parameters(m)}
            for p in m.parameters():
                if id(p) not in experts and self.ep > 1:
                    dist.all_reduce(p.grad, group=self.mesh["ep"].get_group())
                    p.grad /= self.ep
        for opt, sched in zip(self.optimizers, self.schedulers, strict=True):
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

    def state(self) -> dict[str, torch.Tensor]:
        return raw_state(self.modules, self.optimizers)

    def save(self, root: Path) -> Path:
        """``root/step_000001``: DCP shards from every rank, then rank 0's ``meta.json`` and the rename."""
        final = root / checkpoint_name(1)
        tmp = root / (final.name + ".tmp")
        save_state(self.modules, self.optimizers, self.rank, tmp, dist.group.WORLD, asynchronous=False)
        dist.barrier()
        if self.rank == 0:
            meta = checkpoint_meta(self.optimizers, self.schedulers, self.pp, self.ep)
            write_meta_and_publish(tmp, final, {**meta, "files": hash_share(tmp)})
        dist.barrier()
        return final

    def load(self, path: Path) -> None:
        meta = read_meta(path)
        load_state(path, meta, self.modules, self.optimizers, self.schedulers, self.rank, SEED, dist.group.WORLD)


def checkpoint_meta(optimizers: Any, schedulers: Any, pp: int, ep: int, world: int | None = None) -> dict[str, Any]:
    """What :meth:`CheckpointManager.meta` writes, for a step-1 checkpoint of this layout."""
    cfg = _config()
    cfg.parallel.ep = ep
    model = SimpleNamespace(vocab_size=VOCAB, num_groups=resolve_num_groups(cfg.moe, ep))
    return {
        "format": FORMAT_VERSION,
        "world_size": world or pp * ep,
        "ep": ep,
        "pp": pp,
        "step": 1,
        "tokens_seen": BATCH * SEQ,
        "loader": {},
        "engine": "native",
        **schedule_meta(optimizers, schedulers),
        "arch": arch_of(cfg, model),
        "config": to_dict(cfg),
    }


def raw_state(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
    """Every parameter, persistent buffer, AdamW state tensor and group LR, straight from the objects, with the
    routed experts' rows under their global index (``expert_offset``); not through the checkpoint entries."""
    offsets = {
        f"{prefix}.{w}": int(getattr(mod, "expert_offset", 0))
        for m in modules
        for prefix, mod in m.named_modules()
        if isinstance(mod, GroupedExperts)
        for w in ("w13", "w2")
    }
    out: dict[str, torch.Tensor] = {}

    def put(key: str, name: str, t: torch.Tensor) -> None:
        if name in offsets and t.dim() > 0:
            for i in range(t.shape[0]):
                out[f"{key}.{offsets[name] + i}"] = t[i].detach().clone()
        else:
            out[key] = t.detach().clone()

    for m, opt in zip(modules, optimizers, strict=True):
        params = dict(m.named_parameters())
        for name, t in m.state_dict().items():
            put(f"{'param' if name in params else 'buffer'}.{name}", name, t)
        for name, p in params.items():
            for key, value in opt.state[p].items():
                put(f"optim.{name}.{key}", name, value)
        for group in opt.param_groups:
            out[f"lr.{group['name']}"] = torch.tensor(group["lr"])
    return out


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: {sorted(got.keys() ^ want.keys())[:5]}"
    for key, value in want.items():
        assert torch.equal(got[key], value), f"{what}: {key} differs"


# ------------------------------------------------------------------ the spawned checks
def _save(rank: int, world: int, tmp: str, pp: int, ep: int, schedule: str, name: str) -> dict[str, Any]:
    r = Rank(rank, pp, ep, schedule)
    r.train_step()
    path = r.save(Path(tmp) / name)
    return {"state": r.state(), "ckpt": str(path)}


def _load(rank: int, world: int, tmp: str, pp: int, ep: int, name: str, schedule: str = "1f1b") -> dict[str, Any]:
    r = Rank(rank, pp, ep, schedule, seed=SEED + 1)
    r.load(Path(tmp) / name / checkpoint_name(1))
    assert all(s.last_epoch == 1 for s in r.schedulers)
    return {"state": r.state()}


spawned.register(2, "pp_ckpt/save_pp2_v2", functools.partial(_save, pp=2, ep=1, schedule="interleaved_1f1b", name="a"))
spawned.register(2, "pp_ckpt/pp2_v2->pp1_ep2", functools.partial(_load, pp=1, ep=2, name="a"))
spawned.register(4, "pp_ckpt/save_pp2_ep2", functools.partial(_save, pp=2, ep=2, schedule="1f1b", name="b"))
spawned.register(4, "pp_ckpt/pp2_ep2->pp4", functools.partial(_load, pp=4, ep=1, name="b"))
spawned.register(4, "pp_ckpt/save_pp1_ep4", functools.partial(_save, pp=1, ep=4, schedule="1f1b", name="c"))
spawned.register(4, "pp_ckpt/pp1_ep4->pp2_ep2", functools.partial(_load, pp=2, ep=2, name="c", schedule="zbv"))


def _saved(world: int, name: str) -> tuple[dict[str, torch.Tensor], Path]:
    ranks = spawned.result(world, name)
    return merged(ranks, "state"), Path(ranks[0]["ckpt"])


def _one_process_load(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint loaded into the whole model in one process (another seed's init), as a resume would:
    ``meta.json`` and the checksums verified first."""
    cfg = _config()
    model = build_model(cfg.model, cfg.moe, VOCAB, SEQ, seed=SEED + 1)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.trainer.max_steps)
    meta = read_meta(path)
    verify_checkpoint(path, meta)
    load_state(path, meta, model, opt, sched, 0, SEED, None)
    return raw_state([model], [opt])


def test_pp2_checkpoint_with_two_stages_a_rank_loads_at_pp1_ep2_and_in_one_process() -> None:
    """Catches a stage's entries saved under stage-local names or left out (a rank's second stage, its second
    optimizer), AdamW state attached to the wrong parameter, or an LR schedule not restored for every stage's
    optimizer: PP=2 (interleaved, stages 0+2 and 1+3) -> PP=1 x EP=2 and one process, all bitwise."""
    want, path = _saved(2, "pp_ckpt/save_pp2_v2")
    assert read_meta(path)["pp"] == 2
    assert_bitwise(_one_process_load(path), want, "one process")
    assert_bitwise(merged(spawned.result(2, "pp_ckpt/pp2_v2->pp1_ep2"), "state"), want, "PP=1 x EP=2")


def test_pp2_x_ep2_checkpoint_loads_at_pp4_and_in_one_process() -> None:
    """Catches expert entries of a stage saved under EP-local indices (EP=2 inside a stage), or a stage's
    replicated entries deduplicated wrongly: PP=2 x EP=2 -> PP=4 x EP=1 and one process, bitwise."""
    want, path = _saved(4, "pp_ckpt/save_pp2_ep2")
    assert_bitwise(_one_process_load(path), want, "one process")
    assert_bitwise(merged(spawned.result(4, "pp_ckpt/pp2_ep2->pp4"), "state"), want, "PP=4")


def test_pp1_x_ep4_checkpoint_loads_at_pp2_x_ep2() -> None:
    """Catches a stage that reads another stage's entries or the wrong experts (EP=4 -> EP=2 inside a stage),
    or a rank's second stage (its own optimizer and LR schedule) left unrestored: PP=1 x EP=4 -> PP=2 x EP=2
    with the V placement (stages 0+3 and 1+2), bitwise (every rank's part, merged)."""
    want, _ = _saved(4, "pp_ckpt/save_pp1_ep4")
    assert_bitwise(merged(spawned.result(4, "pp_ckpt/pp1_ep4->pp2_ep2"), "state"), want, "PP=2 x EP=2")


def test_export_of_a_pp2_checkpoint_equals_the_export_of_its_weights_at_pp1(tmp_path: Path) -> None:
    """Catches an export that misses or misplaces a stage's tensors: the PP=2 checkpoint's ``moetrain-export``
    output equals, tensor for tensor, that of a one-process weights checkpoint of the same weights (the
    reference state put into the whole model by ``load_state_dict``, not through the checkpoint reader)."""
    want, path = _saved(2, "pp_ckpt/save_pp2_v2")
    flat = {name: v for key, v in want.items() for kind, _, name in [key.partition(".")] if kind in ("param", "buffer")}
    written = assert_export_equals_one_process(path, flat, tmp_path)
    assert (written["hf"] is not None) == _has("transformers"), written.get("hf_skipped")  # a Qwen2-MoE shape
    assert json.loads((Path(written["safetensors"]).parent / "config.json").read_text())["step"] == 1


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.unit
def test_schedule_meta_of_stage_optimizers_names_each_group_once_and_maps_back() -> None:
    """Catches a ``meta.json`` that lists each stage's groups again (or only the last stage's), which a resume
    at another pipeline size would map onto the wrong hyperparameters, and a stage optimizer whose group the
    checkpoint lacks loading silently instead of one line naming ``meta.json`` and the group."""
    from moetrain.train.checkpoint.native import saved_groups_of

    lin = [nn.Linear(2, 2), nn.Linear(2, 2)]
    opts = [
        torch.optim.AdamW([{"name": "decay", "params": [m.weight]}, {"name": "no_decay", "params": [m.bias]}])
        for m in lin
    ]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in opts]
    meta = schedule_meta(opts, scheds)
    assert [g["name"] for g in meta["param_groups"]] == ["decay", "no_decay"]
    assert saved_groups_of(Path("ckpt"), meta, opts) == [0, 1, 0, 1]
    odd = torch.optim.AdamW([{"name": "experts", "params": [nn.Linear(2, 2).weight]}])
    with pytest.raises(CheckpointError, match=r"ckpt/meta.json: no optimizer param group 'experts' was saved"):
        saved_groups_of(Path("ckpt"), meta, [*opts, odd])


def test_a_missing_stage_shard_is_refused_before_loading(tmp_path: Path) -> None:
    """Catches a PP checkpoint whose ``meta.json`` lists only rank 0's (stage 0's) files, or a load that reads
    what is left of a checkpoint missing one stage's shard: the checksums name the missing file in one line."""
    import shutil

    _, path = _saved(2, "pp_ckpt/save_pp2_v2")
    files = json.loads((path / "meta.json").read_text())["files"]
    shards = sorted(f for f in files if f.endswith(".distcp"))
    assert len(shards) == 2
    copy = tmp_path / path.name
    shutil.copytree(path, copy)
    (copy / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=shards[1]) as err:
        verify_checkpoint(copy, read_meta(copy))
    assert "\n" not in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize("pp", [0, "2", True, 2.0])
def test_a_bad_pp_field_in_meta_json_is_one_line(tmp_path: Path, pp: object) -> None:
    """Catches a ``meta.json`` whose pipeline size is not a count >= 1 being accepted (or failing later with a
    traceback): one line naming the field; a checkpoint without the field (saved before PP) stays valid."""
    from moetrain.train.checkpoint.layout import validate_meta

    lin = nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"name": "decay", "params": [lin.weight]}])
    meta = {**checkpoint_meta([opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)], 2, 1), "files": {}}
    validate_meta(tmp_path, meta)
    validate_meta(tmp_path, {k: v for k, v in meta.items() if k != "pp"})
    with pytest.raises(CheckpointError, match="field 'pp' must be a JSON int >= 1") as err:
        validate_meta(tmp_path, {**meta, "pp": pp})
    assert "\n" not in str(err.value)
