"""CPU fast paths of the MoE layer against plain per-expert / per-slot reference loops.

``GroupedSwiGLU`` (one autograd node for the grouped SwiGLU experts, on each
segment-GEMM backend that runs on CPU), the
dropless ``LocalDispatcher`` (``GatherTokens`` dispatch, ``SumTokenSlots``
combine) and ``local_swiglu_moe`` (dispatch, experts and combine in one node,
the single-process CPU fp32 path of ``MoELayer``): forward output and every
gradient, at small shapes with empty experts and uneven segments.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.moe.dispatch import LocalDispatcher
from moetrain.moe.experts import GroupedExperts, GroupedSwiGLU, grouped_mm_supported, segment_gemm

pytestmark = pytest.mark.unit

COUNTS = [[3, 0, 5, 1], [0, 0, 0, 7], [1, 1, 1, 1], [0, 9, 0, 0], [6, 0, 0, 2]]


def swiglu_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Reference: one plain SwiGLU per expert over its segment."""
    out = [x.new_zeros(0, w2.shape[-1])]
    for e, x_e in enumerate(x.split(counts)):
        h1, h3 = (x_e @ w13[e]).chunk(2, dim=-1)
        out.append((F.silu(h1) * h3) @ w2[e])
    return torch.cat(out)


def weighted_swiglu_loop(x, w13, w2, counts, weight=None):
    """Reference: weight[r] * SwiGLU_e(x[r]) per expert segment, one plain SwiGLU per expert."""
    y = swiglu_loop(x, w13, w2, counts)
    return y if weight is None else y * weight.unsqueeze(-1)


NEEDS = [
    (True, True, True, True), (True, True, True, False), (False, True, True, False), (True, False, False, False),
    (False, False, True, False), (False, False, False, True),
]  # fmt: skip
"""Which of x, W13, W2 and the row weights require a gradient."""
SWIGLU_CASES = [(needs, weighted) for needs in NEEDS for weighted in (False, True) if weighted or not needs[3]]
"""Without row weights there is no weight gradient to ask for: those cases are left out, not returned early."""


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize(("needs", "weighted"), SWIGLU_CASES)
def test_grouped_swiglu_equals_loop_forward_and_every_gradient(counts, needs, weighted, backend):
    """Every backend (the grouped GEMM and the loop fallback) against plain per-expert SwiGLUs: output and
    the gradients of x, W13, W2 and the row weights, with empty experts and uneven segments. Every case
    asserts (none returns before its gradients are compared)."""
    torch.manual_seed(0)
    E, D, H = 4, 8, 12
    assert grouped_mm_supported(torch.zeros(1), D, H)
    x = torch.randn(sum(counts), D).requires_grad_(needs[0])
    w13 = (torch.randn(E, D, 2 * H) * 0.5).requires_grad_(needs[1])
    w2 = (torch.randn(E, H, D) * 0.5).requires_grad_(needs[2])
    weight = torch.rand(sum(counts)).requires_grad_(needs[3]) if weighted else None
    gemm = segment_gemm(x, torch.tensor(counts), (D, H), backend)
    y = GroupedSwiGLU.apply(x, w13, w2, weight, gemm)
    ref = weighted_swiglu_loop(x, w13, w2, counts, weight)
    torch.testing.assert_close(y, ref)
    inputs = [t for t in (x, w13, w2, weight) if t is not None and t.requires_grad]
    assert inputs and y.numel() > 0
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, g, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the backward leaves its saved tensors alone: a retained graph gives the same gradients again
    again = torch.autograd.grad(y, inputs, g)
    for a, b in zip(again, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("counts", COUNTS)
def test_loop_fallback_weight_gradients_equal_the_grouped_path(counts):
    """The loop fallback writes each expert's weight gradient into its own slice (empty experts: zeros):
    equal to ``torch._grouped_mm``'s, expert by expert."""
    torch.manual_seed(5)
    E, D, H = 4, 8, 12
    x = torch.randn(sum(counts), D)
    dy = torch.randn(sum(counts), D)
    weight = torch.rand(sum(counts))
    grads = {}
    for backend in ("grouped_mm", "loop"):
        w13 = (torch.randn(E, D, 2 * H, generator=torch.Generator().manual_seed(1)) * 0.5).requires_grad_()
        w2 = (torch.randn(E, H, D, generator=torch.Generator().manual_seed(2)) * 0.5).requires_grad_()
        gemm = segment_gemm(x, torch.tensor(counts), (D, H), backend)
        y = GroupedSwiGLU.apply(x, w13, w2, weight, gemm)
        grads[backend] = torch.autograd.grad(y, [w13, w2], dy)
    for a, b in zip(grads["grouped_mm"], grads["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for e, n in enumerate(counts):
        if n == 0:
            assert not grads["loop"][0][e].any() and not grads["loop"][1][e].any()


def test_grouped_experts_cpu_path_is_the_fused_node():
    experts = GroupedExperts(4, 8, 12)
    torch.nn.init.normal_(experts.w13)
    torch.nn.init.normal_(experts.w2)
    y = experts(torch.randn(5, 8, requires_grad=True), torch.tensor([2, 0, 3, 0]))
    assert type(y.grad_fn).__name__ == "GroupedSwiGLUBackward"


def slot_loop(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Reference: out[t] = sum_k w[t, k] * (x[t] @ mats[idx[t, k]]), one slot at a time."""
    rows = []
    for t in range(x.shape[0]):
        acc = x.new_zeros(mats.shape[-1])
        for k in range(idx.shape[1]):
            acc = acc + w[t, k] * (x[t] @ mats[idx[t, k]])
        rows.append(acc)
    return torch.stack(rows)


def dispatched(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, mats: torch.Tensor, dtype: torch.dtype):
    """The dropless LocalDispatcher around a per-expert map of the expert-sorted rows."""
    T, K = idx.shape
    d = LocalDispatcher(mats.shape[0])
    token_idx = torch.arange(T).repeat_interleave(K)
    rows, counts, weight, handle, *_ = d.dispatch(
        x.to(dtype), token_idx, idx.reshape(-1), w.reshape(-1), slots_per_token=K
    )
    assert rows.dtype == dtype and weight.dtype == torch.float32
    assert counts.tolist() == torch.bincount(idx.reshape(-1), minlength=mats.shape[0]).tolist()
    y = torch.cat([(r.float() @ mats[e]) for e, r in enumerate(rows.split(counts.tolist()))])
    return d.combine((y * weight.unsqueeze(-1)).to(dtype), handle)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 rows: the compute dtype under autocast
@pytest.mark.parametrize("num_experts", [3, 6])  # 6 experts for 7 tokens x 2 slots: some empty, uneven
def test_dropless_local_dispatch_and_combine_equal_slot_loop(num_experts, dtype):
    torch.manual_seed(1)
    T, K, D = 7, 2, 5
    x = torch.randn(T, D, requires_grad=True)
    idx = torch.stack([torch.randperm(num_experts)[:K] for _ in range(T)])
    if num_experts == 6:
        idx[idx == 4] = 5  # expert 4 gets no rows
    w = torch.rand(T, K, requires_grad=True)
    mats = torch.randn(num_experts, D, D, requires_grad=True)
    out = dispatched(x, idx, w, mats, dtype)
    ref = slot_loop(x, idx, w, mats)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), [x, w, mats], g)
    want = torch.autograd.grad(ref, [x, w, mats], g)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:  # bf16 rows: within bf16 rounding, as a relative error of the whole tensor
        for a, b in zip((out.float(), *got), (ref, *want)):
            assert ((a - b).norm() / b.norm()).item() < 1e-2


def swiglu_slot_loop(x, idx, w, w13, w2):
    """Reference: out[t] = sum_k w[t, k] * SwiGLU_{idx[t, k]}(x[t]), one slot at a time."""
    rows = []
    for t in range(x.shape[0]):
        acc = x.new_zeros(x.shape[1])
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            h1, h3 = (x[t] @ w13[e]).chunk(2)
            acc = acc + w[t, k] * ((F.silu(h1) * h3) @ w2[e])
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, True, True), (True, False, False, False)])
@pytest.mark.parametrize("routing", ["uneven_with_empty", "all_to_one", "balanced"])
def test_local_swiglu_moe_equals_slot_loop_forward_and_every_gradient(routing, needs):
    from moetrain.moe.fused import fused_local_supported, local_swiglu_moe

    torch.manual_seed(2)
    T, K, D, H, E = 9, 3, 6, 5, 5  # odd sizes: the fused path has no 16-byte rule
    if routing == "uneven_with_empty":  # experts 1 and 3 get nothing, expert 0 most
        idx = torch.tensor([[0, 2, 4]] * 5 + [[0, 4, 2]] * 3 + [[2, 0, 4]])
    elif routing == "all_to_one":  # duplicate slots of one expert per token
        idx = torch.full((T, K), 3)
    else:
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    x = torch.randn(T, D).requires_grad_(needs[0])
    w = torch.rand(T, K).requires_grad_(needs[1])
    w13 = (torch.randn(E, D, 2 * H) * 0.5).requires_grad_(needs[2])
    w2 = (torch.randn(E, H, D) * 0.5).requires_grad_(needs[3])
    assert fused_local_supported(x, w13, w2)
    out = local_swiglu_moe(x, idx, w, w13, w2)
    ref = swiglu_slot_loop(x, idx, w, w13, w2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    inputs = [t for t in (x, w, w13, w2) if t.requires_grad]
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, g, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    again = torch.autograd.grad(out, inputs, g)  # saved tensors untouched: a retained graph runs again
    for a, b in zip(again, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_local_path_taken_only_where_it_applies():
    from moetrain.config import MoEConfig
    from moetrain.moe import MoELayer
    from moetrain.moe.fused import FusedLocalDispatcher
    from moetrain.parallel import use_unfused_dispatch

    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8))
    assert isinstance(layer.dispatcher, FusedLocalDispatcher)  # one process's choice, made at build time
    x = torch.randn(2, 3, 16)
    assert layer.dispatcher.supports(x.view(-1, 16), layer.experts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.dispatcher.supports(x.view(-1, 16), layer.experts)
    assert not layer.dispatcher.supports(x.view(-1, 16).bfloat16(), layer.experts)
    use_unfused_dispatch(layer)
    assert type(layer.dispatcher) is LocalDispatcher


@pytest.mark.parametrize("shared", [0, 1])
def test_moe_layer_fused_path_equals_generic_path(shared):
    from moetrain.config import MoEConfig
    from moetrain.moe import MoELayer
    from moetrain.moe.fused import FusedLocalDispatcher

    torch.manual_seed(3)
    layer = MoELayer(16, MoEConfig(num_experts=6, top_k=2, expert_hidden_size=8, num_shared_experts=shared))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    params = [x, *layer.parameters()]
    results = []
    for dispatcher in (FusedLocalDispatcher(6), LocalDispatcher(6)):
        layer.dispatcher = dispatcher
        y, stats = layer(x)
        loss = y.square().sum() + stats.aux_loss
        results.append((y, stats.load_N, *torch.autograd.grad(loss, params)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_token_slots_implementations_agree(dtype):
    """The dispatch backward and the combine: embedding_bag (the CPU default) and the gather + sum (CUDA's without
    Triton) against a per-token loop; bf16 rows are summed with fp32 accumulation (the Triton one-pass kernel,
    CUDA's default, is checked in tests/helpers/triton_interpreted.py and on GPU)."""
    from moetrain.moe.dispatch import sum_token_slots

    torch.manual_seed(4)
    T, K, D = 6, 3, 4
    inverse = torch.randperm(T * K).view(T, K)
    grad = torch.randn(T * K, D).to(dtype)
    want = torch.stack([grad[inverse[t]].float().sum(0) for t in range(T)]).to(dtype)
    for impl in ("embedding_bag", "gather_sum"):
        got = sum_token_slots(grad, inverse, impl)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="slot-sum"):
        sum_token_slots(grad, inverse, "bogus")


def test_slot_sum_is_chosen_for_the_device_when_the_model_is_built_and_used_both_ways(monkeypatch):
    """The un-permutation is the model's choice for its device (``apply_slot_sum``: embedding_bag on CPU, the
    Triton one-pass kernel on CUDA with Triton, else the gather + sum), kept when the fused path is swapped
    for the plain one, and used by the combine and by the dispatch's backward alike. Catches a layer that picks
    by the rows' device per call, or a choice lost by ``use_unfused_dispatch``."""
    import moetrain.moe.dispatch as dispatch_mod
    from moetrain.config import ModelConfig, MoEConfig
    from moetrain.model import build_model
    from moetrain.model.apply import apply_slot_sum
    from moetrain.moe.dispatch import default_slot_sum
    from moetrain.parallel import use_unfused_dispatch

    assert default_slot_sum(torch.device("cpu")) == "embedding_bag"
    monkeypatch.setattr(dispatch_mod, "find_spec", lambda name: object())
    assert default_slot_sum(torch.device("cuda")) == "triton"
    monkeypatch.setattr(dispatch_mod, "find_spec", lambda name: None)
    assert default_slot_sum(torch.device("cuda")) == "gather_sum"

    cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden_size=24, first_k_dense=0)
    model = apply_slot_sum(
        build_model(cfg, MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8), 32, 8), torch.device("cpu")
    )
    for layer in model.moe_layers().values():
        assert layer.dispatcher.slot_sum == "embedding_bag"
        layer.dispatcher.slot_sum = "gather_sum"  # as the CUDA choice without Triton would set it
    use_unfused_dispatch(model)
    calls = []
    original = dispatch_mod.sum_token_slots

    def spy(rows, inverse, impl):
        calls.append(impl)
        return original(rows, inverse, impl)

    monkeypatch.setattr(dispatch_mod, "sum_token_slots", spy)
    out = model(torch.randint(0, 32, (2, 8)))
    (out.logits.square().mean() + out.aux_loss).backward()
    assert calls == ["gather_sum"] * 4  # 2 MoE layers: the combine, then the dispatch's backward
