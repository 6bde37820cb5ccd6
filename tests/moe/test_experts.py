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


def _bf16_step(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x.bfloat16(), counts, torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1)))
    y.backward(g)
    return y.detach()


def test_cached_weight_cast_gives_bitwise_the_same_outputs_and_fp32_gradients_and_follows_updates():
    """The experts' bf16 weight cast is made once per weight update (:meth:`GroupedExperts.cast_weight`): over
    two micro-batches, an optimizer step and two more, the outputs and the fp32 master weights' accumulated
    gradients are bitwise those of a cast per forward; the cast is reused within a step and made again after
    the step. Catches a cache that ignores in-place updates (stale bf16 weights after the step) or that cuts
    the gradient's path to the fp32 weights."""
    runs: list[list[torch.Tensor]] = []
    for cache in (False, True):
        torch.manual_seed(0)
        experts = GroupedExperts(4, 16, 8)
        with torch.no_grad():
            experts.w13.normal_(0, 0.5)
            experts.w2.normal_(0, 0.5)
        experts.cache_casts = cache
        opt = torch.optim.SGD(experts.parameters(), lr=0.1)
        counts = torch.tensor([3, 0, 5, 2])
        outs, grads, made = [], [], []
        for step in range(2):
            for mb in range(2):
                gen = torch.Generator().manual_seed(10 * step + mb)
                x, g = torch.randn(10, 16, generator=gen), torch.randn(10, 16, generator=gen).bfloat16()
                outs.append(_bf16_step(experts, x, counts, g))
                made.append(experts._casts["w13"][1].data_ptr() if cache else None)
            assert experts.w13.grad is not None and experts.w13.grad.dtype == torch.float32
            grads += [experts.w13.grad.clone(), experts.w2.grad.clone()]
            opt.step()
            opt.zero_grad()
        if cache:  # one cast per step, reused by its micro-batches, made again after the step
            assert made[0] == made[1] and made[2] == made[3] and made[1] != made[2], made
        runs.append(outs + grads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
