"""The native engine's checkpoint files: model, AdamW state and RNG as DCP shards, resharding on load.

Every rank writes its entries (:mod:`moetrain.train.checkpoint.entries`) with
``torch.distributed.checkpoint``; DCP deduplicates the replicated ones. Loading
reads exactly the entries this rank's model and optimizer need, so any world
size and EP size can load any checkpoint. Under FSDP each rank writes and reads
its shards only (DTensor entries, :mod:`~moetrain.train.checkpoint.sharded`);
an asynchronous save stages (copies) them to the CPU before training goes on.
Under pipeline parallelism a rank passes its stages' modules and their optimizers (and schedulers): the
entries keep the one-process names (:mod:`~moetrain.train.checkpoint.entries`), so DCP writes each stage's
once and any pipeline size reads them.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter

from moetrain.config import TrainConfig, to_dict
from moetrain.train.checkpoint.compat import arch_of
from moetrain.train.checkpoint.entries import (
    Modules,
    Optimizers,
    as_optimizers,
    copy_into,
    model_entries,
    optimizer_entries,
    owned_copies,
    reseed_rank,
    rng_entries,
    set_optimizer_state,
    set_rng,
)
from moetrain.train.checkpoint.layout import (
    FORMAT_VERSION,
    META_FILE,
    CheckpointError,
    checkpoint_name,
    hash_share,
    write_meta_and_publish,
)
from moetrain.train.checkpoint.reading import quiet_dcp, read_entries
from moetrain.train.optim import FSDP_GROUP_SUFFIX, restart_schedule


def save_state(
    model: Modules, optimizer: Optimizers, rank: int, tmp: Path, group: Any, asynchronous: bool
) -> Future | None:
    """Write model, optimizer and this rank's RNG into ``tmp``; with ``asynchronous`` the tensors are staged
    (copied) now and written in a thread (the returned future)."""
    entries = owned_copies({**model_entries(model), **optimizer_entries(model, optimizer), **rng_entries(rank)})
    writer = FileSystemWriter(str(tmp))
    with quiet_dcp():
        if asynchronous:
            return dcp.async_save(entries, storage_writer=writer, process_group=group, no_dist=group is None)
        dcp.save(entries, storage_writer=writer, process_group=group, no_dist=group is None)
    return None


def schedule_meta(optimizer: Optimizers, scheduler: Any) -> dict[str, Any]:
    """The JSON part of the optimizer: its param groups' hyperparameters and the LR schedule's position. Under
    PP (an optimizer and a scheduler per stage, all on one schedule) the first scheduler's position and each
    group role once (the first stage's)."""
    groups: list[dict[str, Any]] = []
    for g in (g for o in as_optimizers(optimizer) for g in o.param_groups):
        role = _group_role(g)
        if role is None or role not in [_group_role(h) for h in groups]:
            groups.append({k: v for k, v in g.items() if k != "params"})
    first = scheduler if not isinstance(scheduler, list | tuple) else scheduler[0]
    sched = {k: v for k, v in first.state_dict().items() if k != "lr_lambdas"}
    return {"scheduler": sched, "param_groups": groups}


def _group_role(group: dict[str, Any]) -> Any:
    """What a param group holds, whatever the layout: its name less FSDP's ``_fsdp`` split (``None``: unnamed)."""
    name = group.get("name")
    return name.removesuffix(FSDP_GROUP_SUFFIX) if isinstance(name, str) else None


def saved_groups_of(path: Path, meta: dict[str, Any], optimizer: Optimizers) -> list[int]:
    """For each of this optimizer's param groups, the index of the saved group whose schedule it continues: the
    one of the same role (FSDP splits each group into its plain and DTensor halves, so a run with FSDP and one
    without have different groups), or, when no saved group is named, the one at the same position."""
    saved = meta["param_groups"]
    roles = [_group_role(g) if isinstance(g, dict) else None for g in saved]
    out = []
    for opt in as_optimizers(optimizer):
        out += _saved_groups(path, saved, roles, opt)
    return out


def _saved_groups(path: Path, saved: list[Any], roles: list[Any], optimizer: torch.optim.Optimizer) -> list[int]:
    out = []
    for j, group in enumerate(optimizer.param_groups):
        role = _group_role(group)
        if role is not None and role in roles:
            out.append(roles.index(role))
        elif not any(roles) and len(saved) == len(optimizer.param_groups):
            out.append(j)
        else:
            raise CheckpointError(f"{path / META_FILE}: no optimizer param group {group.get('name', j)!r} was saved")
    return out


def load_schedule(path: Path, optimizer: Optimizers, scheduler: Any, meta: dict[str, Any]) -> None:
    """The LR schedule's position (the optimizer steps taken); each param group's learning rate is this run's
    config's schedule at that position (:func:`~moetrain.train.optim.restart_schedule`), so a resumed
    ``optim.lr``, warmup, ``min_lr_ratio`` or ``trainer.max_steps`` is in force from the first resumed step.
    The saved groups must still map onto this optimizer's (:func:`saved_groups_of`). Under PP ``optimizer``
    and ``scheduler`` are sequences, one pair per stage, all restarted at the same position."""
    saved_groups_of(path, meta, optimizer)
    last_epoch = meta["scheduler"].get("last_epoch")
    if not isinstance(last_epoch, int) or isinstance(last_epoch, bool) or last_epoch < 0:
        raise CheckpointError(f"{path / META_FILE}: scheduler.last_epoch={last_epoch!r} is not a step count")
    schedulers = list(scheduler) if isinstance(scheduler, list | tuple) else [scheduler]
    for opt, sched in zip(as_optimizers(optimizer), schedulers, strict=True):
        restart_schedule(opt, sched, last_epoch)


def load_state(
    path: Path,
    meta: dict[str, Any],
    model: Modules,
    optimizer: Optimizers,
    scheduler: Any,
    rank: int,
    seed: int,
    group: Any,
) -> None:
    """Read into fresh tensors (every check first), then copy into model, optimizer, schedule and RNG."""
    distributed = group is not None
    model_t = model_entries(model)
    if meta.get("kind") == "weights":  # an imported model (moetrain-export --from-hf): weights only
        copy_into(model_t, read_entries(path, model_t, (), group, distributed))
        return
    optim_t = optimizer_entries(model, optimizer)
    rng_keys = tuple(rng_entries(rank))
    buffers = read_entries(path, {**model_t, **optim_t}, rng_keys, group, distributed)
    copy_into(model_t, buffers)
    set_optimizer_state(model, optimizer, buffers)
    load_schedule(path, optimizer, scheduler, meta)
    if all(k in buffers for k in rng_keys if not k.endswith(".cuda")):
        set_rng(buffers, rank)
    else:  # a rank the saving job did not have
        reseed_rank(seed, int(meta["step"]), rank)


def publish_weights(model: nn.Module, cfg: TrainConfig, ckpt_dir: Path, extra: dict[str, Any]) -> Path:
    """A weights-only checkpoint ``ckpt_dir/step_000000`` (an import: the model, no optimizer), written,
    hashed and published by the same rename as a training checkpoint."""
    final = ckpt_dir / checkpoint_name(0)
    tmp = ckpt_dir / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_dcp():
        dcp.save(owned_copies(model_entries(model)), storage_writer=FileSystemWriter(str(tmp)), no_dist=True)
    meta = {
        "format": FORMAT_VERSION,
        "kind": "weights",
        "step": 0,
        "ep": 1,
        "world_size": 1,
        "arch": arch_of(cfg, model),
        "config": to_dict(cfg),
        **extra,
        "files": hash_share(tmp),
    }
    if final.exists():
        shutil.rmtree(final)
    write_meta_and_publish(tmp, final, meta)
    return final
