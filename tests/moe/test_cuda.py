"""CUDA-only checks of the MoE path (skipped without a GPU; run by ``scripts/gpu_check.sh``).

What the CPU suite cannot see: the real bf16 grouped GEMM and Triton kernels, the
host synchronisations of a CUDA step (``torch.cuda.set_sync_debug_mode("error")``),
and inductor's GPU kernels under regional compilation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ModelConfig, MoEConfig, RouterConfig
from moetrain.model import build_model
from moetrain.model.apply import apply_slot_sum
from moetrain.moe import MoELayer
from moetrain.moe.dispatch import count_per_bin, default_slot_sum, sum_token_slots
from moetrain.moe.experts import GroupedSwiGLU, TorchGroupedMM, TritonGroupedMM, segment_gemm
from moetrain.train.trainer import lm_loss

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = torch.device("cuda")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_layer(shared: int = 1, **router) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=16, top_k=4, expert_hidden_size=128, num_shared_experts=shared, router=RouterConfig(**router)
    )
    layer = MoELayer(256, cfg).to(DEV)
    layer.dispatcher.slot_sum = default_slot_sum(DEV)  # as apply_slot_sum sets it for a model built for CUDA
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.05)
    return layer


def loop_reference(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """fp32, expert by expert with index masks: sum_k w_k SwiGLU_{e_k}(x) + shared(x)."""
    r = layer.router(x_TD)
    out = layer.shared(x_TD) if layer.shared is not None else torch.zeros_like(x_TD)
    for e in range(layer.num_experts):
        t_idx, k_idx = (r.expert_idx_TK == e).nonzero(as_tuple=True)
        h1, h3 = (x_TD[t_idx] @ layer.experts.w13[e]).chunk(2, dim=-1)
        y = (F.silu(h1) * h3) @ layer.experts.w2[e]
        out = out.index_add(0, t_idx, y * r.weight_TK[t_idx, k_idx].unsqueeze(-1))
    return out


@pytest.mark.parametrize("shared", [0, 2])
def test_bf16_autocast_layer_equals_fp32_reference_forward_and_gradients(shared):
    layer = make_layer(shared)
    layer.cfg.balance.expert_coef = 0.0
    x = torch.randn(4, 512, 256, device=DEV, requires_grad=True)
    params = [x, *layer.parameters()]
    g = torch.randn_like(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = layer(x)
    got = torch.autograd.grad(y, params, g)
    ref = loop_reference(layer, x.view(-1, 256)).view_as(x)
    want = torch.autograd.grad(ref, params, g)
    assert y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-2
    for (name, _), a, b in zip([("x", x), *layer.named_parameters()], got, want):
        assert rel_err(a, b) < 2e-2, name


def test_segment_gemm_backends_on_this_gpu():
    """bf16 rows take torch._grouped_mm on sm90/sm100 and Triton elsewhere; fp32 and fp16 rows take Triton."""
    counts = torch.tensor([3, 0, 5], device=DEV)
    bf16 = segment_gemm(torch.zeros(8, 256, device=DEV, dtype=torch.bfloat16), counts, (256, 128))
    major = torch.cuda.get_device_capability()[0]
    assert isinstance(bf16, TorchGroupedMM if major in (9, 10) else TritonGroupedMM)
    for dtype in (torch.float32, torch.float16):
        assert isinstance(
            segment_gemm(torch.zeros(8, 256, device=DEV, dtype=dtype), counts, (256, 128)), TritonGroupedMM
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("counts", [[300, 0, 5, 1000, 0, 7, 64, 129], [0] * 7 + [513]])
def test_grouped_swiglu_triton_and_grouped_mm_equal_the_loop(counts, dtype):
    """Output and every gradient (x, W13, W2, row weights) of the Triton (and, in bf16, the grouped_mm) backend
    against the loop backend on the same GPU, with empty experts and segments across tile ends."""
    torch.manual_seed(1)
    E, D, H = len(counts), 256, 128
    R = sum(counts)
    x = torch.randn(R, D, device=DEV, dtype=dtype, requires_grad=True)
    w13 = (torch.randn(E, D, 2 * H, device=DEV) * 0.05).to(dtype).requires_grad_()
    w2 = (torch.randn(E, H, D, device=DEV) * 0.05).to(dtype).requires_grad_()
    weight = torch.rand(R, device=DEV, requires_grad=True)
    g = torch.randn(R, D, device=DEV, dtype=dtype)
    counts_t = torch.tensor(counts, device=DEV)
    backends = ["triton"] + (
        ["grouped_mm"] if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] in (9, 10) else []
    )
    results = {}
    for backend in ["loop", *backends]:
        y = GroupedSwiGLU.apply(x, w13, w2, weight, segment_gemm(x, counts_t, (D, H), backend))
        results[backend] = (y, *torch.autograd.grad(y, [x, w13, w2, weight], g))
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for backend in backends:
        for what, a, b in zip(["y", "dx", "dw13", "dw2", "dweight"], results[backend], results["loop"]):
            assert rel_err(a, b) < tol, (backend, what)
    empty = [e for e, n in enumerate(counts) if n == 0]
    for backend in backends:
        assert not results[backend][2][empty].any() and not results[backend][3][empty].any()


def _model(**router):
    m = ModelConfig(dim=256, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden_size=512, first_k_dense=1)
    moe = MoEConfig(
        num_experts=16, top_k=4, expert_hidden_size=128, num_shared_experts=1, router=RouterConfig(**router)
    )
    moe.balance.z_loss_coef = 1e-3
    return apply_slot_sum(build_model(m, moe, 512, 256, seed=0).to(DEV), DEV)  # as the trainer builds it


@pytest.mark.parametrize(
    "router", [{}, {"score_fn": "sigmoid", "bias_update_rate": 1e-3, "num_groups": 4, "topk_groups": 2}]
)
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_dropless_model_forward_backward_never_syncs_with_the_host(router, precision):
    """The one-process dropless step (routing, statistics, balance losses, dispatch, grouped experts, combine,
    LM loss and the whole backward) under ``torch.cuda.set_sync_debug_mode("error")``: bf16 autocast takes
    torch._grouped_mm, fp32 the Triton kernels."""
    model = _model(**router)
    tokens = torch.randint(0, 512, (4, 257), device=DEV)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(tokens[:, :-1])
            loss = lm_loss(out.logits, tokens[:, 1:]) + out.aux_loss
        loss.backward()

    step()  # warm-up: kernel selection, lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("impl", ["embedding_bag", "gather_sum", "triton"])
def test_slot_sum_and_counts_never_sync(impl):
    """The combine / dispatch-backward primitive (each implementation) and the per-expert counts."""
    inverse = torch.randperm(4096 * 6, device=DEV).view(4096, 6)
    rows = torch.randn(4096 * 6, 256, device=DEV, dtype=torch.bfloat16)
    want = rows.float()[inverse].sum(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sum_token_slots(rows, inverse, impl)
        counts = count_per_bin(torch.randint(0, 64, (4096,), device=DEV), 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rel_err(got, want) < 1e-2 and int(counts.sum()) == 4096


def test_micro_batches_are_staged_in_pinned_memory_for_the_gpu():
    """The step's batch is pinned once (``staged_for``), so each micro-batch's non-blocking copy is asynchronous;
    a model built for CUDA takes the one-pass Triton un-permutation."""
    from moetrain.data import split_micro_batches
    from moetrain.train.step import staged_for

    micro = split_micro_batches(staged_for(torch.randint(0, 512, (8, 65)), DEV), 2)
    assert all(mb.is_pinned() for mb in micro)
    assert default_slot_sum(DEV) == "triton"


def test_regional_compile_matches_eager_under_bf16():
    """trainer.compile's regional compilation with inductor's GPU kernels: logits, aux loss and every gradient
    within bf16 tolerance of eager."""
    from moetrain.model.apply import apply_compile

    tokens = torch.randint(0, 512, (4, 257), device=DEV)
    results = []
    for compiled in (False, True):
        model = _model()
        if compiled:
            apply_compile(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens[:, :-1])
            loss = lm_loss(out.logits, tokens[:, 1:]) + out.aux_loss
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss, out.logits, [n for n, _ in model.named_parameters()], grads))
    (loss, logits, names, grads), (c_loss, c_logits, _, c_grads) = results
    assert abs(c_loss.item() - loss.item()) < 1e-2 * abs(loss.item())
    assert rel_err(c_logits, logits) < 2e-2
    for name, a, b in zip(names, c_grads, grads):
        assert rel_err(a, b) < 5e-2, name
