"""The compute dtype at the MoE boundary, the sync-free dropless path and the Triton kernels, checked on CPU.

Under bf16 autocast the residual stream is fp32: the router must still see fp32
(its scores, top-K and balance losses unchanged) while the routed and shared
experts and the dispatch see bf16 rows, and the layer must still equal the fp32
per-token reference within bf16 rounding, forward and gradients. The GPU
properties that the CPU can check are checked here: no host synchronisation in
the one-process dropless forward+backward (and exactly the split exchange under
EP), and the Triton segment GEMMs (in Triton's interpreter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import MoEConfig, RouterConfig
from moetrain.moe import MoELayer
from tests.helpers.host_syncs import HostSyncs

pytestmark = pytest.mark.parity


def make_layer(shared: int = 1, **router) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=8, top_k=2, expert_hidden_size=16, num_shared_experts=shared, router=RouterConfig(**router)
    )
    layer = MoELayer(32, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    return layer


def per_token_reference(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """fp32, one token and one slot at a time: sum_k w_k SwiGLU_{e_k}(x) + shared(x), the router's own choice."""
    r = layer.router(x_TD)
    ex = layer.experts
    out = []
    for t in range(x_TD.shape[0]):
        acc = layer.shared(x_TD[t]) if layer.shared is not None else x_TD.new_zeros(x_TD.shape[1])
        for k in range(r.expert_idx_TK.shape[1]):
            e = int(r.expert_idx_TK[t, k])
            h1, h3 = (x_TD[t] @ ex.w13[e]).chunk(2)
            acc = acc + r.weight_TK[t, k] * ((F.silu(h1) * h3) @ ex.w2[e])
        out.append(acc)
    return torch.stack(out)


def test_under_bf16_autocast_experts_see_bf16_rows_and_the_router_fp32():
    layer = make_layer()
    seen: dict[str, torch.dtype] = {}
    layer.experts.register_forward_pre_hook(lambda m, args: seen.__setitem__("experts", args[0].dtype))
    layer.shared.register_forward_pre_hook(lambda m, args: seen.__setitem__("shared", args[0].dtype))
    routed = []
    orig = layer.router.forward
    layer.router.forward = lambda *a, **k: routed.append(orig(*a, **k)) or routed[-1]  # type: ignore[method-assign]
    dispatched = []
    orig_dispatch = layer.dispatcher.dispatch
    layer.dispatcher.dispatch = lambda *a, **k: dispatched.append(orig_dispatch(*a, **k)) or dispatched[-1]  # type: ignore[method-assign]
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = layer(x)
    assert seen == {"experts": torch.bfloat16, "shared": torch.bfloat16}
    r = routed[0]
    assert r.logits_TN.dtype == r.scores_TN.dtype == r.weight_TK.dtype == torch.float32
    assert dispatched[0].rows_RD.dtype == torch.bfloat16 and dispatched[0].weight_R.dtype == torch.float32
    assert y.dtype == torch.float32  # back in the residual stream's dtype
    assert stats.aux_loss.dtype == torch.float32
    # The routing is the fp32 routing: the same experts as without autocast.
    r32 = layer.router(x.view(-1, 32))
    assert torch.equal(r.expert_idx_TK, r32.expert_idx_TK)
    torch.testing.assert_close(r.weight_TK, r32.weight_TK)


def test_router_dtype_bf16_runs_the_router_gemm_on_bf16_operands_and_fp32_stays_exact():
    """``moe.router.dtype``: the default fp32 logits are bitwise ``x W_g^T`` in fp32 under bf16 autocast too;
    ``bf16`` gives the bf16 GEMM's logits upcast to fp32 (scores and weights fp32), close to the fp32 ones but
    not equal. Catches a router that lets autocast (or the option) change the default routing."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    got = {}
    for dtype in ("fp32", "bf16"):
        layer = make_layer(0, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got[dtype] = layer.router(x)
    w = layer.router.weight.detach()
    assert torch.equal(got["fp32"].logits_TN, F.linear(x, w))
    r = got["bf16"]
    assert r.logits_TN.dtype == r.scores_TN.dtype == r.weight_TK.dtype == torch.float32
    assert torch.equal(r.logits_TN, F.linear(x.bfloat16(), w.bfloat16()).float())
    assert not torch.equal(r.logits_TN, got["fp32"].logits_TN)
    torch.testing.assert_close(r.logits_TN, got["fp32"].logits_TN, rtol=2e-2, atol=2e-2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("strategy", ["topk", "topk_softmax"])
def test_bf16_layer_equals_fp32_per_token_reference_forward_and_gradients(shared, strategy):
    """bf16 compute within bf16 rounding (relative error < 1e-2) of fp32 per-token math, output and the
    gradients of the input, the router (through the combine weights), the experts and the shared experts."""
    layer = make_layer(shared, strategy=strategy, norm_topk_prob=True)
    layer.cfg.balance.expert_coef = 0.0
    x = torch.randn(3, 7, 32, requires_grad=True)
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    g = torch.randn(3, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    got = torch.autograd.grad(y, params, g)
    ref = per_token_reference(layer, x.view(-1, 32)).view_as(x)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    assert rel_err(y, ref) < 1e-2
    names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    for name, a, b in zip(names, got, want):
        if b is None:  # the loss-free bias buffer is not a parameter; noise weights absent here
            continue
        assert rel_err(a, b) < 2e-2, name
    # and bf16 is really in play: not bitwise the fp32 result
    assert not torch.equal(y.detach(), ref.detach())


def step_syncs(layer: MoELayer, x: torch.Tensor) -> list[str]:
    with HostSyncs() as s, torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = layer(x)
        (y.float().square().mean() + stats.aux_loss).backward()
    return s.ops


@pytest.mark.parametrize(
    "router",
    [
        {},
        {"strategy": "topk_softmax"},
        {"strategy": "noisy_topk"},
        {"strategy": "hash"},
        {"score_fn": "sigmoid", "bias_update_rate": 1e-3, "num_groups": 4, "topk_groups": 2, "group_score": "topk_sum"},
    ],
)
def test_dropless_forward_backward_has_no_host_sync(router):
    """Routing, statistics and balance losses, dispatch, grouped experts, combine, and the backward: nothing
    that would synchronise a GPU with the host (the generic path, which CUDA takes)."""
    layer = make_layer(1, **router)
    layer.cfg.balance.expert_coef = 0.01
    layer.cfg.balance.z_loss_coef = 1e-3
    layer.train()
    x = torch.randn(2, 6, 32, requires_grad=True)
    ids = torch.randint(0, 100, (2, 6))
    layer(x, ids)  # warm-up: one-time host reads (hash salts) are not per-step syncs
    with HostSyncs() as s, torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = layer(x, ids)
        (y.float().square().mean() + stats.aux_loss).backward()
    assert s.ops == []


def test_host_sync_detector_sees_the_loop_fallback_and_capacity_dropping():
    """The detector is not blind: the loop GEMM fallback reads the counts, capacity dropping indexes by mask."""
    layer = make_layer(0)
    layer.experts.gemm_backend = "loop"
    assert "tolist" in step_syncs(layer, torch.randn(2, 6, 32))
    layer = make_layer(0, capacity_factor=1.0)
    assert "index" in step_syncs(layer, torch.randn(2, 6, 32))


def test_global_scope_prepass_has_no_host_sync():
    """The global-batch routing pre-pass (``moe.balance.scope=global``) on the generic path: no would-be host
    sync. Catches a tensor made from host data per layer and micro-batch (``new_tensor([T])`` for the token
    count was one: on CUDA a pageable copy that waits for the stream)."""
    from moetrain.config import ModelConfig
    from moetrain.model import build_model
    from moetrain.moe.layer import global_routing_counts
    from moetrain.parallel import use_unfused_dispatch

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=0)
    model = build_model(cfg, MoEConfig(num_experts=8, top_k=2, expert_hidden_size=16), 64, 16, seed=0)
    use_unfused_dispatch(model)  # the path CUDA takes
    micro = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        global_routing_counts(lambda mb: model(mb).moe_stats, micro, lambda t: t)  # warm-up
        with HostSyncs() as s:
            totals = global_routing_counts(lambda mb: model(mb).moe_stats, micro, lambda t: t)
    assert s.ops == []
    assert all(t["tokens"].item() == 2 * 2 * 16 for t in totals.values())


def test_step_batch_is_staged_in_pinned_memory_only_for_cuda():
    """``staged_for`` leaves a batch bound for the CPU as it is (no copy; pinning needs a GPU, and the CPU copy
    is no copy at all); ``tests/moe/test_cuda.py`` checks that a batch bound for a GPU is pinned."""
    from moetrain.train.step import staged_for

    batch = torch.randint(0, 64, (4, 9))
    assert staged_for(batch, torch.device("cpu")) is batch


def test_kept_after_dispatch_equals_boolean_indexing_without_host_sync():
    """The assignments a dispatcher dropped at the receivers turned off in ``keep_TK`` by a cumulative sum and a
    gather, against the boolean indexing it replaced (a ``nonzero``, a host sync on CUDA); with nothing kept,
    nothing dropped, and everything dropped. Catches an off-by-one in the kept element's index."""
    from moetrain.moe.dispatch import kept_after_dispatch

    g = torch.Generator().manual_seed(0)
    for p_keep in (0.0, 0.5, 1.0):
        keep_TK = torch.rand(9, 3, generator=g) < p_keep
        n = int(keep_TK.sum())
        for keep_A in (
            torch.rand(n, generator=g) < 0.5,
            torch.ones(n, dtype=torch.bool),
            torch.zeros(n, dtype=torch.bool),
        ):
            want = keep_TK.reshape(-1).clone()
            want[want.nonzero().squeeze(1)[~keep_A]] = False
            with HostSyncs() as s:
                got = kept_after_dispatch(keep_TK, keep_A)
            assert s.ops == [] and torch.equal(got, want.view_as(keep_TK)), (p_keep, keep_A)


def test_triton_segment_gemms_equal_per_expert_matmuls():
    """The kernels CUDA uses where torch._grouped_mm has no fast path (:mod:`tests.helpers.triton_interpreted`), run by
    Triton's interpreter in a fresh process (``TRITON_INTERPRET`` must be set before Triton is imported)."""
    triton = pytest.importorskip("triton")
    import numpy

    def version(v: str) -> tuple[int, int]:
        return tuple(int(p) for p in v.split(".")[:2])  # type: ignore[return-value]

    if version(numpy.__version__) >= (2, 4) and version(triton.__version__) < (3, 9):
        pytest.skip(
            f"Triton {triton.__version__}'s interpreter reads scalar arguments with int() of a one-element array, "
            f"which numpy {numpy.__version__} refuses (numpy >= 2.4; Triton 3.9 reads them with .item()): "
            "install numpy<2.4 or triton>=3.9 to run it (compiled kernels are unaffected)"
        )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.triton_interpreted"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checked 53 cases" in proc.stdout, proc.stdout


@pytest.mark.e2e
def test_bf16_training_tracks_fp32_within_two_percent(tmp_path):
    """``trainer.precision=bf16`` on CPU (autocast: bf16 experts, fp32 router and residual stream) trains 20
    steps to a loss within 2% of the fp32 run's (mean of the last five steps; every step within 5%), and
    really differs from it (bf16 is in play)."""
    from moetrain.train.trainer import Trainer
    from tests.conftest import tiny_train_config

    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_train_config(tmp_path / precision, max_steps=20, precision=precision)
        trainer = Trainer(cfg, tmp_path / precision / "run")
        assert trainer.module.dtype == (torch.bfloat16 if precision == "bf16" else None)
        curves[precision] = [trainer.train_step(trainer.loader.next_batch()).loss.item() for _ in range(20)]
    fp32, bf16 = torch.tensor(curves["fp32"]), torch.tensor(curves["bf16"])
    assert fp32[-1] < fp32[0] - 0.2  # it learns
    final = (bf16[-5:].mean() / fp32[-5:].mean() - 1).abs().item()
    assert final < 0.02, (final, curves)  # where it ends: the mean of the last five steps
    assert ((bf16 - fp32).abs() / fp32).max().item() < 0.05, curves  # and no step far off on the way
    assert not torch.equal(fp32, bf16)
