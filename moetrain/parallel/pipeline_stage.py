"""One pipeline stage's module, built on the meta device with only its layers materialised, and the autograd
function that keeps every stage's MoE balance losses in the gradient.

Meta build (:func:`build_stage_modules`): the whole model is constructed under
:class:`~moetrain.parallel.meta_init._MetaConstruction` (no parameter storage, the constructors' random draws
replayed so the generator advances as in the one-process build); only the modules of this rank's stages get
storage; then every parameter is drawn in :meth:`~moetrain.model.transformer.Transformer.init_weights`' order,
the stage's into their storage (routed experts of this EP rank only, as :mod:`moetrain.parallel.meta_init`)
and every other one into a scratch buffer of at most ``skip_chunk`` elements: CPU ``normal_`` fills uniforms
element by element and transforms them in blocks of 16, recomputing the last 16 when the size is not a multiple
of 16, so drawing a tensor in chunks whose sizes are multiples of 16 (the last one at least 16) consumes and
yields exactly the whole tensor's draw. So each stage's values are bitwise the one-process model's for the same
seed, and no rank ever holds the whole model; each rank does pay the time of drawing every parameter.

Aux losses (:class:`MoEAuxLossAutoScaler`): under PP the loss is computed on the last stage only, so a stage's
balance losses (which the one-process run adds to the LM loss) would get no gradient. As Megatron-Core's
``MoEAuxLossAutoScaler`` (megatron/core/transformer/moe/moe_utils.py), the stage's summed aux loss is attached
to its output: forward returns the output unchanged, backward returns the output's gradient and ``scale`` times
ones for the aux loss (no copy of the output). The schedule divides all gradients by the micro-batch count (``scale_grads``), as the
one-process ``backward(loss_lm + aux, num_micro)`` divides both terms, so ``scale`` is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage

from moetrain.config import ModelConfig, MoEConfig, resolve_num_groups
from moetrain.config.pipeline_layout import StageSpec, check_pipeline_model
from moetrain.model.layers import document_ids, document_layout
from moetrain.model.transformer import Transformer
from moetrain.moe.layer import MoEStats
from moetrain.parallel.meta_init import InitStats, _draw_one, _materialise, _MetaConstruction, expert_modules

_META = torch.device("meta")
SKIP_CHUNK = 1 << 20
"""Elements of the scratch buffer a parameter of another stage is drawn into (a multiple of 16)."""


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Identity on ``output`` whose backward also sends ``scale`` (times ones) into ``aux_loss``."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        # The same storage, but not autograd's view of the input (which returning ``output`` itself would be):
        # the zero-bubble schedules free a stage's output graph with ``detach_()``, which a view refuses.
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss) * ctx.scale, None


class StageModule(nn.Module):
    """Blocks ``spec.blocks`` of the model (with the embedding on the first stage, the final norm and LM head on
        the last), under the one-process model's parameter names (``blocks.<i>.…``, ``embed.weight``, …) so
        checkpoints keep their global names.

        ``forward(h, tokens_BS=...)``: ``h`` is the token ids on the first stage, the previous stage's activations
        otherwise; ``tokens_BS`` (every stage gets it, for hash routing and document masks). Returns the activations,
        or the logits on the last stage, with this stage's aux loss attached (:class:`MoEAuxLossAutoScaler`) unless
        ``attach_aux`` is false. ``aux_losses``: the detached aux loss of each forward, for logging; ``moe_stats``: each
    forward's statistics of this stage's MoE layers (by global index), for the step's metrics (the train module
    empties both).
    """

    def __init__(self, model: Transformer, spec: StageSpec) -> None:
        super().__init__()
        self.spec = spec
        self.doc_eos = model.doc_eos
        self.embed = model.embed if spec.embedding else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in spec.blocks})
        self.norm = model.norm if spec.head else None
        self.lm_head = model.lm_head if spec.head else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.aux_scale = 1.0
        self.attach_aux = True
        self.aux_losses: list[torch.Tensor] = []
        self.moe_stats: list[dict[int, MoEStats]] = []

    def moe_layers(self) -> dict[int, nn.Module]:
        """This stage's MoE layers by global block index (what
        :func:`~moetrain.parallel.expert_parallel.apply_expert_parallel` shards and names them by)."""
        return {int(i): b.ffn for i, b in self.blocks.items() if b.is_moe}

    def forward(self, h: torch.Tensor, *, tokens_BS: torch.Tensor) -> torch.Tensor:
        x = self.embed(h) if self.embed is not None else h
        S = tokens_BS.shape[1]
        cos, sin, mask = self.rope_cos, self.rope_sin, None
        if self.doc_eos is not None:
            cos, sin, mask = document_layout(document_ids(tokens_BS, self.doc_eos), cos[:S], sin[:S])
        aux: torch.Tensor | None = None
        moe_stats: dict[int, MoEStats] = {}
        for i, block in self.blocks.items():
            x, stats = block(x, cos=cos, sin=sin, token_ids_BS=tokens_BS, mask=mask)
            if stats is not None:
                aux = stats.aux_loss if aux is None else aux + stats.aux_loss
                moe_stats[int(i)] = stats
        self.moe_stats.append(moe_stats)
        if self.lm_head is not None and self.norm is not None:
            x = self.lm_head(self.norm(x))
        if aux is not None:
            self.aux_losses.append(aux.detach())
            if self.attach_aux:
                x = MoEAuxLossAutoScaler.apply(x, aux, self.aux_scale)
        return x


def pipeline_stage(
    module: StageModule,
    n_stages: int,
    *,
    microbatch: int,
    seq_len: int,
    dim: int,
    vocab_size: int,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> PipelineStage:
    """torch's ``PipelineStage`` for ``module``, its input and output shapes given (token ids ``[b, S]`` in on
    the first stage, activations ``[b, S, D]`` otherwise; logits ``[b, S, V]`` out of the last), so no shape
    inference pass runs. The example tensors require grad: a stage builds its receive buffers like them, and a
    buffer that does not require grad would send no gradient back to the previous stage."""
    b = microbatch
    if module.spec.embedding:
        x = torch.zeros(b, seq_len, dtype=torch.long, device=device)
    else:
        x = torch.zeros(b, seq_len, dim, device=device, requires_grad=True)
    out = torch.zeros(b, seq_len, vocab_size if module.spec.head else dim, device=device, requires_grad=True)
    return PipelineStage(module, module.spec.index, n_stages, device, input_args=(x,), output_args=(out,), group=group)


def build_stage_modules(*args: Any, **kw: Any) -> list[StageModule]:
    """The :class:`StageModule` of each of this rank's stages: :func:`build_rank_stages`' arguments (``specs``
    of ``n_stages`` in all), every value bitwise :func:`~moetrain.model.transformer.build_model`'s for the same
    ``seed`` (module docstring); with ``ep > 1`` only EP rank ``ep_rank``'s experts, as
    :func:`~moetrain.parallel.meta_init.build_local_model`."""
    return build_rank_stages(*args, **kw)[1]


def build_rank_stages(
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    vocab_size: int,
    max_seq_len: int,
    specs: Sequence[StageSpec],
    n_stages: int,
    *,
    ep: int = 1,
    ep_rank: int = 0,
    seed: int | None = None,
    doc_eos: int | None = None,
    stats: InitStats | None = None,
    skip_chunk: int = SKIP_CHUNK,
) -> tuple[Transformer, list[StageModule]]:
    """:func:`build_stage_modules`' stages, and the whole model they were cut from: this rank's layers shared
    with the stages, every other parameter on the meta device (no storage), for what reads the whole model's
    shape (parameter counts, FLOPs per token, the MoE layers' indices and groups)."""
    check_pipeline_model(model_cfg, moe_cfg, n_stages)
    if skip_chunk % 16 or skip_chunk < 16:
        raise ValueError(f"skip_chunk={skip_chunk}: must be a positive multiple of 16")
    stats = stats if stats is not None else InitStats()
    num_groups = resolve_num_groups(moe_cfg, ep)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad(), _MetaConstruction(stats):
            model = Transformer(model_cfg, moe_cfg, vocab_size, max_seq_len, num_groups, doc_eos, skip_init=True)
        _materialise(model, ep, ep_rank, stats, modules=_stage_modules(model, specs))
        _draw_stage_parameters(model, stats, skip_chunk)
    return model, [StageModule(model, spec) for spec in specs]


def _stage_modules(model: Transformer, specs: Sequence[StageSpec]) -> list[nn.Module]:
    """Every submodule the stages ``specs`` hold."""
    roots: list[nn.Module] = []
    for spec in specs:
        roots += [model.blocks[i] for i in spec.blocks]
        roots += [model.embed] if spec.embedding else []
        roots += [model.norm, model.lm_head] if spec.head else []
    return [m for root in roots for m in root.modules()]


@torch.no_grad()
def _draw_stage_parameters(model: Transformer, stats: InitStats, skip_chunk: int) -> None:
    """:meth:`~moetrain.model.transformer.Transformer.init_weights`' draws in its order: into the materialised
    parameters, and into scratch (:func:`skip_normal`) for the others."""
    experts = expert_modules(model)
    for name, p in model.named_parameters():
        std = model.init_std_of(name, p)
        if p.device != _META:
            _draw_one(p, std, experts, stats)
        elif std is not None:
            skip_normal(p.numel(), p.dtype, std, skip_chunk)
            stats.scratch(min(p.numel(), skip_chunk + 15))
    model.zero_init()


def skip_normal(numel: int, dtype: torch.dtype, std: float, chunk: int = SKIP_CHUNK) -> None:
    """Advance the global generator exactly as ``torch.empty(numel, dtype=dtype).normal_(0, std)`` on CPU does,
    holding at most ``chunk + 15`` elements (module docstring: chunks of multiples of 16, the last >= 16)."""
    buf: torch.Tensor | None = None
    left = numel
    while left > 0:
        take = left if left < chunk + 16 else chunk
        if take == chunk:
            buf = buf if buf is not None else torch.empty(chunk, dtype=dtype)
            buf.normal_(0.0, std)
        else:
            torch.empty(take, dtype=dtype).normal_(0.0, std)
        left -= take


class RankModel(nn.Module):
    """The stages one pipeline rank holds as one module under the one-process model's parameter names
    (``embed.weight``, ``blocks.<i>.…``, ``norm.weight``, ``lm_head.weight``): what the optimizer steps, the
    gradient norm reads and a checkpoint saves (global names, independent of the split). It registers the
    stages' submodules, not the stages (their names are the same); it has no forward: the schedule runs the
    stages (:attr:`stages`, a plain list)."""

    def __init__(self, stages: Sequence[StageModule]) -> None:
        super().__init__()
        self.stages = list(stages)
        self.embed = next((s.embed for s in stages if s.embed is not None), None)
        self.blocks = nn.ModuleDict({i: b for s in stages for i, b in s.blocks.items()})
        self.norm = next((s.norm for s in stages if s.norm is not None), None)
        self.lm_head = next((s.lm_head for s in stages if s.lm_head is not None), None)

    def moe_layers(self) -> dict[int, nn.Module]:
        """This rank's MoE layers by global block index."""
        return {int(i): b.ffn for i, b in self.blocks.items() if b.is_moe}
