"""The training loop: forward, backward, clip, step, log; the rest lives in the parts it calls.

Every logged number is a property of the step's global batch: losses are
averaged and loads summed over micro-batches and ranks before rank 0 logs them
(DESIGN.md, "Parallel layout").
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moetrain.config import TrainConfig, to_dict
from moetrain.data import build_loader, build_tokenizer, prepare_data, rank_slice, split_micro_batches, val_batches
from moetrain.model.apply import apply_activation_checkpointing, apply_balanced_hash, apply_compile
from moetrain.model.transformer import ModelOutput, Transformer, build_model, vocab_for
from moetrain.moe.layer import MoEStats, global_routing_counts
from moetrain.moe.stats import device_load, maxvio
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.expert_parallel import apply_expert_parallel, comm_metrics, comm_scalars, zero_stats
from moetrain.parallel.grad_sync import clip_grad_norm, sync_gradients
from moetrain.train.checkpoint import Checkpointer
from moetrain.train.flops import flops_per_token, peak_tflops
from moetrain.train.guards import NonFiniteGuard, StopSignals, exit_code_for
from moetrain.train.optim import build_optimizer, build_scheduler
from moetrain.train.sinks import JSONLSink, MetricSink, WandbSink


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (nats/token)."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


@dataclass
class MoEAccumulator:
    """Sums each MoE layer's statistics over micro-batches (and, after :meth:`reduce`, ranks).

    All values stay on the device as one flat tensor per layer until the step
    ends, so there is one host sync per logged step, not one per micro-batch.
    """

    layers: list[int]
    num_experts: int
    loss_names: list[str] = field(default_factory=list)
    loads: dict[int, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    groups: dict[int, int] = field(default_factory=dict)
    """Device groups of each layer (for ``device_load`` / ``device_maxvio``)."""

    def add(self, stats: dict[int, MoEStats]) -> None:
        self.count += 1
        for i, s in stats.items():
            self._add_load(i, s.load_N.detach())
            self.groups[i] = s.num_groups
            self._add(f"moe/layer_{i}/selected", s.num_selected)
            self._add(f"moe/layer_{i}/dropped", s.num_dropped)
            if s.devices_per_token is not None:
                self._add(f"moe/layer_{i}/devices_per_token", s.devices_per_token)
            self._add(f"moe/layer_{i}/router_entropy", s.router_entropy)
            if s.comm is not None:  # expert parallelism: all-to-all counters (recv_rows is a [W] vector)
                for key, value in comm_scalars(i, s.comm).items():
                    self._add(key, value)
            for name, value in s.losses.items():
                self._add(f"moe/layer_{i}/loss/{name}", value)

    def _add_load(self, i: int, load: torch.Tensor) -> None:
        self.loads[i] = self.loads[i] + load if i in self.loads else load.clone()

    def _add(self, key: str, value: torch.Tensor | None) -> None:
        if value is None:
            return
        value = value.detach().float()
        self.scalars[key] = self.scalars[key] + value if key in self.scalars else value.clone()

    def reduce(self, pc: ParallelContext) -> None:
        """Sum over ranks (one all-reduce of everything)."""
        if not pc.distributed or not self.loads:
            return
        keys = sorted(self.scalars)
        flat = torch.cat([self.loads[i] for i in self.layers] + [self.scalars[k].reshape(-1) for k in keys])
        pc.all_reduce_sum(flat)
        n = self.num_experts
        for j, i in enumerate(self.layers):
            self.loads[i] = flat[j * n : (j + 1) * n]
        offset = len(self.layers) * n
        for k in keys:  # scalars stay 0-d, vectors (per-rank counts) keep their length
            size = self.scalars[k].numel()
            self.scalars[k] = flat[offset : offset + size].view_as(self.scalars[k])
            offset += size

    def metrics(self, num_micro: int, prefix: str = "moe") -> dict[str, Any]:
        """DESIGN.md keys; per-micro-batch means divided by ``num_micro`` (micro-batches x ranks)."""
        out: dict[str, Any] = {}
        if not self.loads:
            return out
        load_LN = torch.stack([self.loads[i] for i in self.layers])
        vio_L = maxvio(load_LN)
        host = {k: v.item() if v.dim() == 0 else v.tolist() for k, v in self.scalars.items()}
        for j, i in enumerate(self.layers):
            out[f"{prefix}/layer_{i}/load"] = [round(c) for c in load_LN[j].tolist()]
            out[f"{prefix}/layer_{i}/maxvio"] = vio_L[j].item()
            selected = host.get(f"moe/layer_{i}/selected", 0.0)
            out[f"{prefix}/layer_{i}/drop_frac"] = host.get(f"moe/layer_{i}/dropped", 0.0) / max(selected, 1.0)
            if f"moe/layer_{i}/devices_per_token" in host:
                out[f"{prefix}/layer_{i}/devices_per_token"] = host[f"moe/layer_{i}/devices_per_token"] / num_micro
            if f"moe/layer_{i}/router_entropy" in host:
                out[f"{prefix}/layer_{i}/router_entropy"] = host[f"moe/layer_{i}/router_entropy"] / num_micro
            if self.groups.get(i, 1) > 1:
                dev_load_G = device_load(load_LN[j], self.groups[i])
                out[f"{prefix}/layer_{i}/device_load"] = [round(c) for c in dev_load_G.tolist()]
                out[f"{prefix}/layer_{i}/device_maxvio"] = maxvio(dev_load_G).item()
            out.update(comm_metrics(host, i, prefix))
            for key, value in host.items():
                if key.startswith(f"moe/layer_{i}/loss/"):
                    out[key.replace("moe/", f"{prefix}/", 1)] = value / num_micro
        out[f"{prefix}/maxvio"] = vio_L.mean().item()
        return out


class Trainer:
    """Owns the loop, evaluation timing and logging for one run."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, pc: ParallelContext | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.pc = pc or ParallelContext()
        t = cfg.trainer
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.device = self.pc.device
        self.autocast_dtype = (
            torch.bfloat16 if t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda") else None
        )
        torch.manual_seed(t.seed)

        # Data: rank 0 tokenises (or hits the cache) first, the others then read the cache.
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        if self.pc.is_main:
            self.data = prepare_data(cfg.data, self.tokenizer)
        self.pc.barrier()
        if not self.pc.is_main:
            self.data = prepare_data(cfg.data, self.tokenizer)
        self.loader = build_loader(self.data, t.global_batch_size, cfg.data.seed)
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.pc.world_size)

        vocab = vocab_for(cfg.model, self.tokenizer.vocab_size)
        doc_eos = self.tokenizer.eos_id if cfg.data.doc_mask else None
        full = build_model(
            cfg.model, cfg.moe, vocab, cfg.data.seq_len, ep=cfg.parallel.ep, seed=t.seed, doc_eos=doc_eos
        )
        apply_balanced_hash(full, self.data.train)  # moe.router.hash_table=balanced: from the corpus frequencies
        # Same seed on every rank, then keep the local expert shards: EP=N starts from EP=1's exact weights.
        self.model: Transformer = apply_expert_parallel(  # type: ignore[assignment]
            full, self.pc, cfg.moe.max_recv_factor, cfg.moe.recv_overflow
        ).to(self.device)
        if t.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if t.compile:
            apply_compile(self.model)
        self.optimizer: torch.optim.Optimizer
        self.scheduler: torch.optim.lr_scheduler.LambdaLR
        self._build_optimizer()
        self.moe_layers = self.model.moe_layers()
        self.step = 0
        self.tokens_seen = 0
        self.flops_per_token = flops_per_token(self.model, cfg.data.seq_len)
        self.peak_tflops, self.peak_source = peak_tflops(self.device, t.peak_tflops)
        self.sinks: list[MetricSink] = []
        self.nonfinite = NonFiniteGuard(t.nonfinite, t.nonfinite_max_skips, self.pc.is_main)
        self.checkpointer = self._build_checkpointer()

    # ------------------------------------------------- engine hooks (native here)
    # ``moetrain.train.ds_engine.DeepSpeedTrainer`` overrides these five to run the
    # same loop through ``deepspeed.initialize``; everything else is shared.
    def _build_optimizer(self) -> None:
        """AdamW (decay on matrices only) and the warmup + cosine schedule."""
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.trainer.max_steps)

    def _build_checkpointer(self) -> Checkpointer:
        return Checkpointer(self)

    def _forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        return self.model(tokens_BS)

    def _backward(self, loss: torch.Tensor, num_micro: int) -> None:
        """Accumulate the gradient of one micro-batch's loss, scaled to the mean over micro-batches."""
        (loss / num_micro).backward()

    def _optimizer_step(self, losses: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], bool]:
        """Sync, clip, step; return the pre-clip global gradient norm, any engine metrics, and whether the
        update was applied (not when ``losses``, the step's global losses, or the norm is non-finite)."""
        sync_gradients(self.model, self.pc)  # non-expert over all W ranks, experts over EDP (both / W)
        grad_norm = clip_grad_norm(self.model, self.pc, self.cfg.optim.grad_clip)  # each expert shard once
        finite = self.nonfinite.check(
            self.step + 1, {"loss": losses[0], "aux loss": losses[1], "gradient norm": grad_norm}
        )
        if not finite:  # trainer.nonfinite=skip
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm, {"train/nonfinite_skips": self.nonfinite.skipped}, False
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, {}, True

    def close(self) -> None:
        """Release what the engine holds (nothing for the native one)."""

    # ------------------------------------------------------------------ steps
    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _new_accumulator(self) -> MoEAccumulator:
        return MoEAccumulator(sorted(self.moe_layers), self.cfg.moe.num_experts)

    def forward_backward(self, global_batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MoEAccumulator, int]:
        """Gradients of this rank's share of the global batch, accumulated over its micro-batches.

        Each micro-batch's loss is divided by the number of micro-batches, so with
        equal micro-batch sizes the accumulated gradient is that of the mean loss
        over the rank's sequences. Returns this rank's summed LM and aux losses,
        its MoE statistics and its micro-batch count.

        With ``moe.balance.scope=global`` and more than one micro-batch or rank,
        a no-grad routing pre-pass over this rank's micro-batches first collects
        the f-type counts, all-reduced over ranks (Qiu et al. 2025), and sets
        them on every MoE layer, so each balance loss's value and gradient are
        those of the whole global batch whatever the accumulation or DP split.
        The pre-pass costs one extra forward per micro-batch; it runs under a
        forked RNG, so the real pass draws the same noise (noisy top-K) and
        routes identically.
        """
        self.model.train()
        local = rank_slice(global_batch, self.pc.rank, self.pc.world_size)
        micro = split_micro_batches(local, self.cfg.trainer.micro_batch_size)
        acc = self._new_accumulator()
        lm_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        if self.cfg.moe.balance.scope == "global" and (len(micro) > 1 or self.pc.distributed):

            def routing_forward(mb: torch.Tensor) -> dict[int, MoEStats]:
                with self._autocast():
                    return self.model(mb.to(self.device, non_blocking=True)[:, :-1]).moe_stats

            rng_devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=rng_devices):
                counts = global_routing_counts(routing_forward, micro, self.pc.all_reduce_sum)
            for i, layer in self.moe_layers.items():
                layer.global_counts = counts.get(i)
        try:
            for mb in micro:
                mb = mb.to(self.device, non_blocking=True)
                with self._autocast():
                    out: ModelOutput = self._forward(mb[:, :-1])
                    loss_lm = lm_loss(out.logits, mb[:, 1:])
                    aux = out.aux_loss
                self._backward(loss_lm + aux, len(micro))
                lm_sum += loss_lm.detach()
                aux_sum += aux.detach()
                acc.add(out.moe_stats)
        finally:
            for layer in self.moe_layers.values():
                layer.global_counts = None
        return lm_sum, aux_sum, acc, len(micro)

    def train_step(self, global_batch: torch.Tensor) -> dict[str, Any]:
        """One optimizer step on the step's global batch; returns its (global) metrics tensors."""
        lm_sum, aux_sum, acc, num_micro = self.forward_backward(global_batch)
        lr = self.optimizer.param_groups[0]["lr"]
        totals = torch.stack([lm_sum, aux_sum])
        self.pc.all_reduce_sum(totals)  # before the update: a non-finite global loss is not applied
        grad_norm, extra, applied = self._optimizer_step(totals)

        acc.reduce(self.pc)
        if applied:  # a skipped (fp16 overflow, non-finite) step updates nothing, the loss-free bias included
            for i, layer in self.moe_layers.items():
                layer.router.update_bias(acc.loads[i])  # the step's global load: identical on all ranks
        n = num_micro * self.pc.world_size
        self.step += 1
        self.tokens_seen += global_batch.shape[0] * (global_batch.shape[1] - 1)
        return {
            "loss": totals[0] / n,
            "aux": totals[1] / n,
            "grad_norm": grad_norm,
            "lr": lr,
            "acc": acc,
            "n": n,
            "extra": extra,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Loss over the whole validation split, and MaxVio of the load summed over it."""
        self.model.eval()
        acc = self._new_accumulator()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        tokens = torch.zeros((), device=self.device, dtype=torch.float64)
        bs = self.cfg.trainer.micro_batch_size
        for batch in val_batches(self.data.val, bs * self.pc.world_size, self.pc.rank, self.pc.world_size):
            if batch.shape[0] == 0:  # an empty share still joins the EP all-to-alls; its stats count zero
                with self._autocast():
                    out = self.model(torch.as_tensor(self.data.val[:1], dtype=torch.long, device=self.device)[:, :-1])
                acc.add({i: zero_stats(s) for i, s in out.moe_stats.items()})
                continue
            batch = batch.to(self.device)
            with self._autocast():
                out = self.model(batch[:, :-1])
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            loss_sum += ce.double()
            tokens += batch[:, 1:].numel()
            acc.add(out.moe_stats)
        self.pc.all_reduce_sum(loss_sum)
        self.pc.all_reduce_sum(tokens)
        if not acc.loads:  # a rank that saw no batch still joins the reduction
            for i in acc.layers:
                acc.loads[i] = torch.zeros(self.cfg.moe.num_experts, device=self.device)
        acc.reduce(self.pc)
        loss = (loss_sum / tokens.clamp_min(1)).item()
        out_metrics: dict[str, Any] = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
        if self.tokenizer.name == "byte":
            out_metrics["val/bpb"] = loss / math.log(2)
        if acc.loads:
            load_LN = torch.stack([acc.loads[i] for i in acc.layers])
            vio = maxvio(load_LN)
            for j, i in enumerate(acc.layers):
                out_metrics[f"val/layer_{i}/maxvio_global"] = vio[j].item()
            out_metrics["val/maxvio_global"] = vio.mean().item()
        self.model.train()
        return out_metrics

    # ------------------------------------------------------------------- loop
    def _log(self, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(self.step, metrics)

    def _open_sinks(self) -> None:
        if not self.pc.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sinks.append(JSONLSink(self.run_dir / "metrics.jsonl"))
        if self.cfg.logger.wandb.mode != "disabled":
            self.sinks.append(WandbSink(self.cfg.logger.wandb, self.run_dir, to_dict(self.cfg)))

    def _close_sinks(self, exit_code: int) -> None:
        for sink in self.sinks:
            sink.close(exit_code)
        self.sinks = []

    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.max_steps``; return the last train and validation metrics."""
        t = self.cfg.trainer
        self.checkpointer.resume()  # trainer.resume: restores step, weights, optimizer, loader, RNG
        self._open_sinks()
        last: dict[str, Any] = {}
        bar = None
        if self.pc.is_main and t.progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        say = bar.write if bar is not None else print
        if self.pc.is_main:
            m = self.model
            say(
                f"moetrain: {m.num_params() / 1e6:.2f}M params ({m.num_params(active=True) / 1e6:.2f}M active), "
                f"{len(self.moe_layers)} MoE layers, {self.data.train.shape[0]} train / {self.data.val.shape[0]} val "
                f"sequences of {self.cfg.data.seq_len}, world {self.pc.world_size}, device {self.device}, "
                f"run dir {self.run_dir}"
            )
        exit_code = 0
        signals = StopSignals().install()  # SIGTERM / SIGINT: checkpoint at the next step boundary, then exit
        try:
            if t.eval_at_start and self.step == 0:
                val = self.evaluate()
                self._log(val)
                if self.pc.is_main:
                    say(f"eval step 0: val/loss {val['val/loss']:.4f}")
            window_t0, window_tokens = time.perf_counter(), 0
            while self.step < t.max_steps:
                batch = self.loader.next_batch()
                res = self.train_step(batch)
                window_tokens += batch.shape[0] * (batch.shape[1] - 1)
                is_last = self.step == t.max_steps
                if self.step % t.log_every == 0 or is_last:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - window_t0
                    tps = window_tokens / max(elapsed, 1e-9)
                    metrics = {
                        "train/loss": res["loss"].item(),
                        "train/aux_loss": res["aux"].item(),
                        "train/lr": res["lr"],
                        "train/grad_norm": res["grad_norm"].item(),
                        "perf/tokens_per_sec": tps,
                        "perf/mfu": tps * self.flops_per_token / (self.peak_tflops * 1e12),
                        "train/tokens": self.tokens_seen,
                        **res["extra"],
                        **res["acc"].metrics(res["n"]),
                        **self.loader.metrics(),  # a mixture's realised source proportions
                    }
                    self._log(metrics)
                    last.update(metrics)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{metrics['train/loss']:.3f}",
                            maxvio=f"{metrics.get('moe/maxvio', 0):.2f}",
                            tok_s=f"{tps:,.0f}",
                        )
                    if self.pc.is_main and bar is None:
                        say(
                            f"step {self.step:>6}/{t.max_steps} | loss {metrics['train/loss']:.4f} | "
                            f"aux {metrics['train/aux_loss']:.4f} | maxvio {metrics.get('moe/maxvio', 0):.3f} | "
                            f"lr {metrics['train/lr']:.2e} | {tps:,.0f} tok/s"
                        )
                    window_t0, window_tokens = time.perf_counter(), 0
                if (t.eval_every and self.step % t.eval_every == 0) or is_last:
                    val = self.evaluate()
                    self._log(val)
                    last.update(val)
                    if self.pc.is_main:
                        say(
                            f"eval step {self.step}: val/loss {val['val/loss']:.4f} "
                            + (f"({val['val/bpb']:.3f} bits/byte) " if "val/bpb" in val else "")
                            + f"val/maxvio_global {val.get('val/maxvio_global', 0):.3f}"
                        )
                    window_t0 = time.perf_counter()  # evaluation time is not training throughput
                self.checkpointer.after_step(is_last)
                if bar is not None:
                    bar.update(1)
                signum = signals.agreed(self.checkpointer.control_group, self.checkpointer.distributed)
                if signum and not is_last:
                    saved = self.checkpointer.save_for_stop()
                    exit_code = exit_code_for(signum)
                    if self.pc.is_main:
                        where = f"checkpoint {saved}" if saved else "no checkpoint (checkpoint.enabled=false)"
                        say(f"moetrain: stopped by a signal at step {self.step}; {where}; rerun to continue")
                    break
        except KeyboardInterrupt:
            exit_code = 130
            if self.pc.is_main:
                say(f"interrupted at step {self.step}; metrics so far are in {self.run_dir / 'metrics.jsonl'}")
        except BaseException:
            exit_code = exit_code or 1
            raise
        finally:
            signals.restore()
            if bar is not None:
                bar.close()
            self._close_sinks(exit_code)
        if exit_code:
            raise SystemExit(exit_code)
        return last
