"""MoE layer forward + backward under expert parallelism: shared experts overlapped with the all-to-alls vs after them.

One MoE layer with shared experts on EP gloo processes (NCCL on GPUs with ``--backend nccl``), its
routed experts sharded over them; the same layer twice, :class:`~moetrain.parallel.all_to_all.AllToAllDispatcher`
with ``overlap_work`` on (the shared experts' up projections run while the dispatch's rows are in flight,
their down projection and gate while the combine's are, and the backward mirrors it) and off (the
shared experts after the combine), timed interleaved in the same run. Also times the shared experts
alone (forward + backward): the most the overlap can hide. Reports the median over the repetitions of
the slowest rank's time, and the ratio sequential / overlapped (above 1: the overlap saves time).

    python scripts/bench_overlap.py                                   # EP=2, T=2048 tokens/rank, D=512
    python scripts/bench_overlap.py --ep 2 --tokens 4096 --dim 1024 --shared-hidden 2048 --reps 20

On CPU, gloo's worker threads copy while the main thread computes, so the overlap needs a spare core
per rank to pay off (``--threads`` torch threads per rank, plus gloo's).
"""

from __future__ import annotations

import argparse
import copy
import os
import queue
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.config import MoEConfig
from moetrain.moe.layer import MoELayer
from moetrain.parallel.all_to_all import AllToAllDispatcher
from moetrain.parallel.expert_parallel import shard_experts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _layers(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> dict[str, MoELayer]:
    """The same layer (same weights on every rank before sharding), overlapped and sequential."""
    cfg = MoEConfig(
        num_experts=args.experts, top_k=args.top_k, expert_hidden_size=args.hidden, num_shared_experts=1,
        shared_hidden_size=args.shared_hidden, shared_expert_gate=True,
    )  # fmt: skip
    layer = MoELayer(args.dim, cfg, num_groups=world)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02, generator=g)
    out = {}
    for name, overlap_work in (("overlapped", True), ("sequential", False)):
        m = copy.deepcopy(layer)
        shard_experts(m.experts, world, rank)
        m.dispatcher = AllToAllDispatcher(
            args.experts, world, rank, dist.group.WORLD, rank, world, overlap_work=overlap_work
        )
        out[name] = m.to(device)
    return out


def _step(layer: MoELayer, x: torch.Tensor, shared_only: bool) -> None:
    if shared_only:
        y = layer._shared_work(x.view(-1, x.shape[-1])).run()
        y.square().mean().backward()
    else:
        y, stats = layer(x)
        (y.square().mean() + stats.aux_loss).backward()
    layer.zero_grad(set_to_none=True)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    try:
        layers = _layers(rank, world, args, device)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(1, args.tokens, args.dim, generator=g).to(device).requires_grad_()
        runs = {name: (layer, False) for name, layer in layers.items()}
        runs["shared alone"] = (layers["sequential"], True)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for rep in range(args.warmup + args.reps):
            for name, (layer, shared_only) in runs.items():  # interleaved: noise hits all alike
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                _step(layer, x, shared_only)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rep >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        med = torch.tensor([statistics.median(times[name]) for name in runs])
        dist.all_reduce(med, op=dist.ReduceOp.MAX)  # the slowest rank's median
        if rank == 0:
            out.put({name: float(t) * 1e3 for name, t in zip(runs, med)})
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ep", type=int, default=2, help="EP size (= processes)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of one routed expert")
    ap.add_argument("--shared-hidden", type=int, default=1024, help="hidden size of the shared expert")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = ap.parse_args()
    if args.experts % args.ep:
        raise SystemExit(f"--experts {args.experts} is not divisible by --ep {args.ep}")

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.ep, port, args, q)) for r in range(args.ep)]
    for p in procs:
        p.start()
    while True:  # rank 0 reports; stop at once if any rank died
        try:
            ms = q.get(timeout=5)
            break
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.terminate()
                raise SystemExit("a rank failed (see its traceback above)") from None
    for p in procs:
        p.join()

    print(
        f"MoE layer fwd+bwd, EP={args.ep} ({args.backend}): {args.tokens} tokens/rank, D={args.dim}, "
        f"N={args.experts}, K={args.top_k}, expert hidden {args.hidden}, shared hidden {args.shared_hidden} (gated); "
        f"median of {args.reps}, slowest rank, x{args.threads} threads/rank"
    )
    for name, t in ms.items():
        print(f"  {name:<12} {t:9.2f} ms")
    ratio = ms["sequential"] / ms["overlapped"]
    print(f"  sequential / overlapped = {ratio:.3f}x  (saved {ms['sequential'] - ms['overlapped']:.2f} ms a layer)")


if __name__ == "__main__":
    main()
