"""Triton kernels of the MoE layer: segment (grouped) GEMMs where ``torch._grouped_mm`` has no fast path,
and the un-permutation as one pass (:func:`slot_sum`).

Shape suffixes: R rows grouped by expert into E contiguous segments, K the
contraction dim, N the output dim. ``offs_E`` are the cumulative segment ends
(int32, on the device): segment e is rows ``[offs[e-1], offs[e])``.

``torch._grouped_mm`` runs its CUTLASS kernels only for bf16 on sm90/sm100;
for fp32, fp16 or older GPUs it falls back to a loop that copies ``offs`` to
the host (a synchronisation per call). These two kernels read the offsets on
the device, so they never synchronise:

* :func:`segment_mm`: ``y[seg e] = x[seg e] @ w[e]`` (2D x 3D). The grid has
  ``cdiv(R, BLOCK_M) + E`` row tiles, an upper bound of ``sum_e cdiv(n_e,
  BLOCK_M)`` that needs no host knowledge of the counts: each program loads the
  E offsets as one vector and finds its segment and row block by a cumulative
  sum of the segments' tiles and one comparison (no serial loop over the
  experts); the spare tiles are fully masked. ``w`` may be any strided view (the backward passes ``w.transpose(1, 2)``).
* :func:`segment_wgrad`: ``dw[e] = x[seg e]^T @ dy[seg e]`` (2D x 2D -> 3D), one
  program per (expert, K tile, N tile) looping over its segment's rows; an empty
  segment writes zeros.

fp32 operands use ``input_precision="ieee"`` (exact fp32, as cuBLAS without
TF32) unless TF32 is allowed for CUDA matmuls (:func:`_precision`); accumulation is
fp32 for every dtype. The kernels also run under ``TRITON_INTERPRET=1`` on CPU
tensors, which is how the CPU test suite checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_mm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    offs_ptr,
    num_experts,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Which segment and row block is this tile? The offsets loaded as one vector (no host sync, no extra
    # launch, no serial loop): segment e's tiles end at tiles_end[e] (a cumulative sum); this tile's expert is
    # the number of segments that end at or before it, empty ones included (num_experts for a spare tile).
    es = tl.arange(0, E_POW2)
    valid = es < num_experts
    seg_end_E = tl.load(offs_ptr + es, mask=valid, other=0).to(tl.int32)
    seg_start_E = tl.load(offs_ptr + es - 1, mask=valid & (es > 0), other=0).to(tl.int32)
    tiles_E = tl.where(valid, tl.cdiv(seg_end_E - seg_start_E, BLOCK_M), 0)
    tiles_end_E = tl.cumsum(tiles_E, 0)
    expert = tl.sum((valid & (tiles_end_E <= pid_m)).to(tl.int32), 0)
    hit = valid & (es == expert)  # no lane for a spare tile
    tiles_before = tl.sum(tl.where(hit, tiles_end_E - tiles_E, 0), 0)
    row_start = tl.sum(tl.where(hit, seg_start_E, 0), 0) + (pid_m - tiles_before) * BLOCK_M
    row_end = tl.sum(tl.where(hit, seg_end_E, 0), 0)  # 0 for a spare tile: every row masked
    expert = tl.where(expert < num_experts, expert, 0)  # a spare tile reads expert 0's weights, stores nothing
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < row_end  # all False for a spare tile
    mask_n = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_base = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        a = tl.load(x_rows + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_base + ks[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    y = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _segment_wgrad_kernel(
    x_ptr,
    dy_ptr,
    dw_ptr,
    offs_ptr,
    K,
    N,
    stride_xm,
    stride_xk,
    stride_dym,
    stride_dyn,
    stride_we,
    stride_wk,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    seg_end = tl.load(offs_ptr + e).to(tl.int32)
    seg_start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0).to(tl.int32)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = ks < K
    mask_n = ns < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(seg_start, seg_end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        mask_m = ms < seg_end
        xt = tl.load(
            x_ptr + ms.to(tl.int64)[None, :] * stride_xm + ks[:, None] * stride_xk,
            mask=mask_k[:, None] & mask_m[None, :],
            other=0.0,
        )
        g = tl.load(
            dy_ptr + ms.to(tl.int64)[:, None] * stride_dym + ns[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(xt, g, acc, input_precision=PRECISION)
    dw = dw_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + ns[None, :] * stride_wn
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


def _precision(dtype: torch.dtype) -> str:
    """Triton's ``input_precision`` for ``dtype`` operands: ``"ieee"`` for fp32 unless TF32 is allowed for CUDA
    matmuls. Read through the per-backend ``torch.backends.cuda.matmul.fp32_precision`` (``"tf32"``, ``"ieee"``,
    or ``"none"`` = inherit, resolved when read), which every way of allowing TF32 sets
    (``torch.set_float32_matmul_precision("high")``, the legacy ``allow_tf32 = True``, the new API). The legacy
    ``allow_tf32`` getter and ``torch.get_float32_matmul_precision()`` both raise once legacy and new API calls
    were mixed (torch 2.9+); torch before the new API has only ``allow_tf32``."""
    if dtype != torch.float32:
        return "tf32"  # Triton's default; for 16-bit operands the matrix units take them as they are
    matmul = torch.backends.cuda.matmul
    allowed = matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    return "tf32" if allowed else "ieee"


def _blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): larger tiles for 16-bit operands (half the bytes per element)."""
    return (64, 64, 32) if dtype == torch.float32 else (64, 128, 64)


def segment_mm(x_RK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``y[seg e] = x[seg e] @ w[e]``: [R, K] x [E, K, N] -> [R, N] in the operands' dtype."""
    R, K = x_RK.shape
    E, _, N = w_EKN.shape
    y = x_RK.new_empty(R, N)
    if R == 0 or N == 0:
        return y
    bm, bn, bk = _blocks(x_RK.dtype)
    grid = (triton.cdiv(R, bm) + E, triton.cdiv(N, bn))
    _segment_mm_kernel[grid](
        x_RK,
        w_EKN,
        y,
        offs_E,
        E,
        N,
        K,
        x_RK.stride(0),
        x_RK.stride(1),
        w_EKN.stride(0),
        w_EKN.stride(1),
        w_EKN.stride(2),
        y.stride(0),
        y.stride(1),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        PRECISION=_precision(x_RK.dtype),
        E_POW2=triton.next_power_of_2(E),
    )
    return y


def segment_wgrad(x_RK: torch.Tensor, dy_RN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``dw[e] = x[seg e]^T @ dy[seg e]``: [R, K], [R, N] -> [E, K, N]; zeros for an empty segment."""
    K = x_RK.shape[1]
    N = dy_RN.shape[1]
    E = offs_E.shape[0]
    dw = x_RK.new_empty(E, K, N)
    if E == 0 or K == 0 or N == 0:
        return dw
    bm, bn, bk = _blocks(x_RK.dtype)
    # Here the tile is [BLOCK_K x BLOCK_N] of dw and BLOCK_M rows are reduced per iteration.
    grid = (E, triton.cdiv(K, bm), triton.cdiv(N, bn))
    _segment_wgrad_kernel[grid](
        x_RK,
        dy_RN,
        dw,
        offs_E,
        K,
        N,
        x_RK.stride(0),
        x_RK.stride(1),
        dy_RN.stride(0),
        dy_RN.stride(1),
        dw.stride(0),
        dw.stride(1),
        dw.stride(2),
        BLOCK_M=bk,
        BLOCK_N=bn,
        BLOCK_K=bm,
        PRECISION=_precision(x_RK.dtype),
    )
    return dw


@triton.jit
def _slot_sum_kernel(
    rows_ptr,
    inv_ptr,
    out_ptr,
    T,
    D,
    stride_r,
    stride_o,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = ts < T
    mask = mask_t[:, None] & (ds < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        r = tl.load(inv_ptr + ts.to(tl.int64) * K + k, mask=mask_t, other=0)
        acc += tl.load(rows_ptr + r.to(tl.int64)[:, None] * stride_r + ds[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + ts.to(tl.int64)[:, None] * stride_o + ds[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def slot_sum(rows_RD: torch.Tensor, inverse_TK: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k rows[inverse[t, k]]``: one pass, fp32 accumulation, output in the rows' dtype.

    The dropless combine and the dispatch's backward (the un-permutation) as one kernel: each
    program sums K gathered rows of a [BLOCK_T, BLOCK_D] tile in registers, with no [T*K, D]
    intermediate (a gather then a sum reads and writes one).
    """
    T, K = inverse_TK.shape
    D = rows_RD.shape[1]
    out = rows_RD.new_empty(T, D)
    if T == 0 or D == 0:
        return out
    rows_RD = rows_RD.contiguous()
    inverse_TK = inverse_TK.contiguous()
    block_d = min(256, triton.next_power_of_2(D))
    grid = (triton.cdiv(T, 16), triton.cdiv(D, block_d))
    _slot_sum_kernel[grid](
        rows_RD, inverse_TK, out, T, D, rows_RD.stride(0), out.stride(0), K=K, BLOCK_T=16, BLOCK_D=block_d
    )
    return out
