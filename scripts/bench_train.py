"""End-to-end training tokens/s: the MoE model against a dense model of equal active FLOPs.

The dense twin is the same Transformer with every layer dense and a SwiGLU of
hidden size K * expert_hidden_size + shared experts' hidden (the FFN width a token
actually goes through in the MoE layer), so both do the same FLOPs per token. Both
train on the same data with the same optimizer, on the device the trainer picks
(``trainer.device``: the GPU when there is one) at its precision (bf16 autocast on
GPU); steps are timed in alternating blocks in one run so that machine noise hits
both alike. MFU is against the bf16 (GPU) or fp32 (CPU) GEMM rate measured in the
same run (an 8192^3 matmul on GPU), not a datasheet number.

    python scripts/bench_train.py                       # the default tiny config
    python scripts/bench_train.py --steps 30 -- model=small moe.num_experts=64 moe.top_k=6
    python scripts/bench_train.py --compile -- model=small ...   # trainer.compile, with the time to the first step

It needs neither hydra-core nor ``datasets`` (the GPU check's machine has neither): the overrides are composed
by :func:`~moetrain.config.compose.compose_without_hydra`, and the tokens are the standard library's source
read as plain files (the default corpus, without its cache or split), cut into ``data.seq_len + 1`` rows.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moetrain.config import TrainConfig, validate
from moetrain.config.compose import compose_without_hydra
from moetrain.data import PackedData, build_tokenizer, stdlib_files
from moetrain.parallel.context import ParallelContext, resolve_device
from moetrain.train.flops import measured_gemm_tflops
from moetrain.train.trainer import Trainer


def dense_twin(cfg: TrainConfig) -> TrainConfig:
    dense = copy.deepcopy(cfg)
    moe = cfg.moe
    shared = (moe.shared_hidden_size or moe.expert_hidden_size) * moe.num_shared_experts
    dense.model.first_k_dense = cfg.model.n_layers
    dense.model.ffn_hidden_size = moe.top_k * moe.expert_hidden_size + shared
    dense.moe.balance.expert_coef = 0.0
    return dense


def plain_file_data(cfg: TrainConfig, rows: int) -> PackedData:
    """``rows`` training sequences of ``data.seq_len + 1`` tokens from the standard library's ``.py`` files read
    in path order (no ``datasets``, no cache), and the first of them again as the validation split."""
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    need, parts, have = rows * (cfg.data.seq_len + 1), [], 0
    for path in stdlib_files():
        ids = tokenizer.encode(path.read_text(encoding="utf-8"))
        parts.append(np.append(ids, tokenizer.eos_id))
        have += len(parts[-1])
        if have >= need:
            break
    if have < need:
        raise SystemExit(f"bench_train: the standard library holds {have} tokens, fewer than the {need} needed")
    seqs = np.concatenate(parts)[:need].reshape(rows, cfg.data.seq_len + 1)
    return PackedData(train=seqs, val=seqs[: cfg.trainer.global_batch_size], vocab_size=tokenizer.vocab_size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block", type=int, default=5, help="steps per alternating block")
    p.add_argument("--compile", action="store_true", help="trainer.compile=true (regional torch.compile)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the base config")
    args = p.parse_args()

    extra = ["logger=none", "trainer.progress=false"] + (["trainer.compile=true"] if args.compile else [])
    cfg = validate(compose_without_hydra([*args.overrides, *extra]))
    device = resolve_device(cfg.trainer.device, 0)
    pc = ParallelContext(device=device)
    if device.type == "cuda":
        peak, peak_what = measured_gemm_tflops(device, torch.bfloat16, n=8192), "bf16 8192^3 GEMM"
    else:
        peak, peak_what = measured_gemm_tflops(device), "fp32 1024^3 GEMM"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), measured peak {peak:.1f} TFLOP/s ({peak_what}), torch {torch.__version__}")
    data = plain_file_data(cfg, cfg.trainer.global_batch_size * (args.warmup + args.steps))
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {k: Trainer(c, Path(tmp), pc, data) for k, c in (("moe", cfg), ("dense", validate(dense_twin(cfg))))}
        for key, tr in trainers.items():
            m = tr.model
            print(
                f"{key:>5}: {m.num_params() / 1e6:.2f}M params, {m.num_params(active=True) / 1e6:.2f}M active, "
                f"{tr.flops_per_token / 1e6:.1f} MFLOPs/token, precision {getattr(tr.module, 'dtype', None) or 'fp32'}"
            )
        batch = trainers["moe"].loader.next_batch()
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        first_step = {}
        for key, tr in trainers.items():
            for i in range(args.warmup):
                t0 = time.perf_counter()
                loss = tr.train_step(batch).loss
                sync(device)
                if i == 0:
                    first_step[key] = time.perf_counter() - t0
                    print(f"{key:>5}: first step {first_step[key]:.1f} s (loss {loss.item():.4f})")
        elapsed = {k: 0.0 for k in trainers}
        done = 0
        while done < args.steps:
            n = min(args.block, args.steps - done)
            for key, tr in trainers.items():
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    tr.train_step(tr.loader.next_batch())
                sync(device)
                elapsed[key] += time.perf_counter() - t0
            done += n
    tps = {k: tokens * args.steps / v for k, v in elapsed.items()}
    mfu = {k: tps[k] * trainers[k].flops_per_token / (peak * 1e12) for k in trainers}
    print("\n| model | tokens/s | ms/step | MFU | first step s |\n| --- | ---: | ---: | ---: | ---: |")
    for key in trainers:
        print(
            f"| {key} | {tps[key]:,.0f} | {elapsed[key] / args.steps * 1e3:.1f} | {mfu[key]:.1%} | "
            f"{first_step.get(key, float('nan')):.1f} |"
        )
    print(
        f"\nMoE / dense tokens/s: {tps['moe'] / tps['dense']:.2f}x  "
        f"({args.steps} steps each, {tokens} tokens/step, device {device}"
        + (", compiled" if args.compile else "")
        + ")"
    )


if __name__ == "__main__":
    main()
