"""Grouped experts: the grouped-GEMM path equals a per-expert loop, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.moe.experts import GroupedExperts, grouped_mm_supported

pytestmark = pytest.mark.unit


def loop_reference(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    out = [x.new_zeros(0, experts.dim)]
    for e, x_e in enumerate(x.split(counts.tolist())):
        h1, h3 = (x_e @ experts.w13[e]).chunk(2, dim=-1)
        out.append((F.silu(h1) * h3) @ experts.w2[e])
    return torch.cat(out)


@pytest.mark.parametrize("hidden", [12, 6])  # 6 x 4 bytes breaks the 16-byte rule: the loop fallback
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 0], [9, 0, 0, 0], [0, 2, 2, 0]])
def test_grouped_mm_path_equals_loop_including_empty_experts(counts, hidden):
    experts = GroupedExperts(4, 8, hidden)
    assert grouped_mm_supported(torch.zeros(1), experts.dim, experts.hidden) == (hidden == 12)
    with torch.no_grad():
        experts.w13.normal_(0, 0.5)
        experts.w2.normal_(0, 0.5)
    counts_t = torch.tensor(counts)
    x = torch.randn(int(counts_t.sum()), 8, requires_grad=True)
    y = experts(x, counts_t)
    ref = loop_reference(experts, x, counts_t)
    torch.testing.assert_close(y, ref)
    if y.numel() == 0:
        return
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, experts.w13, experts.w2], g)
    want = torch.autograd.grad(ref, [x, experts.w13, experts.w2], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
