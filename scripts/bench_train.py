"""End-to-end training tokens/s: the MoE model against a dense model of equal active parameters.

The dense baseline is the same Transformer with every layer dense and a SwiGLU of
hidden size K * expert_hidden_size + shared experts' hidden (the FFN width a token
actually goes through in the MoE layer), so both do the same FLOPs per token. Both
train on the same data with the same optimizer; steps are timed in alternating
blocks in one run so that machine noise hits both alike.

    python scripts/bench_train.py                       # the default tiny config
    python scripts/bench_train.py --steps 30 -- model=small moe.num_experts=64 moe.top_k=6
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moetrain.config import TrainConfig, validate
from moetrain.train.cli import config_dir
from moetrain.train.trainer import Trainer


def dense_twin(cfg: TrainConfig) -> TrainConfig:
    dense = copy.deepcopy(cfg)
    moe = cfg.moe
    shared = (moe.shared_hidden_size or moe.expert_hidden_size) * moe.num_shared_experts
    dense.model.first_k_dense = cfg.model.n_layers
    dense.model.ffn_hidden_size = moe.top_k * moe.expert_hidden_size + shared
    dense.moe.balance.expert_coef = 0.0
    return dense


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block", type=int, default=5, help="steps per alternating block")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the base config")
    args = p.parse_args()

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        dcfg = compose("train", overrides=[*args.overrides, "logger=none", "trainer.progress=false"])
    cfg = validate(OmegaConf.to_object(dcfg))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {"moe": Trainer(cfg, tmp), "dense": Trainer(validate(dense_twin(cfg)), tmp)}
        for name, tr in trainers.items():
            m = tr.model
            print(
                f"{name:>5}: {m.num_params() / 1e6:.2f}M params, {m.num_params(active=True) / 1e6:.2f}M active, "
                f"{tr.flops_per_token / 1e6:.1f} MFLOPs/token"
            )
        batch = trainers["moe"].loader.next_batch()
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        for tr in trainers.values():
            for _ in range(args.warmup):
                tr.train_step(batch)
        elapsed = {k: 0.0 for k in trainers}
        done = 0
        while done < args.steps:
            n = min(args.block, args.steps - done)
            for name, tr in trainers.items():
                if tr.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    tr.train_step(tr.loader.next_batch())
                if tr.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed[name] += time.perf_counter() - t0
            done += n
    tps = {k: tokens * args.steps / v for k, v in elapsed.items()}
    print("\n| model | tokens/s | ms/step |\n| --- | ---: | ---: |")
    for name in trainers:
        print(f"| {name} | {tps[name]:,.0f} | {elapsed[name] / args.steps * 1e3:.0f} |")
    print(
        f"\nMoE / dense tokens/s: {tps['moe'] / tps['dense']:.2f}x  "
        f"({args.steps} steps each, {tokens} tokens/step, device {trainers['moe'].device})"
    )


if __name__ == "__main__":
    main()
