"""What a native checkpoint holds, as flat ``name -> tensor`` entries (DCP deduplicates replicated ones).

* ``model.<name>``: the model's ``state_dict()`` (loss-free biases included),
  except that the stacked routed experts ``...experts.w13`` ``[E, D, 2F]`` and
  ``...experts.w2`` ``[E, F, D]`` are split into one entry per expert under its
  *global* index (``model.<prefix>.w13.<g>``). The rank holding experts
  ``[expert_offset, expert_offset + E)`` writes exactly those, so the checkpoint
  is the same whatever the expert-parallel size and any EP size can load it.
* ``optim.<param>.<state>``: AdamW's ``step``, ``exp_avg``, ``exp_avg_sq`` of
  every parameter, re-indexed per global expert the same way.
* ``rng.rank<r>.*``: every rank's torch CPU (and CUDA) generator, Python
  ``random`` and NumPy global states.

Under pipeline parallelism a rank holds one or more stage modules
(:class:`~moetrain.parallel.pipeline_stage.StageModule`, which keep the one-process parameter names) and an
optimizer per stage or one for all: every function here takes a module or a sequence of them (and an optimizer
or a sequence), and the entries are the union over the stages, the same global names as one process's, so a
checkpoint saved at one pipeline size loads at any other.

Under FSDP the same entries hold DTensors' shards (:mod:`moetrain.train.checkpoint.sharded`): a non-expert
entry is the DTensor (each rank writes its shard), and a stacked expert tensor sharded over its EDP ranks gives
each rank the per-expert entries of the rows it holds. A checkpoint saved with FSDP therefore loads without it,
and the other way round, on any world and EP size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import nn

from moetrain.parallel.data_parallel import reshard
from moetrain.train.checkpoint.sharded import copy_local, local_rows, owned, restored

Modules: TypeAlias = nn.Module | Sequence[nn.Module]
"""A rank's model: one module, or its pipeline stages' modules (one-process parameter names, disjoint)."""
Optimizers: TypeAlias = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]
"""A rank's optimizer, or one per pipeline stage."""


def as_modules(model: Modules) -> list[nn.Module]:
    """``model`` as a list of modules (a single module, even an ``nn.ModuleList``, is one)."""
    return [model] if isinstance(model, nn.Module) else list(model)


def as_optimizers(optimizer: Optimizers) -> list[torch.optim.Optimizer]:
    """``optimizer`` as a list of optimizers."""
    return [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)


def _reshard(model: Modules) -> None:
    for m in as_modules(model):
        reshard(m)


@dataclass
class ExpertLayout:
    """Which global experts a stacked expert module holds on this rank: ``num_local`` experts from global index
    ``offset`` (its EP shard; under FSDP over EDP this rank holds some of their rows, see ``local_rows``)."""

    offset: int
    num_local: int
    num_global: int


def expert_modules(model: Modules) -> dict[str, ExpertLayout]:
    """Module prefix -> layout of every routed-expert module (stacked ``w13`` / ``w2`` on dim 0).

    Under expert parallelism ``apply_expert_parallel`` keeps only the local experts
    and sets ``expert_offset`` (global index of local expert 0) and
    ``num_global_experts``; unsharded modules default to offset 0 and all experts.
    """
    from moetrain.moe.experts import GroupedExperts

    out = {}
    for name, mod in (item for m in as_modules(model) for item in m.named_modules()):
        if isinstance(mod, GroupedExperts):
            local = mod.w13.shape[0]  # a DTensor's shape is the whole EP-local stack's
            out[name] = ExpertLayout(
                int(getattr(mod, "expert_offset", 0)), local, int(getattr(mod, "num_global_experts", local))
            )
    return out


def _expert_param_names(layouts: dict[str, ExpertLayout]) -> dict[str, ExpertLayout]:
    return {f"{prefix}.{w}": lay for prefix, lay in layouts.items() for w in ("w13", "w2")}


def _split_experts(out: dict[str, torch.Tensor], prefix: str, suffix: str, lay: ExpertLayout, t: torch.Tensor) -> None:
    """``out[f"{prefix}.{g}{suffix}"]``: a view of the row of each global expert ``g`` this rank holds in the
    stacked tensor ``t`` (every row of a plain one, this rank's rows of one sharded over EDP)."""
    first, rows = local_rows(t)
    for i in range(rows.shape[0]):
        out[f"{prefix}.{lay.offset + first + i}{suffix}"] = rows[i]


def model_entries(model: Modules) -> dict[str, torch.Tensor]:
    """The model state as checkpoint entries: experts split per global index (views, no copies); under FSDP the
    sharded parameters (DTensors) and the expert rows this rank holds; under PP the union over the stages."""
    _reshard(model)
    experts = _expert_param_names(expert_modules(model))
    out: dict[str, torch.Tensor] = {}
    for name, t in (item for m in as_modules(model) for item in m.state_dict().items()):
        lay = experts.get(name)
        if lay is None:
            out[f"model.{name}"] = t
        else:
            _split_experts(out, f"model.{name}", "", lay, t)
    return out


def _fresh_adamw_state(p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What ``torch.optim.AdamW`` creates on a parameter's first step (step 0, zero moments).

    Saving this for a parameter that has no state yet is exact: AdamW's first
    update of such a state equals its update of an absent one. The moments of a
    DTensor parameter are DTensors of its layout (``zeros_like``), as AdamW makes
    them; ``step`` is a plain scalar either way.
    """
    state = {
        "step": torch.zeros((), dtype=torch.float32),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }
    if group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _named_params(model: Modules) -> dict[int, tuple[str, nn.Parameter]]:
    out: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in (item for m in as_modules(model) for item in m.named_parameters()):
        out.setdefault(id(p), (name, p))
    return out


def optimizer_entries(model: Modules, optimizer: Optimizers, materialize: bool = True) -> dict[str, torch.Tensor]:
    """Optimizer state per parameter name, expert tensors split per global expert.

    ``materialize`` fills parameters without state with AdamW's initial state
    (so every rank and every EP size sees the same set of keys). An expert's
    moments come from the rows this rank holds; its scalar ``step`` is written
    for every expert of the EP-local stack (by each rank of the EDP group: DCP
    keeps one), so a rank holding no row still finds it.
    """
    _reshard(model)  # the optimizer's state is keyed by the sharded parameters
    experts = _expert_param_names(expert_modules(model))
    names = _named_params(model)
    out: dict[str, torch.Tensor] = {}
    for opt, group in ((o, g) for o in as_optimizers(optimizer) for g in o.param_groups):
        for p in group["params"]:
            name = names[id(p)][0]
            state = opt.state.get(p) or (_fresh_adamw_state(p, group) if materialize else {})
            lay = experts.get(name)
            for key, val in state.items():
                if not torch.is_tensor(val):
                    continue
                if lay is None:
                    out[f"optim.{name}.{key}"] = val
                elif val.dim() == 0:
                    for e in range(lay.num_local):
                        out[f"optim.{name}.{lay.offset + e}.{key}"] = val
                else:
                    _split_experts(out, f"optim.{name}", f".{key}", lay, val)
    return out


def rng_entries(rank: int) -> dict[str, torch.Tensor]:
    """This rank's generator states as tensors (no pickled objects)."""
    p = f"rng.rank{rank}"
    version, internal, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        f"{p}.torch": torch.get_rng_state(),
        f"{p}.python": torch.tensor([version, *internal], dtype=torch.int64),
        f"{p}.python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        f"{p}.numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        f"{p}.numpy_extra": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"{p}.cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng(entries: dict[str, torch.Tensor], rank: int) -> None:
    p = f"rng.rank{rank}"
    torch.set_rng_state(entries[f"{p}.torch"])
    py = entries[f"{p}.python"].tolist()
    has_gauss, gauss = entries[f"{p}.python_gauss"].tolist()
    random.setstate((int(py[0]), tuple(int(v) for v in py[1:]), gauss if has_gauss else None))
    pos, np_has_gauss, np_gauss = entries[f"{p}.numpy_extra"].tolist()
    np.random.set_state(
        ("MT19937", entries[f"{p}.numpy"].numpy().astype(np.uint32), int(pos), int(np_has_gauss), np_gauss)
    )
    if f"{p}.cuda" in entries and torch.cuda.is_available():
        torch.cuda.set_rng_state(entries[f"{p}.cuda"])


def owned_copies(entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert slices copied (DCP would write a view's whole storage)."""
    return {k: owned(v) for k, v in entries.items()}


def copy_into(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor]) -> None:
    """Copy each read entry into the live tensor of the same name (a DTensor's shard into its shard)."""
    for key, t in targets.items():
        copy_local(t, sources[key])


@torch.no_grad()
def set_optimizer_state(model: Modules, optimizer: Optimizers, buffers: dict[str, torch.Tensor]) -> None:
    """The AdamW state of every parameter from :func:`optimizer_entries`-named buffers (experts re-stacked from
    the rows this rank holds; DTensor moments for DTensor parameters)."""
    _reshard(model)
    experts = _expert_param_names(expert_modules(model))
    names = _named_params(model)
    for opt, group in ((o, g) for o in as_optimizers(optimizer) for g in o.param_groups):
        for p in group["params"]:
            name = names[id(p)][0]
            lay = experts.get(name)
            state: dict[str, torch.Tensor] = {}
            for key, fresh in _fresh_adamw_state(p, group).items():
                if lay is None:
                    src = buffers[f"optim.{name}.{key}"]
                elif fresh.dim() == 0:
                    src = buffers[f"optim.{name}.{lay.offset}.{key}"]
                else:
                    first, rows = local_rows(fresh)
                    parts = [buffers[f"optim.{name}.{lay.offset + first + i}.{key}"] for i in range(rows.shape[0])]
                    src = torch.stack(parts) if parts else rows
                state[key] = restored(fresh, src)
            opt.state[p] = state


def reseed_rank(seed: int, step: int, rank: int) -> None:
    """A rank the saving job did not have: a fresh stream, still a function of (seed, step, rank)."""
    value = seed * 1_000_003 + step * 7919 + rank
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)
