"""How long one checkpoint save takes, and how big it is, for the default model (or any overrides).

    python scripts/time_checkpoint_save.py                       # the default run's model, on this machine
    python scripts/time_checkpoint_save.py model=small --repeat 5 --dir /scratch/x

A save is what ``CheckpointManager.save`` does at a step (and what a SIGTERM asks for before the
scheduler's grace period ends, SLURM's ``KillWait``, 30 s by default): the weights-finite check, the DCP
write of model + AdamW moments + RNG, every file's SHA-256 into ``meta.json``, the atomic rename and the
pruning. The model is built as the trainer builds it (no data is read: a byte-tokenizer vocabulary
stands in for the corpus's), the optimizer takes one step so its moments exist, and the save is
repeated ``--repeat`` times; the output is one JSON line with the size in bytes and each save's
seconds. Time it on a quiet machine: the numbers are the disk's and the CPU's as much as moetrain's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moetrain.config.docs import composed_defaults
from moetrain.data import build_tokenizer
from moetrain.model.transformer import vocab_for
from moetrain.parallel.context import ParallelContext
from moetrain.train.checkpoint import CheckpointManager, arch_of
from moetrain.train.trainer import Progress, build_parallel_model, build_train_module, setup_torch


class _NoLoader:
    """The loader position a checkpoint records, without reading any data."""

    def state_dict(self) -> dict:
        return {}


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training config (default: none)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    cfg = composed_defaults(args.overrides)
    cfg.checkpoint.keep_last = 1
    setup_torch(cfg)
    pc = ParallelContext()
    vocab = vocab_for(cfg.model, build_tokenizer(cfg.data.tokenizer).vocab_size)
    model = build_parallel_model(cfg, vocab, None, pc)
    module = build_train_module(cfg, model, pc)
    for param in model.parameters():  # one optimizer step: AdamW's moments exist, as in a real checkpoint
        param.grad = torch.zeros_like(param)
    module.optimizer.step()  # type: ignore[attr-defined]
    root = Path(args.dir or tempfile.mkdtemp(prefix="moetrain-save-"))
    progress = Progress(_NoLoader())
    manager = CheckpointManager(cfg, root, pc, module, progress, arch_of(cfg, model))
    seconds = []
    for i in range(args.repeat):
        progress.step = i + 1
        start = time.perf_counter()
        path = manager.save()
        manager.wait()
        seconds.append(round(time.perf_counter() - start, 3))
    size = checkpoint_bytes(path)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"overrides": args.overrides, "params": params, "checkpoint_bytes": size, "save_s": seconds}))
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
