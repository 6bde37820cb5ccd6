"""Memory per rank and training tokens/s: ``parallel.fsdp=true`` against the replicated native engine.

Run under torchrun; both trainers train the same model on the same data in the same processes, timed in
alternating blocks of steps so machine noise hits them alike. Per rank it reports, in MiB:

- **parameters, gradients, AdamW moments** held between steps: the local bytes (a DTensor's shard), split into
  the non-expert part (what FSDP shards over all W ranks) and the routed experts (EP-sharded; FSDP also shards
  them over the W / ep ranks holding the same experts);
- **activations**: the peak bytes saved for backward during one micro-batch's forward (autograd's
  saved-tensor hooks, each storage counted once, parameters' storages excluded: FSDP's gathered weights are
  reported apart);
- **gathered weights**: the peak bytes of unsharded (all-gathered) parameters alive at once during forward
  and backward (FSDP only; the transient cost of sharding);

and the loss after the last step (equal within fp32 tolerance: the same training).

    torchrun --standalone --nproc_per_node=4 scripts/bench_fsdp.py
    torchrun --standalone --nproc_per_node=4 scripts/bench_fsdp.py -- parallel.ep=2
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
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain.config import TrainConfig, validate
from moetrain.parallel import init_parallel
from moetrain.parallel.expert_parallel import expert_parameters
from moetrain.train.cli import config_dir, make_trainer

MIB = 2.0**20
DEFAULTS = [
    "model.dim=256",
    "model.n_layers=4",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.ffn_hidden_size=1024",
    "model.first_k_dense=1",
    "moe.num_experts=8",
    "moe.top_k=2",
    "moe.expert_hidden_size=256",
    "moe.num_shared_experts=1",
    "data.seq_len=128",
    "trainer.global_batch_size=16",
    "trainer.micro_batch_size=2",
    "trainer.precision=fp32",
]


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def state_mib(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Local parameter and AdamW-moment bytes, non-expert and expert, in MiB (gradients, freed by
    ``zero_grad(set_to_none=True)`` between steps, are one more copy of the parameters while they live)."""
    expert_ids = {id(p) for p in expert_parameters(model)}
    out = dict.fromkeys(("params", "adam", "params_experts", "adam_experts"), 0.0)
    for p in model.parameters():
        suffix = "_experts" if id(p) in expert_ids else ""
        out["params" + suffix] += _local_bytes(p) / MIB
        for t in optimizer.state.get(p, {}).values():
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                out["adam" + suffix] += _local_bytes(t) / MIB
    return out


def _fsdp_params(model: nn.Module) -> list[Any]:
    """FSDP2's per-parameter records of every unit (private API: a benchmark may look inside)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    return [fp for u in units for g in u._get_fsdp_state()._fsdp_param_groups for fp in g.fsdp_params]


def _unsharded(fsdp_params: list[Any]) -> list[torch.Tensor]:
    """The all-gathered parameters (their storage is freed, size 0, while resharded)."""
    return [t for fp in fsdp_params if (t := getattr(fp, "_unsharded_param", None)) is not None]


class MemoryProbe:
    """While active: the peak over micro-batches of the bytes saved for backward by one forward (each storage once;
    parameters' storages, FSDP's all-gathered ones included, excluded: a micro-batch's saved tensors are freed
    by its backward, so the count restarts at each forward of the model), and the peak bytes of FSDP's
    all-gathered parameters alive at once, sampled at every module's forward and at every saved tensor the
    backward unpacks (when each unit computes)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.peak, self.gathered_peak = model, 0, 0
        self._seen: set[int] = set()
        self._bytes = 0
        self._fsdp = _fsdp_params(model)

    def __enter__(self) -> MemoryProbe:
        self._params = {p.untyped_storage().data_ptr() for p in self.model.parameters() if not isinstance(p, DTensor)}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        self._handles = [self.model.register_forward_pre_hook(self._start)]
        self._handles += [m.register_forward_pre_hook(self._sample) for m in self.model.modules()]
        return self

    def _start(self, *_: Any) -> None:
        self._seen, self._bytes = set(), 0

    def _sample(self, *_: Any) -> None:
        gathered = sum(t.untyped_storage().nbytes() for t in _unsharded(self._fsdp))
        self.gathered_peak = max(self.gathered_peak, gathered)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        params = self._params | {u.untyped_storage().data_ptr() for u in _unsharded(self._fsdp)}
        if key not in self._seen and key not in params:
            self._seen.add(key)
            self._bytes += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self._bytes)
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        self._sample()
        return t

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._hooks.__exit__(*exc)


def run_block(tr: Any, n: int) -> tuple[int, float]:
    tokens, loss = 0, 0.0
    for _ in range(n):
        batch = tr.loader.next_batch()
        out = tr.train_step(batch)
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        loss = out.loss.item()
    return tokens, loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block", type=int, default=3, help="steps per alternating block")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the base config")
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = ["logger=none", "trainer.progress=false", "parallel.ep=1", "trainer.num_threads=1"]
    base += [
        "checkpoint.enabled=false",
        "trainer.resume=none",
        "trainer.eval_every=0",
        "trainer.eval_at_start=false",
        *DEFAULTS,
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg: TrainConfig = OmegaConf.to_object(compose("train", overrides=[*base, *args.overrides]))  # type: ignore[assignment]
    pc = init_parallel(cfg.parallel, cfg.trainer.device, num_experts=cfg.moe.num_experts)
    with tempfile.TemporaryDirectory() as tmp:
        trainers, probes = {}, {}
        for fsdp in (False, True):
            c = copy.deepcopy(cfg)
            c.parallel.fsdp = fsdp
            name = "FSDP" if fsdp else "replicated"
            trainers[name] = tr = make_trainer(validate(c, world), Path(tmp) / name, pc)
            with MemoryProbe(tr.model) as probes[name]:  # the warm-up steps' micro-batches
                run_block(tr, args.warmup)
        times, tokens, last = dict.fromkeys(trainers, 0.0), dict.fromkeys(trainers, 0), {}
        done = 0
        while done < args.steps:
            n = min(args.block, args.steps - done)
            for name, tr in trainers.items():
                pc.barrier()
                t0 = time.perf_counter()
                got, last[name] = run_block(tr, n)
                pc.barrier()
                times[name] += time.perf_counter() - t0
                tokens[name] += got
            done += n
        mem = {name: state_mib(tr.model, tr.optimizer) for name, tr in trainers.items()}
        report(cfg, world, args, trainers, mem, probes, times, tokens, last, pc)
    pc.close()


def report(cfg: TrainConfig, world: int, args: Any, trainers: dict[str, Any], mem: dict[str, dict[str, float]],
           probes: dict[str, MemoryProbe], times: dict[str, float], tokens: dict[str, int],
           last: dict[str, float], pc: Any) -> None:  # fmt: skip
    """Rank 0 prints one table row per trainer (every rank's own numbers are equal up to expert rounding)."""
    if not pc.is_main:
        return
    m = trainers["replicated"].model
    print(
        f"{m.num_params() / 1e6:.2f}M params, world {world}, ep {cfg.parallel.ep}, fp32, {args.steps} timed steps of "
        f"{cfg.trainer.global_batch_size} x {cfg.data.seq_len} tokens, micro-batch {cfg.trainer.micro_batch_size}"
    )
    print(
        "| run | non-expert params + grads + AdamW, MiB | experts params + grads + AdamW, MiB | peak activations, MiB "
        "| gathered weights peak, MiB | total, MiB | tokens/s | × replicated | loss after last step |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base_tps = tokens["replicated"] / times["replicated"]
    for name in trainers:
        s = mem[name]
        dense = (s["params"], s["params"], s["adam"])  # grads: one more copy of the params (freed between steps)
        experts = (s["params_experts"], s["params_experts"], s["adam_experts"])
        act, gathered = probes[name].peak / MIB, probes[name].gathered_peak / MIB
        total = sum(dense) + sum(experts) + act + gathered
        tps = tokens[name] / times[name]
        print(
            f"| {name} | {' + '.join(f'{v:.2f}' for v in dense)} = {sum(dense):.2f} "
            f"| {' + '.join(f'{v:.2f}' for v in experts)} = {sum(experts):.2f} | {act:.2f} | {gathered:.2f} "
            f"| {total:.2f} | {tps:,.0f} | {tps / base_tps:.2f} | {last[name]:.5f} |"
        )


if __name__ == "__main__":
    main()
