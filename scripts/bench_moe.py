"""Forward + backward time and peak memory of one MoE layer, against the floor and peers.

For each shape it times, in the same run and interleaved (so machine noise hits
all alike):

* ``moetrain``   — ``moetrain.moe.MoELayer`` as the trainer runs it: an fp32 input (the residual stream)
  that needs its gradient, under bf16 autocast on GPU (router fp32; experts, dispatch and combine in bf16);
* ``moetrain_bf16_in`` — the same layer fed bf16 rows directly (GPU);
* ``moetrain_triton`` — the same layer with its segment GEMMs forced to the Triton kernels (GPU);
* ``dense``      — the floor: dense SwiGLU GEMMs of the same active FLOPs (hidden (K + shared) * F on T
  tokens), fed and run like ``moetrain``;
* ``hf_eager``   — transformers' eager experts loop (``MixtralExperts``) with the same weights and routing;
* ``hf_grouped`` — the same transformers module with ``experts_implementation="grouped_mm"``. On GPU both
  transformers modules get their best case: bf16 weights and bf16 rows (no casts, no fp32 master weights);
* ``deepspeed``  — ``deepspeed.moe.layer.MoE`` at the matching config (top-K softmax gate, experts of the
  same size, dropless: ``drop_tokens=False``), where DeepSpeed is installed. Its gate is its own, so its
  output is timed, not compared.

The outputs of ``moetrain`` and ``hf_eager`` are checked equal before timing. Peak
memory: on GPU ``torch.cuda.max_memory_allocated`` over one forward+backward, in this
process; on CPU in a fresh subprocess per (implementation, shape) as the growth of the
heap bytes in use (glibc ``mallinfo2``, sampled after every aten op: :class:`HeapPeak`).

Defaults: on GPU the shapes of the GPU issue (D=768, T=16384; fine-grained 64 experts
top-6 F=256 + 2 shared, Mixtral-like 8 experts top-2 F=1024), bf16, 20 repetitions; on
CPU smaller shapes (D=512), fp32, 4096 tokens, 5 repetitions.

    python scripts/bench_moe.py                      # all shapes, all implementations
    python scripts/bench_moe.py --shapes fine --tokens 4096 8192 --reps 5
    python scripts/bench_moe.py --profile            # + the top kernels of moetrain's fwd+bwd (torch.profiler)
    python scripts/bench_moe.py --memory-scaling --tokens 1024 2048 4096   # peak memory only, linear in T?
    python scripts/bench_moe.py --keep-freed-memory   # CPU: no fresh page faults for big buffers
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout, not installed

from moetrain.config import MoEConfig, RouterConfig
from moetrain.moe import MoELayer
from moetrain.moe.dispatch import default_slot_sum


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    num_experts: int
    top_k: int
    hidden: int
    shared: int


CPU_SHAPES = {
    "fine": Shape("fine-grained (64 experts, top-6, 2 shared)", 512, 64, 6, 128, 2),
    "mixtral": Shape("Mixtral-like (8 experts, top-2)", 512, 8, 2, 1024, 0),
}
GPU_SHAPES = {
    "fine": Shape("fine-grained (64 experts, top-6, 2 shared)", 768, 64, 6, 256, 2),
    "mixtral": Shape("Mixtral-like (8 experts, top-2)", 768, 8, 2, 1024, 0),
}
SHAPES = CPU_SHAPES  # the shapes of this run (main() picks GPU_SHAPES on a GPU; subprocesses are told)
IMPLS = ("moetrain", "moetrain_bf16_in", "moetrain_triton", "dense", "hf_eager", "hf_grouped", "deepspeed")
GPU_ONLY = ("moetrain_bf16_in", "moetrain_triton")


def active_flops(shape: Shape, tokens: int) -> float:
    """GEMM FLOPs of one forward + backward (3x the forward's 6 * T * D * hidden) of the active experts."""
    return 3 * 6 * tokens * shape.dim * (shape.top_k + shape.shared) * shape.hidden


def make_layer(shape: Shape, device: torch.device) -> MoELayer:
    cfg = MoEConfig(
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        expert_hidden_size=shape.hidden,
        num_shared_experts=shape.shared,
        router=RouterConfig(norm_topk_prob=shape.shared == 0),
    )
    cfg.balance.expert_coef = 0.0
    torch.manual_seed(0)
    layer = MoELayer(shape.dim, cfg).to(device)
    layer.dispatcher.slot_sum = default_slot_sum(device)  # the un-permutation a model built for this device takes
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    return layer


class DenseFloor(nn.Module):
    """SwiGLU with hidden K*F (+ shared): the GEMM FLOPs the MoE layer does per token, with no routing."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        hidden = (shape.top_k + shape.shared) * shape.hidden
        self.w13 = nn.Linear(shape.dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, shape.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1, h3 = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(h1) * h3)


class HFExperts(nn.Module):
    """moetrain's router and shared experts around transformers' ``MixtralExperts`` (in ``dtype``, fed rows of it)."""

    def __init__(self, layer: MoELayer, implementation: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        cfg = MixtralConfig(
            hidden_size=layer.experts.dim,
            intermediate_size=layer.experts.hidden,
            num_local_experts=layer.num_experts,
            num_experts_per_tok=layer.top_k,
        )
        cfg._experts_implementation = implementation
        self.router, self.shared = layer.router, layer.shared
        self.experts = MixtralExperts(cfg)
        with torch.no_grad():  # ours: w13 [E, D, 2F] = [W1 | W3]; theirs: gate_up [E, 2F, D] = [gate; up]
            self.experts.gate_up_proj.copy_(layer.experts.w13.transpose(1, 2))
            self.experts.down_proj.copy_(layer.experts.w2.transpose(1, 2))
        self.experts.to(layer.experts.w13.device, dtype)
        self.dtype = dtype

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x = x_BSD.flatten(0, 1)
        r = self.router(x)
        xe = x.to(self.dtype)
        y = self.experts(xe, r.expert_idx_TK, r.weight_TK.to(self.dtype))
        if self.shared is not None:
            y = y + self.shared(xe)
        return y.view_as(x_BSD)


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_rank_group(device: torch.device) -> None:
    """A one-rank process group for DeepSpeed's MoE layer (gloo on CPU, nccl on GPU).

    The rendezvous variables are set, not defaulted: the peak-memory subprocesses
    inherit the parent's environment, whose MASTER_PORT the parent's own group holds.
    """
    import deepspeed

    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    )
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")


class DeepSpeedMoE(nn.Module):
    def __init__(self, shape: Shape, device: torch.device) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        from moetrain.moe.experts import SwiGLU

        if not torch.distributed.is_initialized():
            init_single_rank_group(device)
        self.moe = MoE(
            shape.dim,
            expert=SwiGLU(shape.dim, shape.hidden),
            num_experts=shape.num_experts,
            k=shape.top_k,
            drop_tokens=False,
            use_rts=False,
            min_capacity=0,
        ).to(device)
        from moetrain.moe.experts import SwiGLU as Shared

        self.shared = Shared(shape.dim, shape.shared * shape.hidden).to(device) if shape.shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.moe(x)[0]
        return y + self.shared(x) if self.shared is not None else y


def build(impl: str, shape: Shape, device: torch.device) -> nn.Module:
    layer = make_layer(shape, device)
    hf_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if impl == "moetrain":
        return _Wrap(layer)
    if impl == "moetrain_bf16_in":
        return _Wrap(layer, cast=torch.bfloat16)
    if impl == "moetrain_triton":
        layer.experts.gemm_backend = "triton"
        return _Wrap(layer)
    if impl == "dense":
        return DenseFloor(shape).to(device)
    if impl == "hf_eager":
        return HFExperts(layer, "eager", hf_dtype)
    if impl == "hf_grouped":
        return HFExperts(layer, "grouped_mm", hf_dtype)
    if impl == "deepspeed":
        return DeepSpeedMoE(shape, device)
    raise ValueError(impl)


class _Wrap(nn.Module):
    def __init__(self, layer: MoELayer, cast: torch.dtype | None = None) -> None:
        super().__init__()
        self.layer, self.cast = layer, cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x if self.cast is None else x.to(self.cast))[0]


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> None:
    module(x).float().square().mean().backward()
    module.zero_grad(set_to_none=True)
    x.grad = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_equal(shape: Shape, device: torch.device, dtype: torch.dtype) -> float:
    """Max abs difference between moetrain's and transformers' eager outputs (same weights and routing, fp32)."""
    layer = make_layer(shape, device)
    hf = HFExperts(layer, "eager")
    x = torch.randn(2, 64, shape.dim, device=device)
    with torch.no_grad():
        return (layer(x)[0] - hf(x)).abs().max().item()


def time_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn()`` after two warm-up calls."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def primitives(shape: Shape, tokens: int, device: torch.device, dtype: torch.dtype, reps: int) -> None:
    """The dispatch/combine building blocks alone at this shape: the two slot-sum implementations (the
    combine forward and the dispatch backward), the row gather, and the segment-GEMM backends' up-projection."""
    from moetrain.moe.dispatch import sum_token_slots
    from moetrain.moe.experts import segment_gemm

    T, K, D = tokens, shape.top_k, shape.dim
    rows = torch.randn(T * K, D, device=device, dtype=dtype)
    x = torch.randn(T, D, device=device, dtype=dtype)
    inverse = torch.randperm(T * K, device=device).view(T, K)
    token_R = inverse.reshape(-1).argsort() // K
    w13 = torch.randn(shape.num_experts, D, 2 * shape.hidden, device=device, dtype=dtype)
    counts = torch.full((shape.num_experts,), T * K // shape.num_experts, device=device)
    counts[0] += T * K - int(counts.sum())
    gbytes = (rows.numel() + x.numel()) * rows.element_size() / 1e9
    print(f"\nprimitives, {shape.name}, {tokens} tokens ({dtype}): ms (GB/s for the memory-bound ones)")
    print("| primitive | ms | GB/s |\n| --- | ---: | ---: |")
    for name, fn, gb in (
        ("slot sum: embedding_bag", lambda: sum_token_slots(rows, inverse, "embedding_bag"), gbytes),
        ("slot sum: gather + sum", lambda: sum_token_slots(rows, inverse, "gather_sum"), gbytes),
        *(
            [("slot sum: triton", lambda: sum_token_slots(rows, inverse, "triton"), gbytes)]
            if device.type == "cuda"
            else []
        ),
        ("row gather x[token_R]", lambda: x.index_select(0, token_R), gbytes),
    ):
        ms = time_ms(fn, device, reps)
        print(f"| {name} | {ms:.3f} | {gb / ms * 1e3:.0f} |")
    for backend in ("grouped_mm", "triton", "loop") if device.type == "cuda" else ("grouped_mm", "loop"):
        try:
            gemm = segment_gemm(rows, counts, (D, shape.hidden), backend)
            ms = time_ms(lambda g=gemm: g.mm(rows, w13), device, reps)
            tf = 2 * T * K * D * 2 * shape.hidden / ms / 1e9
            print(f"| up-projection, {backend} | {ms:.3f} | ({tf:.0f} TFLOP/s) |")
        except Exception as e:  # a backend that cannot run here is reported, not fatal
            print(f"| up-projection, {backend} | failed: {type(e).__name__}: {str(e).splitlines()[0][:60]} | |")


def cuda_peak_mib(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> float:
    """Peak bytes allocated on the GPU above what was allocated before one forward+backward."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        fwd_bwd(module, x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def profile_table(module: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype, rows: int = 25) -> str:
    """torch.profiler's top ``rows`` ops by device (GPU) or CPU self time over three forward+backward passes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                fwd_bwd(module, x)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def time_all(
    shape: Shape,
    tokens: int,
    reps: int,
    impls: list[str],
    device: torch.device,
    dtype: torch.dtype,
    input_grad: bool = False,
):
    modules, failed = {}, {}
    for impl in impls:
        try:
            modules[impl] = build(impl, shape, device)
            x = torch.randn(1, tokens, shape.dim, device=device, requires_grad=input_grad)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                fwd_bwd(modules[impl], x)
        except Exception as e:  # an implementation that cannot run this shape is reported, not fatal
            failed[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            modules.pop(impl, None)
    times: dict[str, list[float]] = {k: [] for k in modules}
    x = torch.randn(1, tokens, shape.dim, device=device, requires_grad=input_grad)
    for _ in range(2 if device.type == "cuda" else 0):  # warm-up: cuBLAS/CUTLASS/Triton selection, allocator
        for module in modules.values():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                fwd_bwd(module, x)
    for _ in range(reps):
        for impl, module in modules.items():  # interleaved
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                fwd_bwd(module, x)
            sync(device)
            times[impl].append(time.perf_counter() - t0)
    mems = {k: cuda_peak_mib(m, x, dtype) for k, m in modules.items()} if device.type == "cuda" else {}
    return {k: statistics.median(v) for k, v in times.items()}, failed, mems, modules, x


class HeapPeak(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes in use on the CPU heap (glibc ``mallinfo2``: small blocks + mmapped blocks),
    sampled after every aten op of the forward and backward (CPU autograd runs on this thread)."""

    def __init__(self) -> None:
        super().__init__()
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [
                (n, ctypes.c_size_t)
                for n in (
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                )
            ]

        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = MallInfo2
        self.base = self.in_use()
        self.peak = self.base

    def in_use(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def peak_memory_child(impl: str, shape_key: str, tokens: int, device: str, dtype: str) -> None:
    """Run in a subprocess: print the peak extra memory (MiB) of one forward+backward."""
    global SHAPES
    SHAPES = GPU_SHAPES if device.startswith("cuda") else CPU_SHAPES
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    module = build(impl, SHAPES[shape_key], dev)
    x = torch.randn(1, tokens, SHAPES[shape_key].dim, device=dev)
    with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
        fwd_bwd(module, x)  # warm-up: lazy state (autocast caches, DeepSpeed groups) is not counted
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            fwd_bwd(module, x)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with HeapPeak() as heap, torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            fwd_bwd(module, x)
        peak = heap.peak - heap.base
    print(json.dumps({"peak_mib": peak / 2**20}))


def peak_memory(impl: str, shape_key: str, tokens: int, device: torch.device, dtype: str) -> float | None:
    cmd = [sys.executable, __file__, "--child", impl, shape_key, str(tokens), str(device), dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["peak_mib"]
    return None


def memory_scaling(shape_key: str, tokens: list[int], impls: list[str], device: torch.device, dtype: str) -> None:
    """Print the peak MiB of one forward+backward at each token count and the growth per 1k extra tokens
    between successive counts: equal growths mean memory linear in tokens (the fixed part is mostly
    the weight gradients)."""
    tokens = sorted(tokens)
    print(f"\n{SHAPES[shape_key].name}: peak MiB of one forward+backward")
    steps = [f"{a}->{b}" for a, b in itertools.pairwise(tokens)]
    print(
        "| implementation | "
        + " | ".join(f"{t} tokens" for t in tokens)
        + " | MiB per 1k more tokens, "
        + ", ".join(steps)
        + " |"
    )
    print("| --- |" + " ---: |" * (len(tokens) + 1))
    for impl in impls:
        mems = [peak_memory(impl, shape_key, t, device, dtype) for t in tokens]
        growth = [
            f"{(m2 - m1) * 1000 / (t2 - t1):.1f}" if m1 is not None and m2 is not None else "n/a"
            for (t1, m1), (t2, m2) in itertools.pairwise(zip(tokens, mems))
        ]
        cells = [f"{m:.0f}" if m is not None else "n/a" for m in mems]
        print(f"| {impl} | " + " | ".join(cells) + " | " + ", ".join(growth) + " |")


def main() -> None:
    global SHAPES
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="default: 16384 on GPU, 4096 on CPU")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--reps", type=int, default=None, help="default: 20 on GPU, 5 on CPU")
    p.add_argument("--profile", action="store_true", help="print the top kernels of moetrain's forward+backward")
    p.add_argument("--primitives", action="store_true", help="also time the dispatch/combine building blocks alone")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-subprocess peak memory runs")
    p.add_argument(
        "--input-grad",
        action="store_true",
        help="time with the layer's input requiring its gradient too, as inside a model (peak memory runs without)",
    )
    p.add_argument(
        "--memory-scaling",
        action="store_true",
        help="no timing: peak memory at every --tokens count, and MiB per 1k tokens (is it linear in tokens?)",
    )
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="CPU: rerun with glibc malloc told never to mmap nor trim (MALLOC_MMAP_MAX_=0, "
        "MALLOC_TRIM_THRESHOLD_), so freed buffers are reused instead of page-faulted in afresh; "
        "applies to every implementation alike",
    )
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.keep_freed_memory and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        os.environ.update({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)})
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.child:
        impl, shape_key, tokens, device, dtype = args.child
        peak_memory_child(impl, shape_key, int(tokens), device, dtype)
        return

    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    on_gpu = device.type == "cuda"
    SHAPES = GPU_SHAPES if on_gpu else CPU_SHAPES
    args.tokens = args.tokens or ([16384] if on_gpu else [4096])
    args.reps = args.reps or (20 if on_gpu else 5)
    args.input_grad = args.input_grad or on_gpu  # as the trainer runs it: the residual stream needs its gradient
    if not on_gpu:
        args.impls = [i for i in args.impls if i not in GPU_ONLY]
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"{dtype_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps}"
        + (", glibc malloc keeping freed memory" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "")
    )
    if args.memory_scaling:
        for key in args.shapes:
            memory_scaling(key, args.tokens, args.impls, device, dtype_name)
        return
    for key in args.shapes:
        shape = SHAPES[key]
        if "hf_eager" in args.impls:
            print(
                f"\n## {shape.name}, D={shape.dim}, F={shape.hidden}: max |moetrain - hf_eager| = "
                f"{check_equal(shape, device, dtype):.2e}"
            )
        for tokens in args.tokens:
            times, failed, mems, modules, x = time_all(
                shape, tokens, args.reps, args.impls, device, dtype, args.input_grad
            )
            ours = times.get("moetrain")
            flops = active_flops(shape, tokens)
            print(
                f"\n{shape.name}, D={shape.dim}, F={shape.hidden}, {tokens} tokens"
                + (", fp32 input that needs its gradient (as in the trainer)" if args.input_grad else "")
            )
            print(
                "| implementation | fwd+bwd ms | ratio to dense floor | moetrain speed-up | active TFLOP/s | peak MiB |"
            )
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for impl in args.impls:
                if impl in failed:
                    print(f"| {impl} | failed: {failed[impl]} | | | | |")
                    continue
                t = times[impl]
                floor = f"{t / times['dense']:.2f}x" if "dense" in times else ""
                speedup = f"{t / ours:.2f}x" if ours else ""
                if on_gpu:
                    mem = mems.get(impl)
                else:
                    mem = None if args.no_memory else peak_memory(impl, key, tokens, device, dtype_name)
                mem_s = f"{mem:.0f}" if mem is not None else "n/a"
                print(f"| {impl} | {t * 1e3:.2f} | {floor} | {speedup} | {flops / t / 1e12:.3g} | {mem_s} |")
            if args.primitives:
                primitives(shape, tokens, device, dtype, args.reps)
            if args.profile and "moetrain" in modules:
                print(f"\nprofile of moetrain, {shape.name}, {tokens} tokens:")
                print(profile_table(modules["moetrain"], x, device, dtype))


if __name__ == "__main__":
    main()
