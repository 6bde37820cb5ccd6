"""Meta-device initialisation: build the model without its weights, then materialise only this EP rank's
experts (and every replicated parameter), bitwise equal to :func:`~moetrain.model.transformer.build_model`'s
single-process initialisation for the same seed.

How the values stay equal without building every expert:

1. Construction runs under :class:`_MetaConstruction`: each uninitialised ``torch.empty`` (every parameter's
   storage) is allocated on the meta device, everything computed (norm weights, rope tables, hash tables,
   biases) stays real, and each random op the constructors run on a meta tensor (``nn.Linear``'s kaiming
   draw, ``nn.Embedding``'s normal) is replayed on a scratch CPU tensor of the same shape, so the global
   generator advances exactly as it does today.
2. Parameters are then drawn in :meth:`~moetrain.model.transformer.Transformer.init_weights`' order with its
   rule (:meth:`~moetrain.model.transformer.Transformer.init_std_of`). A routed-expert tensor ``[N, ...]`` is
   drawn expert by expert in global order, each into its local slot or, for another rank's expert, into a
   one-expert scratch buffer: CPU ``normal_`` fills element by element and transforms in blocks of 16, so
   when an expert's numel is a multiple of 16 the per-expert draws are the whole tensor's draw, bit for bit.
   Otherwise (tiny experts) that one tensor is drawn whole and sliced.

Peak memory beyond this rank's parameters: one expert (or one non-chunkable expert tensor), and the largest
parameter a constructor draws (the embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from moetrain.config import ModelConfig, MoEConfig, resolve_num_groups
from moetrain.model.transformer import Transformer
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.all_to_all import local_expert_slice

_META = torch.device("meta")
_SHAPE_OPS = {torch.ops.aten.detach.default, torch.ops.aten.alias.default}
"""Ops allowed on a meta tensor during construction besides random ones (``nn.Parameter`` wraps by these)."""
_NORMAL_BLOCK = 16
"""CPU ``normal_`` transforms uniform draws in blocks of this many elements."""


@dataclass
class InitStats:
    """What the build materialised: this rank's parameter elements and the largest scratch buffer drawn into."""

    param_numel: int = 0
    expert_numel: int = 0
    peak_scratch_numel: int = 0

    def scratch(self, numel: int) -> None:
        self.peak_scratch_numel = max(self.peak_scratch_numel, numel)


class _MetaConstruction(TorchDispatchMode):
    """Uninitialised CPU allocations go to the meta device; random ops on meta tensors are replayed on CPU."""

    def __init__(self, stats: InitStats) -> None:
        super().__init__()
        self.stats = stats

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func is torch.ops.aten.empty.memory_format and (device is None or torch.device(device).type == "cpu"):
            return func(*args, **{**kwargs, "device": _META})
        metas = [a for a in _tensors(args, kwargs) if a.device == _META]
        if not metas or func in _SHAPE_OPS:
            return func(*args, **kwargs)
        if torch.Tag.nondeterministic_seeded not in func.tags:
            raise RuntimeError(f"meta init: {func} reads an uninitialised parameter during construction")
        scratch = tree_map(lambda a: _cpu_like(a, self.stats) if _is_meta(a) else a, (args, kwargs))
        func(*scratch[0], **scratch[1])  # the draw today's CPU build makes; its values are redrawn later
        return args[0] if func._schema.is_mutable else func(*args, **kwargs)


def _tensors(args: Any, kwargs: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    tree_map(lambda a: out.append(a) if isinstance(a, torch.Tensor) else None, (args, kwargs))
    return out


def _is_meta(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.device == _META


def _cpu_like(a: torch.Tensor, stats: InitStats) -> torch.Tensor:
    stats.scratch(a.numel())
    return torch.empty(a.shape, dtype=a.dtype, device="cpu")


def build_local_model(
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    vocab_size: int,
    max_seq_len: int,
    ep: int = 1,
    ep_rank: int = 0,
    seed: int | None = None,
    stats: InitStats | None = None,
    num_groups: int | None = None,
    doc_eos: int | None = None,
) -> Transformer:
    """:func:`~moetrain.model.transformer.build_model`'s model for EP rank ``ep_rank`` of ``ep``, holding only
    experts ``[ep_rank * N / ep, (ep_rank + 1) * N / ep)`` of each MoE layer (``expert_offset`` set, as
    :func:`~moetrain.parallel.expert_parallel.shard_experts` leaves them), every value bitwise equal to the
    full model's for the same ``seed``. ``stats``: filled with what was materialised. ``num_groups``: as
    :func:`~moetrain.model.transformer.build_model`'s (default: resolved for ``ep``). With ``ep > 1`` the
    layers keep the one-process dispatcher until :func:`~moetrain.parallel.expert_parallel.apply_expert_parallel`
    installs the all-to-all one (it keeps these experts as they are)."""
    stats = stats if stats is not None else InitStats()
    if num_groups is None:
        num_groups = resolve_num_groups(moe_cfg, ep)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad(), _MetaConstruction(stats):
            model = Transformer(model_cfg, moe_cfg, vocab_size, max_seq_len, num_groups, doc_eos, skip_init=True)
        _materialise(model, ep, ep_rank, stats)
        _draw_parameters(model, stats)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device == _META]
    if left:
        raise RuntimeError(f"meta init: {left} were never materialised")
    return model


def _materialise(
    model: Transformer, ep: int, ep_rank: int, stats: InitStats, modules: list[nn.Module] | None = None
) -> None:
    """Give each meta parameter of ``modules`` (default: all) CPU storage (routed experts: the local slice only);
    the draws come later. A pipeline stage passes only its modules (:mod:`moetrain.parallel.pipeline_stage`)."""
    for m in model.modules() if modules is None else modules:
        if isinstance(m, GroupedExperts):
            lo, e = local_expert_slice(m.num_global_experts, ep, ep_rank)
            m.w13 = nn.Parameter(torch.empty(e, *m.w13.shape[1:], dtype=m.w13.dtype))
            m.w2 = nn.Parameter(torch.empty(e, *m.w2.shape[1:], dtype=m.w2.dtype))
            m.num_experts, m.expert_offset = e, lo
            continue
        for name, p in m.named_parameters(recurse=False):
            if p.device == _META:
                setattr(m, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad))
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    stats.param_numel = sum(p.numel() for p in model.parameters() if p.device != _META)


@torch.no_grad()
def _draw_parameters(model: Transformer, stats: InitStats) -> None:
    """:meth:`~moetrain.model.transformer.Transformer.init_weights`, with each routed-expert tensor drawn
    expert by expert in global order (module docstring)."""
    experts = expert_modules(model)
    for name, p in model.named_parameters():
        _draw_one(p, model.init_std_of(name, p), experts, stats)
    model.zero_init()


def expert_modules(model: nn.Module) -> dict[int, GroupedExperts]:
    """The :class:`GroupedExperts` holding each routed-expert tensor, by the tensor's ``id``."""
    return {id(p): m for m in model.modules() if isinstance(m, GroupedExperts) for p in (m.w13, m.w2)}


def _draw_one(p: torch.Tensor, std: float | None, experts: dict[int, GroupedExperts], stats: InitStats) -> None:
    """One parameter's draw of :meth:`~moetrain.model.transformer.Transformer.init_weights` (``std`` from
    ``init_std_of``; ``None``: filled with 1): routed experts expert by expert (:func:`_draw_experts`)."""
    if std is None:
        p.fill_(1.0)
    elif id(p) in experts:
        _draw_experts(p, experts[id(p)], std, stats)
        stats.expert_numel += p.numel()
    else:
        p.normal_(0.0, std)


def _draw_experts(p: torch.Tensor, m: GroupedExperts, std: float, stats: InitStats) -> None:
    """Draw the local experts of a ``[N / ep, ...]`` tensor exactly as the ``[N, ...]`` tensor's draw."""
    n, lo, e = p[0].numel(), m.expert_offset, m.num_experts
    if n % _NORMAL_BLOCK:  # blocks straddle experts: draw the whole tensor, keep the slice
        stats.scratch(m.num_global_experts * n)
        p.copy_(torch.empty(m.num_global_experts, *p.shape[1:], dtype=p.dtype).normal_(0.0, std)[lo : lo + e])
        return
    stats.scratch(n)
    scratch = torch.empty(p.shape[1:], dtype=p.dtype)
    for g in range(m.num_global_experts):
        (p[g - lo] if lo <= g < lo + e else scratch).normal_(0.0, std)
