"""``python -m tests.helpers.triton_interpreted`` with ``TRITON_INTERPRET=1``: the Triton kernels on CPU tensors.

y = x W_e, dx = dy W_e^T (a transposed strided view) and dW_e = x_e^T dy_e (zeros
for an empty expert) against per-expert matmuls, with empty experts (leading,
trailing, runs of them), row tiles that straddle segment ends, segments longer
than one tile, expert counts that are not a power of two (the kernel's padded
vector of offsets) and more experts than row tiles, in fp32 and fp16
(Triton's interpreter mis-reads bf16 memory; the CUDA tests cover bf16); and the one-pass
slot sum (the un-permutation) against a per-token loop.
"""

from __future__ import annotations

import os

import torch

COUNTS = [
    [3, 0, 5, 1],
    [0, 0, 0, 0],
    [70, 0, 1, 130],
    [0, 0, 0, 17],
    [0, 65, 0, 0, 64],  # 5 experts (padded to 8 lanes), segments one row past a tile
    [128],  # one expert, exactly two tiles
    [0, 3, 0, 0, 0, 1, 0, 9, 0, 0, 2, 0, 0, 0, 0, 70, 0],  # 17 experts, most of them empty
]


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from moetrain.moe import triton_gemm as tg

    torch.manual_seed(0)
    K, N = 40, 24
    cases = 0
    for counts in COUNTS:
        R, E = sum(counts), len(counts)
        x, dy, w = torch.randn(R, K), torch.randn(R, N), torch.randn(E, K, N)
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        ref_y = torch.cat([x.new_zeros(0, N)] + [a @ w[e] for e, a in enumerate(x.split(counts))])
        ref_dx = torch.cat([x.new_zeros(0, K)] + [b @ w[e].t() for e, b in enumerate(dy.split(counts))])
        ref_dw = torch.stack([a.t() @ b for a, b in zip(x.split(counts), dy.split(counts))])
        for dtype in (torch.float32, torch.float16):
            tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 5e-2}
            xc, dyc, wc = x.to(dtype), dy.to(dtype), w.to(dtype)
            y = tg.segment_mm(xc, wc, offs)
            dx = tg.segment_mm(dyc, wc.transpose(1, 2), offs)
            dw = tg.segment_wgrad(xc, dyc, offs)
            for got, want, what in ((y, ref_y, "y"), (dx, ref_dx, "dx"), (dw, ref_dw, "dw")):
                assert got.dtype == dtype, what
                torch.testing.assert_close(
                    got.float(), want, **tol, msg=lambda m, c=counts, d=dtype, n=what: f"{n} {c} {d}: {m}"
                )
                cases += 1
    for T, K, D in ((37, 6, 40), (16, 2, 300), (1, 1, 8)):
        inverse = torch.randperm(T * K).view(T, K)
        rows = torch.randn(T * K, D)
        want = torch.stack([rows[inverse[t]].sum(0) for t in range(T)])
        for dtype in (torch.float32, torch.float16):
            tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
            got = tg.slot_sum(rows.to(dtype), inverse)
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, **tol)
            cases += 1
    # The whole expert node on the Triton backend (strided transposed weights in the backward, row weights)
    # against torch._grouped_mm's, forward and every gradient.
    from moetrain.moe.experts import GroupedSwiGLU, segment_gemm

    counts = torch.tensor([40, 0, 3, 70])
    R, D, H = int(counts.sum()), 32, 16
    x = torch.randn(R, D, requires_grad=True)
    w13 = (torch.randn(4, D, 2 * H) * 0.3).requires_grad_()
    w2 = (torch.randn(4, H, D) * 0.3).requires_grad_()
    weight = torch.rand(R, requires_grad=True)
    g = torch.randn(R, D)
    outs = {}
    for backend in ("grouped_mm", "triton"):
        y = GroupedSwiGLU.apply(x, w13, w2, weight, segment_gemm(x, counts, (D, H), backend))
        outs[backend] = (y, *torch.autograd.grad(y, [x, w13, w2, weight], g))
    for a, b in zip(outs["triton"], outs["grouped_mm"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        cases += 1
    print(f"checked {cases} cases")


if __name__ == "__main__":
    main()
