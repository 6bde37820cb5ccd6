"""Expert-parallel dispatch + combine: deduplicated (one row per (token, rank)) vs naive (one per (token, expert)).

For each EP size (gloo processes on this machine; NCCL on GPUs with ``--backend
nccl``) and each M (device-limited routing: a token's K experts lie on at most M
ranks, DeepSeek-V2 sec. 2.2.2), it times dispatch + expert stand-in + combine,
forward and backward, of :class:`moetrain.parallel.all_to_all.AllToAllDispatcher` and
:class:`NaiveAllToAllDispatcher` in the same run, interleaved, and reads the
bytes each rank sent to the other ranks from the dispatcher's own counters
(``comm_bytes``: dispatch rows + metadata + combine rows). Rows per token count
every (token, rank) row, the ones a rank keeps for itself included.

    python scripts/bench_dispatch.py                          # EP 2 and 4, M = 1, 2, all ranks
    python scripts/bench_dispatch.py --ep 2 4 8 --tokens 4096 --dim 1024 --experts 64 --top-k 6
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.moe.dispatch import count_per_bin, inverse_permutation
from moetrain.moe.routing import topk_experts
from moetrain.parallel.all_to_all import AllToAllDispatcher, CommStats


class NaiveAllToAllDispatcher(AllToAllDispatcher):
    """The naive dispatcher, the benchmark's baseline: one row per (token, expert), in (destination,
    assignment) order, instead of one per (token, destination rank)."""

    def _rows(self, T: int, token_idx_A: torch.Tensor, dest_A: torch.Tensor) -> tuple[Any, ...]:
        A = token_idx_A.numel()
        order = (dest_A * max(A, 1) + torch.arange(A, device=dest_A.device)).argsort()
        row_of_A = inverse_permutation(order)
        return count_per_bin(dest_A, self.ep_size), row_of_A, lambda n: token_idx_A[order[:n]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _routing(rank: int, args: argparse.Namespace, ep: int, m: int) -> tuple[torch.Tensor, ...]:
    """Random softmax router scores of this rank's tokens, device-limited top-K over ``ep`` groups."""
    g = torch.Generator().manual_seed(1000 * ep + 10 * m + rank)
    logits = torch.randn(args.tokens, args.experts, generator=g)
    scores = logits.softmax(-1)
    idx_TK = topk_experts(scores, args.top_k, num_groups=ep, topk_groups=m if m < ep else None)
    weight_TK = scores.gather(1, idx_TK)
    token_A = torch.arange(args.tokens).repeat_interleave(args.top_k)
    return token_A, idx_TK.reshape(-1), weight_TK.reshape(-1)


def _one_pass(
    disp: AllToAllDispatcher,
    x: torch.Tensor,
    token_A: torch.Tensor,
    expert_A: torch.Tensor,
    w_A: torch.Tensor,
    scale_E: torch.Tensor,
) -> CommStats | None:
    d = disp.dispatch(x, token_A, expert_A, w_A)
    y = d.rows_RD * (scale_E.repeat_interleave(d.counts_E, dim=0) * d.weight_R).unsqueeze(-1)  # cheap experts
    disp.combine(y, d.handle).sum().backward()
    return d.comm


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    try:
        results = []
        ms = sorted({m for m in args.m if m <= world} | {world})
        for m in ms:
            token_A, expert_A, w_A = (t.to(device) for t in _routing(rank, args, world, m))
            x = torch.randn(args.tokens, args.dim, device=device).requires_grad_()
            w_A.requires_grad_()
            disps = {
                name: cls(args.experts, world, rank, dist.group.WORLD, rank, world)
                for name, cls in (("dedup", AllToAllDispatcher), ("naive", NaiveAllToAllDispatcher))
            }
            scale_E = torch.rand(args.experts // world, device=device) + 0.5
            times: dict[str, list[float]] = {name: [] for name in disps}
            comms: dict[str, CommStats | None] = {}
            for rep in range(args.warmup + args.reps):
                for name, disp in disps.items():  # interleaved: noise hits both alike
                    dist.barrier()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    comms[name] = _one_pass(disp, x, token_A, expert_A, w_A, scale_E)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dist.barrier()
                    if rep >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
            row: dict[str, Any] = {"ep": world, "m": m}
            for name in disps:
                last = comms[name]
                assert last is not None
                stats = torch.tensor(
                    [float(last.bytes_sent), float(last.rows_total), float(last.rows_sent), max(times[name])]
                )
                dist.all_reduce(stats[:3])
                dist.all_reduce(stats[3:], op=dist.ReduceOp.MAX)
                n_tok = args.tokens * world
                row[f"{name}_bytes_per_token"] = stats[0].item() / n_tok
                row[f"{name}_rows_per_token"] = stats[1].item() / n_tok
                row[f"{name}_remote_rows_per_token"] = stats[2].item() / n_tok
                row[f"{name}_ms"] = statistics.median(times[name]) * 1e3
            results.append(row)
        if rank == 0:
            out.put(results)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4], help="EP sizes (= processes) to run")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2], help="M: ranks a token may use (plus M = EP)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    for ep in args.ep:
        if args.experts % ep:
            raise SystemExit(f"--experts {args.experts} is not divisible by EP size {ep}")
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, ep, port, args, q)) for r in range(ep)]
        for p in procs:
            p.start()
        while True:  # rank 0 reports; stop at once if any rank died
            try:
                rows += q.get(timeout=5)
                break
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.terminate()
                    raise SystemExit(f"a rank of the EP={ep} run failed (see its traceback above)") from None
        for p in procs:
            p.join()

    print(
        f"dispatch + combine, fwd+bwd: {args.tokens} tokens/rank, D={args.dim}, N={args.experts}, K={args.top_k}, "
        f"{args.backend}, median of {args.reps} (x{args.threads} threads/rank)"
    )
    head = (
        f"{'EP':>3} {'M':>3} | {'rows/tok':>8} {'naive':>6} | {'bytes/tok':>9} {'naive':>9} {'ratio':>6} | "
        f"{'ms':>8} {'naive ms':>8} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['ep']:>3} {r['m']:>3} | {r['dedup_rows_per_token']:>8.2f} {r['naive_rows_per_token']:>6.2f} | "
            f"{r['dedup_bytes_per_token']:>9.0f} {r['naive_bytes_per_token']:>9.0f} "
            f"{r['naive_bytes_per_token'] / max(r['dedup_bytes_per_token'], 1e-9):>5.2f}x | "
            f"{r['dedup_ms']:>8.2f} {r['naive_ms']:>8.2f} {r['naive_ms'] / max(r['dedup_ms'], 1e-9):>5.2f}x"
        )
    print("ratio = naive / dedup (higher = the deduplicated dispatcher saves more)")
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
