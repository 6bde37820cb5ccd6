"""The native engine under pipeline parallelism (``parallel.pp > 1``, docs/pipeline.md).

Each rank builds only its stages on the meta device (:func:`~moetrain.parallel.pipeline_stage.build_rank_stages`),
shards their experts over the stage's EP group, applies activation checkpointing and the native engine's data
parallelism (``replicate``, or ``fully_shard`` under ``parallel.fsdp``) to each stage over the ranks holding it
(:meth:`~moetrain.parallel.context.ParallelContext.stage_view`), and steps one optimizer over its stages'
parameters (:class:`~moetrain.parallel.pipeline_stage.RankModel`: the one-process model's parameter names).
A step's micro-batches are the pipeline's: torch's schedule (:func:`~moetrain.parallel.pipeline.build_schedule`)
runs them, each of the ``W / pp`` pipelines on its slice of the global batch; the gradient norm is summed over
every stage (:func:`~moetrain.parallel.clip.clip_grad_norm` with the pipeline group).

MoE statistics: every stage records its layers' statistics and its balance losses per micro-batch, the last
stage the LM loss; before the one reduction of the step each rank adds the keys of the layers it does not hold
as zeros counted zero times (:func:`~moetrain.train.metrics.pad_to_schema`; the names exchanged once), so rank
0 logs every layer and each rank's loss-free biases see their layers' global load. ``moe.balance.scope=global``:
a forward-only pass of every micro-batch through the stages first (:func:`~moetrain.parallel.pipeline.forward_only`),
each stage's counts summed over the ranks holding it, installed for the step as in one process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from moetrain.config import TrainConfig
from moetrain.config.pipeline_layout import stage_ids, stage_specs, stages_per_rank
from moetrain.model.apply import apply_activation_checkpointing, apply_balanced_hash, apply_slot_sum
from moetrain.moe.layer import MoEStats, global_routing_counts
from moetrain.moe.step_state import step_state
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.data_parallel import apply_data_parallel
from moetrain.parallel.expert_parallel import apply_expert_parallel
from moetrain.parallel.pipeline import bubble_fraction, build_schedule, check_schedule, forward_only
from moetrain.parallel.pipeline_stage import RankModel, StageModule, build_rank_stages, pipeline_stage
from moetrain.train.metrics import MetricRecorder, ReducedMetrics, Schema, metric_schema, pad_to_schema
from moetrain.train.moe_metrics import record_moe, record_val
from moetrain.train.native import NativeTrainModule
from moetrain.train.step import lm_loss


class PipelineTrainModule(NativeTrainModule):
    """:class:`~moetrain.train.native.NativeTrainModule` over this rank's pipeline stages (module docstring).
    ``model``: the rank's stages under global names (:class:`~moetrain.parallel.pipeline_stage.RankModel`;
    ``model.stages`` the stage modules), ``whole``: the whole model's shape, ``schedule``: torch's schedule."""

    def __init__(
        self, cfg: TrainConfig, vocab: int, train_tokens: Any, pc: ParallelContext, doc_eos: int | None = None
    ) -> None:
        p, t = cfg.parallel, cfg.trainer
        self.stage_pc = pc.stage_view()
        info = check_schedule(p.pp_schedule)
        n_per = stages_per_rank(p.pp_schedule, p.pp_virtual)
        self.n_stages = p.pp * n_per
        specs = stage_specs(cfg.model.n_layers, self.n_stages, p.pp_layers)
        placement = {s: r for r in range(p.pp) for s in stage_ids(r, p.pp, n_per, info.style)}
        mine = [specs[s] for s in stage_ids(pc.pp_rank, p.pp, n_per, info.style)]
        whole, stages = build_rank_stages(
            cfg.model,
            cfg.moe,
            vocab,
            cfg.data.seq_len,
            mine,
            self.n_stages,
            ep=pc.ep_size,
            ep_rank=pc.ep_rank,
            seed=t.seed,
            doc_eos=doc_eos,
        )
        apply_balanced_hash(whole, train_tokens)  # the stages share the whole model's layers
        for stage in stages:
            self._prepare_stage(stage, cfg, pc.device)
        self.stages = stages
        super().__init__(cfg, RankModel(stages), pc)  # type: ignore[arg-type]
        self.whole = whole
        self.holders = [dist.get_global_rank(pc.pp_group, placement[s]) for s in range(self.n_stages)]
        self.holds_last = specs[-1] in mine
        mbs = t.micro_batch_size or 1
        self.n_micro = t.global_batch_size // (mbs * pc.dp_size)
        pipe = [
            pipeline_stage(
                s,
                self.n_stages,
                microbatch=mbs,
                seq_len=cfg.data.seq_len,
                dim=cfg.model.dim,
                vocab_size=vocab,
                device=pc.device,
                group=pc.pp_group,
            )
            for s in stages
        ]
        self.schedule = build_schedule(p.pp_schedule, pipe, self.n_micro, lm_loss)
        self.schemas: dict[str, Schema] = {}
        bubble = bubble_fraction(p.pp_schedule, p.pp, self.n_micro, n_per)
        self.notes = [
            f"moetrain: pipeline of {p.pp} ranks x {n_per} stage{'s' if n_per > 1 else ''}, {p.pp_schedule}, "
            f"{self.n_micro} micro-batches per step, {pc.dp_size} pipeline{'s' if pc.dp_size > 1 else ''}: "
            f"bubble {bubble:.1%} of the step"
        ]

    def startup_notes(self) -> list[str]:
        """The pipeline's layout and the bubble its schedule implies (docs/pipeline.md's table)."""
        return self.notes

    def _prepare_stage(self, stage: StageModule, cfg: TrainConfig, device: torch.device) -> None:
        """Experts over the stage's EP group, the device, activation checkpointing (as
        :func:`~moetrain.train.trainer.build_parallel_model` does for the whole model)."""
        m = cfg.moe
        apply_expert_parallel(
            stage, self.stage_pc, m.max_recv_factor, m.recv_overflow, cfg.parallel.overlap_shared_experts
        )
        apply_slot_sum(stage.to(device), device)  # type: ignore[arg-type]
        if cfg.trainer.activation_checkpointing:
            apply_activation_checkpointing(stage)  # type: ignore[arg-type]

    @property
    def dp_pc(self) -> ParallelContext:
        return self.stage_pc

    def apply_data_parallel(self, shard: bool, param_dtype: torch.dtype | None) -> None:
        """Each stage its own FSDP2 units over the ranks holding it (torch's stage drives their reductions)."""
        for stage in self.stages:
            apply_data_parallel(stage, self.stage_pc, shard=shard, param_dtype=param_dtype)

    # ------------------------------------------------------------ one step
    def train_batch(self, micro: list[torch.Tensor], rec: MetricRecorder) -> None:
        """The step's micro-batches through the schedule (module docstring); records as
        :meth:`~moetrain.train.module.TrainModule.train_batch` does, this rank's stages' share of it."""
        if len(micro) != self.n_micro:
            raise ValueError(f"pipeline: {len(micro)} micro-batches, the schedule was built for {self.n_micro}")
        self.model.train()
        counts = self._routing_prepass(micro) if self.global_scope else None
        batch = torch.cat([mb.to(self.pc.device, non_blocking=True) for mb in micro])
        inputs, targets = batch[:, :-1], batch[:, 1:]
        first = [inputs] if self.stages[0].spec.embedding else []
        losses: list[torch.Tensor] = []
        with step_state(global_counts=counts), self.autocast():  # every forward and backward of the step
            self.schedule.step(*first, tokens_BS=inputs, target=targets if self.holds_last else None, losses=losses)
        for loss in losses:
            rec.record("train/loss", loss, "mean")
        for aux in self._aux_per_micro_batch():
            rec.record("train/aux_loss", aux, "mean")
        rec.counts["train/aux_loss"] = self.n_micro if self.holds_last else 0  # each micro-batch counted once
        for stats in self._take_stats():
            record_moe(rec, stats)

    def _aux_per_micro_batch(self) -> list[torch.Tensor]:
        """This rank's stages' balance losses of each micro-batch, summed (zeros for stages without MoE)."""
        total = [torch.zeros((), device=self.pc.device) for _ in range(self.n_micro)]
        for stage in self.stages:
            for i, aux in enumerate(stage.aux_losses):
                total[i] = total[i] + aux
            stage.aux_losses.clear()
        return total

    def _take_stats(self) -> list[dict[int, MoEStats]]:
        """Every forward's MoE statistics of this rank's stages since the last call, emptied."""
        out = [s for stage in self.stages for s in stage.moe_stats]
        for stage in self.stages:
            stage.moe_stats.clear()
            stage.aux_losses.clear()
        return out

    def _routing_prepass(self, micro: list[torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
        """The step's global-batch routing counts of this rank's layers: every micro-batch forward through the
        stages without gradients, under a forked RNG (the real pass draws the same noise), summed over the
        micro-batches and the ranks holding each stage."""
        rng_devices = [self.pc.device.index or 0] if self.pc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), self.autocast():
            for mb in micro:
                self._forward_only(mb.to(self.pc.device, non_blocking=True)[:, :-1])
        stats = self._take_stats()
        return global_routing_counts(lambda s: s, stats, self.stage_pc.all_reduce_sum)  # type: ignore[arg-type, return-value]

    def _forward_only(self, tokens_BS: torch.Tensor) -> torch.Tensor | None:
        modules = {stage.spec.index: stage for stage in self.stages}
        return forward_only(modules, self.holders, tokens_BS, self.cfg.model.dim, self.pc.pp_group)

    # ------------------------------------------------------------ metrics and evaluation
    def reduce_metrics(self, rec: MetricRecorder, kind: str = "train") -> ReducedMetrics:
        """Every rank's keys in ``rec`` (:func:`~moetrain.train.metrics.pad_to_schema`; the union of the ranks'
        names gathered once per ``kind``, a host synchronisation at the first step only), then the reduction."""
        if kind not in self.schemas:
            gathered: list[Schema | None] = [None] * self.pc.world_size
            dist.all_gather_object(gathered, metric_schema(rec))
            self.schemas[kind] = {k: v for schema in gathered for k, v in (schema or {}).items()}
        pad_to_schema(rec, self.schemas[kind], self.pc.device)
        return rec.reduce(self.pc)

    @torch.no_grad()
    def eval_step(self, tokens_BS: torch.Tensor, empty: bool, rec: MetricRecorder) -> None:
        """A forward-only pass through the stages: the loss on the last stage's holder, each layer's load on its
        stage's (:func:`~moetrain.train.moe_metrics.record_val`; the others record zeros)."""
        with self.autocast():
            logits = self._forward_only(tokens_BS[:, :-1])
        stats = {i: s for forward in self._take_stats() for i, s in forward.items()}
        record_val(rec, logits, tokens_BS, stats, empty)
