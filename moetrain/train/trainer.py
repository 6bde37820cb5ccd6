"""The training loop: one global batch per step through the train module; evaluation, logging and checkpoints
on their schedules.

The :class:`Trainer` owns the loop and its cadence; the engine (forward,
backward, optimizer step, precision, its checkpoint files) is a
:class:`~moetrain.train.module.TrainModule`; metrics are recorded where they
arise and reduced across ranks in one place
(:class:`~moetrain.train.metrics.MetricRecorder`); the sinks (console,
``metrics.jsonl``, W&B) only write.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moetrain.config import TrainConfig, default_threads, resolve_num_groups, to_dict, with_micro_batch
from moetrain.data import (
    PackedData,
    build_loader,
    build_tokenizer,
    prepare_data,
    rank_slice,
    split_micro_batches,
)
from moetrain.model.apply import apply_activation_checkpointing, apply_balanced_hash, apply_compile, apply_slot_sum
from moetrain.model.transformer import Transformer, active_per_token, vocab_for
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.expert_parallel import apply_expert_parallel
from moetrain.parallel.meta_init import build_local_model
from moetrain.train import hooks
from moetrain.train.checkpoint import CheckpointManager, arch_of
from moetrain.train.console import LOG, LogSink, close_run_logging, setup_run_logging
from moetrain.train.evaluate import evaluate
from moetrain.train.flops import flops_per_token, mfu, peak_tflops
from moetrain.train.guards import StopSignals, exit_code_for
from moetrain.train.metrics import MetricRecorder, ReducedMetrics
from moetrain.train.module import StepInfo, TrainModule
from moetrain.train.moe_metrics import layer_load, moe_log_metrics
from moetrain.train.native import NativeTrainModule
from moetrain.train.sinks import JSONLSink, MetricSink, WandbSink
from moetrain.train.step import lm_loss, staged_for

__all__ = ["StepOutput", "Trainer", "lm_loss"]


@dataclass
class Progress:
    """The loop's position, saved in ``meta.json``: steps and tokens done, the loader's place in the data."""

    loader: Any
    """A :func:`~moetrain.data.build_loader` loader (one source or a mixture): ``next_batch``, state dict."""
    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])


@dataclass
class StepOutput:
    """One optimizer step's global metrics (on the device) and what the engine reported."""

    reduced: ReducedMetrics
    info: StepInfo
    lr: float

    @property
    def loss(self) -> torch.Tensor:
        """The step's mean LM loss over every micro-batch of every rank."""
        counts = self.reduced.counts["train/loss"]
        return self.reduced.tensor("train/loss") / counts.to(self.reduced.tensor("train/loss").dtype)


@dataclass
class Throughput:
    """Tokens per second over the steps since the last log, evaluation time excluded."""

    t0: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def rate(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)

    def restart(self, keep_tokens: bool = False) -> None:
        self.t0 = time.perf_counter()
        self.tokens = self.tokens if keep_tokens else 0


def setup_torch(cfg: TrainConfig) -> None:
    """Threads, determinism and the seed, before anything random is drawn."""
    t = cfg.trainer
    torch.set_num_threads(t.num_threads or default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(t.seed)


def build_parallel_model(
    cfg: TrainConfig, vocab: int, train_tokens: Any, pc: ParallelContext, doc_eos: int | None = None
) -> Transformer:
    """The model with the same seed on every rank, built on the meta device with only this rank's experts
    materialised (:func:`~moetrain.parallel.meta_init.build_local_model`: EP=N starts from EP=1's exact weights
    and no rank ever holds every expert), then activation checkpointing and compilation as configured (the engine applies its data parallelism)."""
    t = cfg.trainer
    groups = resolve_num_groups(cfg.moe, cfg.parallel.ep)
    local = build_local_model(
        cfg.model, cfg.moe, vocab, cfg.data.seq_len, pc.ep_size, pc.ep_rank, t.seed, None, groups, doc_eos
    )
    apply_balanced_hash(local, train_tokens)  # moe.router.hash_table=balanced: from the corpus frequencies
    overlap = cfg.parallel.overlap_shared_experts
    model: Transformer = apply_expert_parallel(local, pc, cfg.moe.max_recv_factor, cfg.moe.recv_overflow, overlap)  # type: ignore[assignment]
    model = apply_slot_sum(model.to(pc.device), pc.device)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    if t.compile:
        apply_compile(model)
    return model


def build_engine(
    cfg: TrainConfig, vocab: int, train_tokens: Any, pc: ParallelContext, doc_eos: int | None = None
) -> TrainModule:
    """The train module with its model: :func:`build_parallel_model` and :func:`build_train_module`, or under
    pipeline parallelism (``parallel.pp > 1``) the engine that builds this rank's stages itself
    (:class:`~moetrain.train.pipeline.PipelineTrainModule`)."""
    if cfg.parallel.pp > 1:
        from moetrain.train.pipeline import PipelineTrainModule

        return PipelineTrainModule(cfg, vocab, train_tokens, pc, doc_eos)
    return build_train_module(cfg, build_parallel_model(cfg, vocab, train_tokens, pc, doc_eos), pc)


def build_train_module(cfg: TrainConfig, model: Transformer, pc: ParallelContext) -> TrainModule:
    """The train module of ``engine.name``."""
    if cfg.engine.name == "deepspeed":
        from moetrain.train.deepspeed.module import DeepSpeedTrainModule

        return DeepSpeedTrainModule(cfg, model, pc)
    return NativeTrainModule(cfg, model, pc)


class Trainer:
    """Owns the loop, evaluation timing, logging and checkpoint cadence for one run."""

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, pc: ParallelContext | None = None, data: PackedData | None = None
    ) -> None:
        """``data``: sequences already prepared (a benchmark's token source); ``None`` = ``cfg.data``'s corpus."""
        self.run_dir = Path(run_dir)
        self.pc = pc or ParallelContext()
        self.cfg = cfg = with_micro_batch(cfg, self.pc.world_size)  # micro_batch_size=None: config/world.py's default
        self.device = self.pc.device
        setup_torch(cfg)
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.data = data if data is not None else self._prepare_data()
        t = cfg.trainer
        self.progress = Progress(build_loader(self.data, t.global_batch_size, cfg.data.seed))
        vocab = vocab_for(cfg.model, self.tokenizer.vocab_size)
        doc_eos = self.tokenizer.eos_id if cfg.data.doc_mask else None  # data.doc_mask: documents split at EOS
        self.module: TrainModule = build_engine(cfg, vocab, self.data.train, self.pc, doc_eos)
        model = self.module.whole  # the whole model's shape (under PP the rank holds its stages only)
        self.moe_layers = self.module.model.moe_layers()  # this rank's: their loss-free biases
        self.layer_groups = {i: layer.num_groups for i, layer in model.moe_layers().items()}  # every layer: logged
        self.flops_per_token = flops_per_token(model, cfg.data.seq_len)
        self.peak_tflops, self.peak_source = peak_tflops(self.device, t.peak_tflops)
        self.checkpointer = CheckpointManager(
            cfg, self.run_dir, self.pc, self.module, self.progress, arch_of(cfg, model)
        )
        self.sinks: list[MetricSink] = []
        self.console: LogSink | None = None

    def _prepare_data(self) -> PackedData:
        """``cfg.data``'s sequences: rank 0 tokenises (or hits the cache) first, the others then read the cache."""
        if self.pc.is_main:
            data = prepare_data(self.cfg.data, self.tokenizer)
        self.pc.barrier()
        if not self.pc.is_main:
            data = prepare_data(self.cfg.data, self.tokenizer)
        return data

    # The pieces tests and tools reach for.
    @property
    def model(self) -> Transformer:
        return self.module.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.module.optimizer  # type: ignore[attr-defined, no-any-return]

    @property
    def loader(self) -> Any:
        return self.progress.loader

    @property
    def step(self) -> int:
        return self.progress.step

    def close(self) -> None:
        """Release what the engine holds."""
        self.module.close()

    # ------------------------------------------------------------------ steps
    def micro_batches(self, global_batch: torch.Tensor) -> list[torch.Tensor]:
        """This rank's share of the global batch, split into micro-batches."""
        local = staged_for(rank_slice(global_batch, self.pc.dp_rank, self.pc.dp_size), self.pc.device)
        return split_micro_batches(local, self.cfg.trainer.micro_batch_size)

    def forward_backward(self, global_batch: torch.Tensor) -> MetricRecorder:
        """Gradients of this rank's share of the global batch, accumulated over its micro-batches; returns what
        they recorded (this rank's, not yet reduced)."""
        rec = MetricRecorder()
        self.module.train_batch(self.micro_batches(global_batch), rec)
        return rec

    def train_step(self, global_batch: torch.Tensor) -> StepOutput:
        """One optimizer step on the step's global batch."""
        # reduced before the update: a non-finite global loss is not applied
        reduced = self.module.reduce_metrics(self.forward_backward(global_batch))
        lr = self.module.lr()
        info = self.module.optim_step(self.step + 1, reduced)
        if info.applied:  # a skipped step updates nothing, the loss-free bias included
            for i, layer in self.moe_layers.items():
                layer.router.update_bias(layer_load(reduced, i))  # identical on all ranks
        self.progress.step += 1
        self.progress.tokens_seen += global_batch.shape[0] * (global_batch.shape[1] - 1)
        return StepOutput(reduced, info, lr)

    def evaluate(self, stop: Callable[[], object] | None = None) -> dict[str, Any]:
        """Loss over the whole validation split, and MaxVio of the load summed over it (``{}`` when ``stop()``
        turned true before a batch: see :func:`moetrain.train.evaluate.evaluate`)."""
        mbs = self.cfg.trainer.micro_batch_size
        return evaluate(self.module, self.data.val, mbs, self.pc, self.tokenizer.name == "byte", stop) or {}

    def _evaluate_or_signal(self, signals: StopSignals, last: dict[str, Any]) -> int | None:
        """Evaluate and log into ``last``; a stop signal during the evaluation ends it at the next batch and
        returns the signal (every rank the same; the caller saves and exits), so a SIGTERM's save is not
        delayed past the scheduler's grace period by a long validation split."""
        group, distributed = self.checkpointer.control_group, self.checkpointer.distributed
        metrics = self.evaluate(stop=lambda: signals.agreed(group, distributed))
        if not metrics:
            LOG.info(f"moetrain: evaluation at step {self.step} stopped by a signal (not logged)")
            return signals.agreed(group, distributed)
        last.update(self._log(metrics))
        return None

    def step_metrics(self, out: StepOutput, tokens_per_sec: float) -> dict[str, Any]:
        """The logged keys of a training step (docs/metrics.md): one device-to-host copy."""
        host = out.reduced.host()
        return {
            "train/loss": host["train/loss"],
            "train/aux_loss": host["train/aux_loss"],
            **{k: v for k, v in host.items() if k.startswith("train/mtp_loss_")},  # multi-token prediction, by depth
            "train/lr": out.lr,
            "train/grad_norm": out.info.grad_norm.item(),
            "perf/tokens_per_sec": tokens_per_sec,
            "perf/mfu": mfu(tokens_per_sec, self.flops_per_token, self.peak_tflops, self.pc.world_size),
            "train/tokens": self.progress.tokens_seen,
            **out.info.extra,
            **moe_log_metrics(out.reduced, host, sorted(self.layer_groups), self.layer_groups),
            **self.loader.metrics(),  # a mixture's realised source proportions
        }

    # ------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.max_steps``; return the last train and validation metrics."""
        t = self.cfg.trainer
        console = setup_run_logging(self.run_dir, self.pc.is_main)
        self.checkpointer.resume()  # trainer.resume: step, weights, optimizer, loader, RNG
        self._open_sinks(console)
        last: dict[str, Any] = {}
        exit_code = 0
        signals = StopSignals().install()  # SIGTERM / SIGINT: checkpoint at the next step boundary, then exit
        try:
            if t.eval_at_start and self.step == 0 and (signum := self._evaluate_or_signal(signals, {})):
                exit_code = self._stop_for_signal(signum)
            speed = Throughput()
            while not exit_code and self.step < t.max_steps:
                batch = self.loader.next_batch()
                out = self.train_step(batch)
                speed.tokens += batch.shape[0] * (batch.shape[1] - 1)
                is_last = self.step == t.max_steps
                if self.step % t.log_every == 0 or is_last:
                    last.update(self._log(self.step_metrics(out, speed.rate(self.device))))
                    speed.restart()
                if (t.eval_every and self.step % t.eval_every == 0) or is_last:
                    if signum := self._evaluate_or_signal(signals, last):
                        exit_code = self._stop_for_signal(signum)
                        break
                    speed.restart(keep_tokens=True)  # evaluation time is not training throughput
                self.checkpointer.after_step(is_last)
                hooks.fire(
                    "after_step",
                    step=self.step,
                    rank=self.pc.rank,
                    world_size=self.pc.world_size,
                    checkpoints=self.checkpointer,
                )
                self._console_advance()
                signum = signals.agreed(self.checkpointer.control_group, self.checkpointer.distributed)
                if signum and not is_last:
                    exit_code = self._stop_for_signal(signum)
                    break
        except KeyboardInterrupt:
            exit_code = 130
            LOG.info(f"interrupted at step {self.step}; metrics so far are in {self.run_dir / 'metrics.jsonl'}")
        except BaseException:
            exit_code = exit_code or 1
            raise
        finally:
            signals.restore()
            self._close_sinks(exit_code)
        if exit_code:
            raise SystemExit(exit_code)
        return last

    def _stop_for_signal(self, signum: int) -> int:
        saved = self.checkpointer.save_for_stop()
        where = f"checkpoint {saved}" if saved else "no checkpoint (checkpoint.enabled=false)"
        LOG.info(
            f"moetrain: stopped by a signal at step {self.step}; {where}; rerun with the same run directory to continue"
        )
        return exit_code_for(signum)

    # ------------------------------------------------------------------ sinks
    def _open_sinks(self, console: Any) -> None:
        if not self.pc.is_main:
            return
        self.console = LogSink(console, self.cfg.trainer.max_steps, self.step, self.cfg.trainer.progress)
        self.sinks = [JSONLSink(self.run_dir / "metrics.jsonl")]
        if self.cfg.logger.wandb.mode != "disabled":
            self.sinks.append(WandbSink(self.cfg.logger.wandb, self.run_dir, to_dict(self.cfg)))
        self.sinks.append(self.console)
        m = self.module.whole
        active = active_per_token(m.param_counts(), self.cfg.model.tie_embeddings)
        LOG.info(
            f"moetrain: {m.num_params() / 1e6:.2f}M params ({active / 1e6:.2f}M active per token, "
            f"{m.num_params(active=True) / 1e6:.2f}M with the embedding lookup), "
            f"{len(self.layer_groups)} MoE layers, {self.data.train.shape[0]} train / {self.data.val.shape[0]} val "
            f"sequences of {self.cfg.data.seq_len}, world {self.pc.world_size}, device {self.device}, "
            f"run dir {self.run_dir}"
        )
        for note in self.module.startup_notes():
            LOG.info(note)

    def _log(self, metrics: dict[str, Any]) -> dict[str, Any]:
        for sink in self.sinks:
            sink.log(self.step, metrics)
        return metrics

    def _console_advance(self) -> None:
        if self.console is not None:
            self.console.advance()

    def _close_sinks(self, exit_code: int) -> None:
        for sink in self.sinks:
            sink.close(exit_code)
        self.sinks, self.console = [], None
        close_run_logging()
