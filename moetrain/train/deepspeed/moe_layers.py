"""moetrain's sharded experts, shown to DeepSpeed as the experts of its own MoE layers.

DeepSpeed decides that a model has MoE layers (``engine.has_moe_layers``, which
switches its ZeRO optimizer, gradient reduction and checkpointing to the expert
path) only by finding ``deepspeed.moe.layer.MoE`` instances in the module tree
(``DeepSpeedEngine._configure_distributed_model``). An expert parameter is one
with ``allreduce = False`` and a ``group_name`` naming its expert-data-parallel
group (``deepspeed.moe.utils.is_moe_param``), the convention of DeepSpeed's
``moe.experts.Experts``.

:func:`adopt_experts` turns each :class:`~moetrain.moe.experts.GroupedExperts` of
a model (already sharded by :func:`~moetrain.parallel.apply_expert_parallel`)
into a :class:`DeepSpeedGroupedExperts`: the same object, weights and forward
(moetrain's dispatcher and grouped GEMM still do the work), which DeepSpeed
also sees as one of its ``MoE`` layers with ``num_local_experts`` experts in
group ``ep_size_{ep}``. Its state dict holds one entry per local expert in
DeepSpeed's naming (``deepspeed_moe.experts.deepspeed_experts.{i}.w13``), so
``engine.save_checkpoint`` writes DeepSpeed's per-expert files
(``layer_{L}_expert_{global e}_mp_rank_00_model_states.pt``) and
``engine.load_checkpoint`` reads them back by global expert index.

The class is swapped on the existing object (as ``torch.nn.utils.parametrize``
does), because ``MoE.__init__`` would build DeepSpeed's own gate and experts.
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from moetrain.moe.experts import GroupedExperts

DS_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts"
"""Where DeepSpeed's checkpoint code looks for the index of an expert (``engine._save_moe_checkpoint``)."""


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert-parallel / expert-data-parallel group pair of size ``ep_size``."""
    return f"ep_size_{ep_size}"


class DeepSpeedGroupedExperts(GroupedExperts, MoE):
    """A :class:`GroupedExperts` that DeepSpeed's engine treats as one of its ``MoE`` layers.

    Made only by :meth:`adopt`. DeepSpeed reads ``num_local_experts``,
    ``expert_group_name`` and ``ep_size``; ``num_experts`` keeps moetrain's
    meaning (experts held here), which DeepSpeed only records in checkpoint
    metadata. The forward is :meth:`GroupedExperts.forward` (first in the MRO).
    """

    ep_size: int
    expert_group_name: str
    num_local_experts: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - guard
        raise TypeError("use DeepSpeedGroupedExperts.adopt(experts, ep_size)")

    @classmethod
    def adopt(cls, experts: GroupedExperts, ep_size: int) -> DeepSpeedGroupedExperts:
        """Turn ``experts`` (in place) into a DeepSpeed MoE layer and mark its parameters as expert parameters."""
        if not isinstance(experts, GroupedExperts):
            raise TypeError(f"expected GroupedExperts, got {type(experts).__name__}")
        if experts.num_global_experts != experts.num_experts * ep_size:
            raise ValueError(
                f"experts hold {experts.num_experts} of {experts.num_global_experts}; "
                f"shard them over ep={ep_size} ranks first (apply_expert_parallel)"
            )
        experts.__class__ = cls
        ds = experts
        assert isinstance(ds, DeepSpeedGroupedExperts)
        ds.ep_size = ep_size
        ds.expert_group_name = expert_group_name(ep_size)
        ds.num_local_experts = experts.num_experts
        for p in ds.parameters():
            p.allreduce = False  # type: ignore[attr-defined]
            p.group_name = ds.expert_group_name  # type: ignore[attr-defined]
        return ds

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: create DeepSpeed's EP / EDP groups of this size (contiguous EP blocks,
        strided EDP, the same layout as :mod:`moetrain.parallel.context`)."""
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
            )

    # -------------------------------------------------- DeepSpeed's per-expert naming
    def _expert_key(self, prefix: str, index: int, name: str) -> str:
        return f"{prefix}{DS_EXPERT_PREFIX}.{index}.{name}"

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name, param in self._parameters.items():
            if param is None:
                continue
            for i in range(param.shape[0]):
                destination[self._expert_key(prefix, i, name)] = param[i] if keep_vars else param[i].detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        expected: set[str] = set()
        for name, param in self._parameters.items():
            if param is None:
                continue
            keys = [self._expert_key(prefix, i, name) for i in range(param.shape[0])]
            expected.update(keys)
            absent = [k for k in keys if k not in state_dict]
            if absent:
                missing_keys.extend(absent)
                continue
            parts = [torch.as_tensor(state_dict[k]) for k in keys]
            bad = [k for k, t in zip(keys, parts) if t.shape != param.shape[1:]]
            if bad:
                error_msgs.append(
                    f"{bad[0]}: shape {tuple(state_dict[bad[0]].shape)}, expected {tuple(param.shape[1:])}"
                )
                continue
            with torch.no_grad():
                param.copy_(torch.stack(parts).to(param.dtype))
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)


def adopt_experts(model: nn.Module, ep_size: int) -> list[DeepSpeedGroupedExperts]:
    """Make every :class:`GroupedExperts` of ``model`` a :class:`DeepSpeedGroupedExperts` (module order)."""
    found = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    return [DeepSpeedGroupedExperts.adopt(m, ep_size) for m in found]


def split_moe_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DeepSpeed's convention: named groups, expert parameters moved to their own ``moe: True`` groups
    (one per expert-data-parallel group, same hyper-parameters), which ZeRO partitions and
    reduces over the expert-data-parallel group instead of all ranks."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{"name": g.get("name", f"group_{i}"), **g} for i, g in enumerate(param_groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]
