"""Training tokens/s and optimizer-state memory per rank: the native engine against DeepSpeed ZeRO-0/1/2.

Run under torchrun; every engine trains the same model on the same data in the
same processes, timed in alternating blocks of steps so that machine noise hits
them alike. Prints tokens/s with the ratio to the native engine, the memory of
weights, fp32 master copy and Adam moments held per rank, and the loss after
the last step (equal across engines in fp32: the same training).

    torchrun --standalone --nproc_per_node=2 scripts/bench_engines.py
    torchrun --standalone --nproc_per_node=2 scripts/bench_engines.py -- parallel.ep=1   # experts replicated (DP)
    torchrun --standalone --nproc_per_node=2 scripts/bench_engines.py -- trainer.precision=bf16
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moetrain.config import TrainConfig, validate
from moetrain.parallel import init_parallel
from moetrain.train.cli import config_dir, make_trainer

ENGINES = [("native", "native", 0), ("ZeRO-0", "deepspeed", 0), ("ZeRO-1", "deepspeed", 1), ("ZeRO-2", "deepspeed", 2)]


def memory_mib(trainer: Any) -> tuple[float, float, float]:
    """(model weights, fp32 master copy, Adam moments) held by this rank, MiB.

    The native engine's master copy is the (fp32) weights themselves; DeepSpeed's bf16 / fp16 and ZeRO
    optimizers keep a separate fp32 copy (ZeRO: of this rank's partition only)."""
    mib = 2.0**20
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters()) / mib
    moments = sum(
        t.numel() * t.element_size()
        for state in trainer.optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    ds_opt = getattr(getattr(trainer, "engine", None), "optimizer", None)
    masters: list[torch.Tensor] = []
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_groups_flat", "fp32_groups"):
        found = getattr(ds_opt, attr, None)  # ZeRO-1/2, BF16_Optimizer, FP16_Optimizer, FP16_UnfusedOptimizer
        if found:
            masters = [t for group in found for t in (group if isinstance(group, list) else [group])]
            break
    master = sum(t.numel() * t.element_size() for t in masters) / mib
    return weights, master, moments / mib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per engine")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block", type=int, default=5, help="steps per alternating block")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the base config")
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = ["logger=none", "trainer.progress=false", f"parallel.ep={world}", "trainer.num_threads=1"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        dcfg = compose("train", overrides=[*base, *args.overrides])
    cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    cfg.trainer.micro_batch_size = min(cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size // world)
    pc = init_parallel(cfg.parallel, cfg.trainer.device, num_experts=cfg.moe.num_experts)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, engine, stage in ENGINES:
            c = copy.deepcopy(cfg)
            c.engine.name, c.engine.zero_stage = engine, stage
            trainers[name] = make_trainer(validate(c, world), Path(tmp) / name, pc)
        times = dict.fromkeys(trainers, 0.0)
        tokens = dict.fromkeys(trainers, 0)
        last: dict[str, float] = {}
        for tr in trainers.values():
            for _ in range(args.warmup):
                tr.train_step(tr.loader.next_batch())
        done = 0
        while done < args.steps:
            n = min(args.block, args.steps - done)
            for name, tr in trainers.items():
                pc.barrier()
                t0 = time.perf_counter()
                for _ in range(n):
                    batch = tr.loader.next_batch()
                    res = tr.train_step(batch)
                    tokens[name] += batch.shape[0] * (batch.shape[1] - 1)
                last[name] = res.loss.item()
                pc.barrier()
                times[name] += time.perf_counter() - t0
            done += n
        memory = {name: memory_mib(tr) for name, tr in trainers.items()}
        if pc.is_main:
            m = trainers["native"].model
            print(
                f"{m.num_params() / 1e6:.2f}M params ({m.num_params(active=True) / 1e6:.2f}M active), "
                f"world {world}, ep {cfg.parallel.ep}, precision {cfg.trainer.precision}, "
                f"{args.steps} timed steps of {cfg.trainer.global_batch_size} x {cfg.data.seq_len} tokens"
            )
            print(
                "| engine | tokens/s | × native | MiB / rank: weights + fp32 master + Adam moments | loss after last step |"
            )
            print("| --- | ---: | ---: | ---: | ---: |")
            native_tps = tokens["native"] / times["native"]
            for name in trainers:
                tps = tokens[name] / times[name]
                w, m, a = memory[name]
                mem = f"{w:.1f} + {m:.1f} + {a:.1f} = {w + m + a:.1f}"
                print(f"| {name} | {tps:,.0f} | {tps / native_tps:.2f} | {mem} | {last[name]:.5f} |")
        for tr in trainers.values():
            if getattr(tr, "engine", None) is not None:
                tr.engine.destroy()
    pc.close()


if __name__ == "__main__":
    main()
