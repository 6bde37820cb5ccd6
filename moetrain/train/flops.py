"""Model FLOPs per token and device peak FLOP/s, for MFU."""

from __future__ import annotations

import time

import torch

from moetrain.model.mla import attention_score_flops
from moetrain.model.transformer import Transformer

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of common training GPUs.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active non-embedding parameters (routed experts
    counted K of N, LM head included) plus the attention scores, 12 L D S for GQA
    (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B; MLA's widths:
    :func:`~moetrain.model.mla.attention_score_flops`)."""
    active = model.num_params(active=True) - model.embed.weight.numel()
    if model.cfg.tie_embeddings:
        active += model.embed.weight.numel()  # the tied head still does its matmul
    return 6.0 * active + attention_score_flops(model.cfg, seq_len)


def measured_gemm_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """Achieved TFLOP/s of an n x n matmul on ``device``: the CPU 'peak' for MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 5
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def peak_tflops(device: torch.device, configured: float | None) -> tuple[float, str]:
    """The peak used for MFU and where it came from."""
    if configured is not None:
        return configured, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"table ({name})"
    return measured_gemm_tflops(device), "measured fp32 GEMM"


def mfu(tokens_per_sec: float, flops_per_token: float, peak_tflops: float, world_size: int) -> float:
    """Model FLOPs utilisation of a job: the model FLOP/s it achieves over every rank's peak (PaLM, Chowdhery et
    al. 2022, arXiv 2204.02311, appendix B). ``tokens_per_sec`` is the whole job's and ``peak_tflops`` one rank's
    device (or, on CPU, one rank's measured GEMM rate), so the job's peak is ``world_size`` of them."""
    return tokens_per_sec * flops_per_token / (peak_tflops * 1e12 * max(world_size, 1))
