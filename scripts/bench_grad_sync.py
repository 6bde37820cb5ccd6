"""Native engine step time: the gradient all-reduce in buckets overlapped with the backward (the default,
``parallel.bucket_mb``) against one flat all-reduce after the backward (the reducer removed).

Run under torchrun (gloo on CPU, NCCL on GPUs). Both modes train the same model on the same data in the same
processes, timed in alternating blocks of steps so that machine noise hits them alike. Prints ms per step, the
part of it spent waiting in the gradient sync after the backward (``sync_gradients``: the whole flat
all-reduce, or the wait for the buckets still in flight) and the ratio bucketed / flat; the losses of the last
step agree (the sums are the same).

    torchrun --standalone --nproc_per_node=2 scripts/bench_grad_sync.py
    torchrun --standalone --nproc_per_node=2 scripts/bench_grad_sync.py -- parallel.ep=2 parallel.bucket_mb=5
    torchrun --standalone --nproc_per_node=4 scripts/bench_grad_sync.py -- parallel.ep=2   # EP=2 x DP=2
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moetrain.config import TrainConfig, validate
from moetrain.parallel import init_parallel
from moetrain.parallel.grad_buckets import grad_reducer, remove_grad_buckets
from moetrain.train import native
from moetrain.train.cli import config_dir, make_trainer

MODES = ("bucketed", "flat")


class SyncTimer:
    """Wraps the native engine's ``sync_gradients`` to add up the seconds spent in it (GPU: synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0
        self.inner: Callable[..., None] = native.sync_gradients

    def __call__(self, *args: Any) -> None:
        t0 = time.perf_counter()
        self.inner(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0


def build(cfg: TrainConfig, tmp: str, pc: Any) -> dict[str, Any]:
    trainers = {}
    for mode in MODES:
        trainers[mode] = make_trainer(copy.deepcopy(cfg), Path(tmp) / mode, pc)
        if mode == "flat":
            remove_grad_buckets(trainers[mode].model)
    return trainers


def timed_blocks(trainers: dict[str, Any], pc: Any, steps: int, block: int, timer: SyncTimer) -> dict[str, Any]:
    """Alternating blocks of ``block`` steps per mode, which mode goes first alternating too (the second block of
    a pair runs on warmer caches); (seconds, sync seconds, last loss) per mode."""
    out = {mode: {"s": 0.0, "sync": 0.0, "loss": float("nan")} for mode in trainers}
    done = 0
    while done < steps:
        n = min(block, steps - done)
        order = list(trainers) if (done // block) % 2 == 0 else list(reversed(trainers))
        for mode in order:
            tr = trainers[mode]
            pc.barrier()
            timer.seconds = 0.0
            t0 = time.perf_counter()
            for _ in range(n):
                res = tr.train_step(tr.loader.next_batch())
            loss = res.loss.item()
            pc.barrier()
            out[mode]["s"] += time.perf_counter() - t0
            out[mode]["sync"] += timer.seconds
            out[mode]["loss"] = loss
        done += n
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block", type=int, default=2, help="steps per alternating block")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the base config")
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = ["logger=none", "trainer.progress=false", "trainer.num_threads=1", "checkpoint.enabled=false"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        dcfg = compose("train", overrides=[*base, *args.overrides])
    cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    cfg.trainer.micro_batch_size = min(cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size // world)
    validate(cfg, world)
    pc = init_parallel(cfg.parallel, cfg.trainer.device, num_experts=cfg.moe.num_experts)
    if not pc.distributed:
        raise SystemExit("run under torchrun with 2+ ranks: one process has no gradient sync")
    timer = SyncTimer(pc.device)
    native.sync_gradients = timer  # type: ignore[assignment]  # the optim_step's call, timed
    with tempfile.TemporaryDirectory() as tmp:
        trainers = build(cfg, tmp, pc)
        for tr in trainers.values():
            for _ in range(args.warmup):
                tr.train_step(tr.loader.next_batch())
        res = timed_blocks(trainers, pc, args.steps, args.block, timer)
        buckets = grad_reducer(trainers["bucketed"].model).buckets  # type: ignore[union-attr]
        if pc.is_main:
            m = trainers["bucketed"].model
            grads_mib = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
            t = cfg.trainer
            print(
                f"{m.num_params() / 1e6:.2f}M params ({grads_mib:.1f} MiB of gradients on rank 0), world {world}, "
                f"ep {cfg.parallel.ep}, {t.global_batch_size // world // t.micro_batch_size} micro-batches per rank, "
                f"{len(buckets)} buckets of <= ~{cfg.parallel.bucket_mb:g} MiB, backend {pc.backend}, "
                f"{args.steps} timed steps per mode, torch {torch.__version__}"
            )
            print("| gradient sync | ms / step | of which waiting in sync_gradients, ms | loss after last step |")
            print("| --- | ---: | ---: | ---: |")
            for mode, r in res.items():
                print(
                    f"| {mode} | {r['s'] / args.steps * 1e3:.1f} | {r['sync'] / args.steps * 1e3:.1f} | {r['loss']:.5f} |"
                )
            ratio = res["bucketed"]["s"] / res["flat"]["s"]
            print(f"\nbucketed / flat step time: {ratio:.3f}")
    pc.close()


if __name__ == "__main__":
    main()
