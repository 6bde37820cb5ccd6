"""Balance losses on hand-computed values and at their minimum, their wiring in the layer, loss-free
balancing, global-batch balance (invariant to the accumulation split) and the per-layer statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrain.config import BalanceConfig, MoEConfig, RouterConfig
from moetrain.moe import MoELayer, maxvio
from moetrain.moe.balance import (
    comm_balance_loss,
    device_balance_loss,
    expert_balance_loss,
    importance_loss,
    router_z_loss,
    sequence_balance_loss,
)
from moetrain.moe.layer import Router
from moetrain.moe.stats import device_load, router_entropy
from moetrain.parallel.context import ParallelContext
from moetrain.train.metrics import MetricRecorder
from moetrain.train.moe_metrics import moe_log_metrics, record_moe
from moetrain.train.trainer import Trainer
from tests.conftest import local_losses, tiny_train_config


def init_layer(layer: MoELayer, std: float = 0.5) -> MoELayer:
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, std)
    return layer


# ---------------------------------------------------------------- hand-computed


@pytest.mark.unit
def test_device_balance_loss_hand_computed():
    # N = 4 experts in D = 2 groups, K = 1, T = 4 tokens choosing [0, 0, 1, 2] -> counts [2, 1, 1, 0]
    # f = N / (K T) counts = [2, 1, 1, 0]; f' = [1.5, 0.5]; P = [.4, .3, .2, .1]; P' = [.7, .3]
    loss = device_balance_loss(torch.tensor([2.0, 1, 1, 0]), torch.tensor([0.4, 0.3, 0.2, 0.1]), 4, 1, 2)
    torch.testing.assert_close(loss, torch.tensor(1.5 * 0.7 + 0.5 * 0.3))


@pytest.mark.unit
def test_comm_balance_loss_hand_computed():
    # D = 2, M = 1, T = 4: 3 tokens sent to device 0, 1 to device 1 -> f'' = D / (M T) [3, 1] = [1.5, 0.5]
    loss = comm_balance_loss(torch.tensor([3.0, 1.0]), torch.tensor([0.4, 0.3, 0.2, 0.1]), 4, 1)
    torch.testing.assert_close(loss, torch.tensor(1.5 * 0.7 + 0.5 * 0.3))


@pytest.mark.unit
def test_sequence_balance_loss_hand_computed():
    # 2 sequences of 2 tokens, N = 2, K = 1.
    s = torch.tensor([[[0.8, 0.2], [0.6, 0.4]], [[0.5, 0.5], [0.3, 0.7]]])
    counts = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    # seq 0: f = [2, 0], P = [.7, .3] -> 1.4; seq 1: f = [1, 1], P = [.4, .6] -> 1.0; mean 1.2
    torch.testing.assert_close(sequence_balance_loss(counts, s, 1), torch.tensor(1.2))


@pytest.mark.unit
def test_importance_loss_hand_computed():
    assert importance_loss(torch.tensor([[0.6, 0.0], [0.4, 0.0], [0.0, 1.0]])).item() == pytest.approx(0.0)
    # importance [2, 0]: mean 1, population variance 1 -> CV^2 = 1
    assert importance_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]])).item() == pytest.approx(1.0)
    # importance [3, 1]: mean 2, variance 1 -> 1/4
    assert importance_loss(torch.tensor([[2.0, 1.0], [1.0, 0.0]])).item() == pytest.approx(0.25)


@pytest.mark.unit
@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([(4, 2, 1, 1), (8, 2, 2, 2), (8, 4, 2, 1), (16, 8, 6, 3), (32, 8, 8, 4)]),
    st.integers(1, 5),
    st.integers(1, 64),
)
def test_property_every_f_times_p_loss_is_one_and_cv2_zero_at_uniform_routing(shape, B, S):
    N, G, K, M = shape
    T = B * S
    p = torch.full((N,), 1.0 / N)
    counts = torch.full((N,), T * K / N)
    torch.testing.assert_close(expert_balance_loss(counts, p, T, K), torch.tensor(1.0))
    torch.testing.assert_close(device_balance_loss(counts, p, T, K, G), torch.tensor(1.0))
    torch.testing.assert_close(comm_balance_loss(torch.full((G,), T * M / G), p, T, M), torch.tensor(1.0))
    s = torch.full((B, S, N), 1.0 / N)
    torch.testing.assert_close(sequence_balance_loss(torch.full((B, N), S * K / N), s, K), torch.tensor(1.0))
    assert importance_loss(torch.full((T, N), K / N)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.unit
def test_each_enabled_loss_is_reported_under_its_name_and_equals_the_pure_function():
    bal = BalanceConfig(
        expert_coef=0.1, device_coef=0.2, comm_coef=0.3, seq_coef=0.4, z_loss_coef=0.05, importance_coef=0.6
    )
    cfg = MoEConfig(
        num_experts=8, top_k=3, expert_hidden_size=8, router=RouterConfig(num_groups=4, topk_groups=2), balance=bal
    )
    layer = init_layer(MoELayer(8, cfg, num_groups=4))
    x = torch.randn(3, 5, 8)
    _, stats = layer(x)
    r = layer.router(x.view(-1, 8))
    T, N = 15, 8
    sel = torch.zeros(T, N).scatter_(1, r.expert_idx_TK, 1.0)
    counts = sel.sum(0)
    sent = (sel.view(T, 4, 2).sum(-1) > 0).float().sum(0)
    p = r.scores_TN.mean(0)
    gates = torch.zeros(T, N).scatter(1, r.expert_idx_TK, r.weight_TK)
    expected = {
        "expert": 0.1 * expert_balance_loss(counts, p, T, 3),
        "device": 0.2 * device_balance_loss(counts, p, T, 3, 4),
        "comm": 0.3 * comm_balance_loss(sent, p, T, 2),
        "seq": 0.4 * sequence_balance_loss(sel.view(3, 5, N).sum(1), r.scores_TN.view(3, 5, N), 3),
        "z": 0.05 * router_z_loss(r.logits_TN),
        "importance": 0.6 * importance_loss(gates),
    }
    assert set(stats.losses) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(stats.losses[k], v, msg=k)
    torch.testing.assert_close(stats.aux_loss, sum(expected.values()))
    torch.testing.assert_close(stats.sent_G, sent)
    torch.testing.assert_close(stats.router_entropy, router_entropy(r.scores_TN))


@pytest.mark.unit
def test_router_entropy_and_device_load_hand_computed():
    torch.testing.assert_close(router_entropy(torch.full((3, 4), 0.25)), torch.tensor(math.log(4)))
    torch.testing.assert_close(router_entropy(torch.tensor([[1.0, 0.0]])), torch.tensor(0.0))
    torch.testing.assert_close(router_entropy(torch.tensor([[0.5, 0.5]]) * 0.3), torch.tensor(math.log(2)))  # sigmoid
    assert device_load(torch.tensor([1.0, 2, 3, 4, 5, 6]), 3).tolist() == [3, 7, 11]


@pytest.mark.unit
def test_accumulator_logs_entropy_device_load_and_device_maxvio():
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8, router=RouterConfig(num_groups=2))
    layer = init_layer(MoELayer(8, cfg, num_groups=2))
    rec = MetricRecorder()
    stats = [layer(torch.randn(1, 6, 8))[1] for _ in range(2)]
    for s in stats:
        record_moe(rec, {1: s})
    reduced = rec.reduce(ParallelContext())
    m = moe_log_metrics(reduced, reduced.host(), [1], {1: 2})
    load = stats[0].load_N + stats[1].load_N
    dev = [load[:2].sum().item(), load[2:].sum().item()]
    assert m["moe/layer_1/device_load"] == [round(d) for d in dev]
    assert m["moe/layer_1/device_maxvio"] == pytest.approx(maxvio(torch.tensor(dev)).item())
    ent = (stats[0].router_entropy + stats[1].router_entropy).item() / 2
    assert m["moe/layer_1/router_entropy"] == pytest.approx(ent)
    assert m["moe/layer_1/loss/expert"] == pytest.approx(
        (stats[0].losses["expert"] + stats[1].losses["expert"]).item() / 2
    )


# ------------------------------------------------------------- loss-free bias


def loss_free_layer(u: float = 1e-3, **router) -> MoELayer:
    cfg = MoEConfig(
        num_experts=6,
        top_k=2,
        expert_hidden_size=8,
        router=RouterConfig(bias_update_rate=u, **router),
        balance=BalanceConfig(expert_coef=0.0),
    )
    return init_layer(MoELayer(8, cfg))


@pytest.mark.unit
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_loss_free_bias_gets_no_gradient_and_never_changes_the_weights(score_fn):
    layer = loss_free_layer(score_fn=score_fn)
    assert "router.expert_bias" not in dict(layer.named_parameters())
    x = torch.randn(20, 8)
    ref = layer.router(x)
    with torch.no_grad():  # a bias big enough to change the choice
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0]))
    r = layer.router(x)
    assert (r.expert_idx_TK == 5).any(dim=1).all() and not torch.equal(r.expert_idx_TK, ref.expert_idx_TK)
    torch.testing.assert_close(r.scores_TN, ref.scores_TN)
    w = r.scores_TN.gather(1, r.expert_idx_TK)
    if score_fn == "sigmoid":
        w = w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(r.weight_TK, w)  # weights are s of the chosen experts, no b anywhere
    y, stats = layer(x.view(2, 10, 8))
    (y.sum() + stats.aux_loss).backward()
    assert layer.router.expert_bias.grad is None and not layer.router.expert_bias.requires_grad
    # with a bias too small to change the choice, output and router gradient are exactly those without it
    layer.zero_grad()
    with torch.no_grad():
        layer.router.expert_bias.fill_(0.0)
    y0, _ = layer(x.view(2, 10, 8))
    y0.sum().backward()
    g0 = layer.router.weight.grad.clone()
    layer.zero_grad()
    with torch.no_grad():
        layer.router.expert_bias.fill_(1e-3)  # a constant shift never changes a top-K
    y1, _ = layer(x.view(2, 10, 8))
    y1.sum().backward()
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(layer.router.weight.grad, g0)


@pytest.mark.unit
def test_loss_free_bias_is_saved_and_restored_with_the_model():
    layer = loss_free_layer()
    layer.router.update_bias(torch.tensor([10.0, 0, 0, 0, 0, 2]))
    sd = layer.state_dict()
    assert "router.expert_bias" in sd
    # mean load 2: b += u * sign(2 - c) -> expert 5 (at the mean) stays at 0
    torch.testing.assert_close(sd["router.expert_bias"], torch.tensor([-1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 0.0]))
    other = loss_free_layer()
    other.load_state_dict(sd)
    torch.testing.assert_close(other.router.expert_bias, layer.router.expert_bias)


@pytest.mark.unit
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_loss_free_updates_drive_maxvio_down_on_a_skewed_router(score_fn):
    torch.manual_seed(0)
    N, D = 8, 16
    cfg = MoEConfig(num_experts=N, top_k=2, router=RouterConfig(score_fn=score_fn, bias_update_rate=1e-3))
    router = Router(D, cfg, num_groups=1)
    mu = torch.randn(D)
    with torch.no_grad():  # experts 0 and 1 aligned with the tokens' mean: they win most tokens
        router.weight.copy_(0.1 * torch.randn(N, D))
        router.weight[:2] += 0.5 * mu / mu.norm()
    w0 = router.weight.detach().clone()
    vios = []
    for _ in range(300):  # the paper's u = 1e-3
        x = torch.randn(256, D) * 0.5 + mu
        r = router(x)
        load = torch.bincount(r.expert_idx_TK.flatten(), minlength=N).float()
        vios.append(maxvio(load).item())
        router.update_bias(load)
    assert torch.equal(router.weight, w0)  # only the bias moved
    first, last = vios[0], sum(vios[-20:]) / 20
    assert first > 1.5
    assert last < 0.15 * first, (first, last)


# --------------------------------------------------------- global-batch balance


def step_grads(tmp_path, micro: int, batch: torch.Tensor, name: str, moe_kw: dict, router_kw: dict, bal_kw: dict):
    cfg = tiny_train_config(tmp_path, micro_batch_size=micro)
    cfg.moe.num_experts = 8
    for k, v in moe_kw.items():
        setattr(cfg.moe, k, v)
    for k, v in router_kw.items():
        setattr(cfg.moe.router, k, v)
    for k, v in bal_kw.items():
        setattr(cfg.moe.balance, k, v)
    trainer = Trainer(cfg, tmp_path / name)
    rec = trainer.forward_backward(batch)
    lm_sum, aux_sum, n = local_losses(rec)
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    return (lm_sum / n).item(), (aux_sum / n).item(), grads, rec


GLOBAL_LOSSES = {"expert_coef": 0.1, "device_coef": 0.2, "comm_coef": 0.3, "seq_coef": 0.05, "z_loss_coef": 1e-3}


@pytest.mark.parity
def test_global_batch_balance_loss_and_gradients_are_invariant_to_accumulation(tmp_path):
    """scope=global: every loss value and every gradient is that of the whole global batch (Qiu et al. 2025)."""
    router = {"num_groups": 4, "topk_groups": 2}
    bal = {**GLOBAL_LOSSES, "scope": "global"}
    batch = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(0))
    ref_lm, ref_aux, ref, _ = step_grads(tmp_path, 8, batch, "a8", {}, router, bal)
    assert ref_aux > 0
    for micro in (4, 2):
        lm, aux, grads, _ = step_grads(tmp_path, micro, batch, f"a{micro}", {}, router, bal)
        assert lm == pytest.approx(ref_lm, rel=1e-6)
        assert aux == pytest.approx(ref_aux, rel=1e-5)
        assert grads.keys() == ref.keys()
        for k, g in grads.items():
            torch.testing.assert_close(g, ref[k], rtol=1e-4, atol=1e-7, msg=k)
    # the same split with micro-batch statistics gives a different loss: the test can fail
    _, aux_local, _, _ = step_grads(tmp_path, 2, batch, "m2", {}, router, {**GLOBAL_LOSSES, "scope": "micro_batch"})
    assert abs(aux_local - ref_aux) > 1e-4 * ref_aux


@pytest.mark.parity
def test_global_prepass_restores_the_rng_so_noisy_routing_is_unchanged(tmp_path):
    batch = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(1))
    moe = {}
    router = {"strategy": "noisy_topk"}
    bal = {"expert_coef": 0.0, "importance_coef": 0.1}
    torch.manual_seed(5)
    lm_g, aux_g, grads_g, acc_g = step_grads(tmp_path, 4, batch, "g", moe, router, {**bal, "scope": "global"})
    torch.manual_seed(5)
    lm_m, aux_m, grads_m, acc_m = step_grads(tmp_path, 4, batch, "m", moe, router, {**bal, "scope": "micro_batch"})
    assert lm_g == lm_m and aux_g == aux_m  # importance CV^2 is per micro-batch: unaffected by the scope
    loads = [k for k in acc_g.values if k.endswith("/load")]
    assert loads
    for k in loads:
        assert torch.equal(acc_g.values[k], acc_m.values[k])
    for k in grads_g:
        torch.testing.assert_close(grads_g[k], grads_m[k], rtol=0, atol=0, msg=k)


def _dp_global_step(rank: int, world: int, cfg, run_root: str, batch: torch.Tensor) -> tuple[float, float, int, dict]:
    """One rank of a data-parallel forward/backward with global-batch balance (module level: picklable)."""
    from pathlib import Path

    from moetrain.parallel.context import init_parallel
    from tests.helpers.ep_parity import local_grad

    pc = init_parallel(cfg.parallel, "cpu")
    trainer = Trainer(cfg, Path(run_root) / f"rank{rank}", pc)
    lm_sum, aux_sum, n = local_losses(trainer.forward_backward(batch))  # its last backward reduced the gradients
    grads = {k: local_grad(p).clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    return lm_sum.item(), aux_sum.item(), n, grads


@pytest.mark.parity
def test_global_batch_balance_is_invariant_to_the_data_parallel_split(tmp_path):
    """2 gloo ranks x 2 micro-batches each give the loss and gradients of one process on the whole batch."""
    from tests.helpers.distributed import run_distributed

    router = {"num_groups": 4, "topk_groups": 2}
    bal = {**GLOBAL_LOSSES, "scope": "global"}
    batch = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(2))
    ref_lm, ref_aux, ref, _ = step_grads(tmp_path, 8, batch, "one", {}, router, bal)  # also fills the data cache
    cfg = tiny_train_config(tmp_path, micro_batch_size=2)
    cfg.moe.num_experts = 8
    for k, v in router.items():
        setattr(cfg.moe.router, k, v)
    for k, v in bal.items():
        setattr(cfg.moe.balance, k, v)
    cfg.checkpoint.enabled = False
    out = run_distributed(_dp_global_step, 2, cfg, str(tmp_path / "dp"), batch)
    n = sum(o[2] for o in out)
    assert sum(o[0] for o in out) / n == pytest.approx(ref_lm, rel=1e-6)
    assert sum(o[1] for o in out) / n == pytest.approx(ref_aux, rel=1e-5)
    for k, g in ref.items():
        for rank in range(2):
            torch.testing.assert_close(out[rank][3][k], g, rtol=1e-4, atol=1e-7, msg=f"rank {rank}: {k}")


@pytest.mark.unit
def test_compare_balancing_summary_table_and_strategy_specs(tmp_path):
    import importlib.util
    import json
    from argparse import Namespace
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "compare_balancing.py"
    spec = importlib.util.spec_from_file_location("compare_balancing", path)
    cb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cb)
    run = tmp_path / "a"
    run.mkdir()
    rows = [
        {"step": s, "train/loss": 3.0, "moe/maxvio": float(s), "perf/tokens_per_sec": 100.0 * s} for s in range(1, 11)
    ]
    rows.append({"step": 10, "val/loss": 2.5, "val/maxvio_global": 0.25})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    r = cb.summarise(run)
    assert r["tail_maxvio"] == pytest.approx(9.5)  # last 20% of 10 logged steps: 9 and 10
    assert r["tokens_per_sec"] == pytest.approx(600.0)  # steps 2..10, the first window skipped
    assert (r["val_loss"], r["val_maxvio_global"]) == (2.5, 0.25)
    assert "| a | 2.5000 | 0.250 | 9.500 | 600 |" in cb.table({"a": r}, Namespace(steps=10, seed=0))
    assert cb.overrides_for("lf=moe=loss_free,moe.router.bias_update_rate=0.01") == [
        "moe=loss_free",
        "moe.router.bias_update_rate=0.01",
    ]
    assert cb.overrides_for("hash") == ["moe=hash"]
    with pytest.raises(SystemExit, match="unknown strategy"):
        cb.overrides_for("nope")
