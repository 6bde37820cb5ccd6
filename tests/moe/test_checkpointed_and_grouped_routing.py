"""Paths no other test ran, each against a reference: the value of ``val/maxvio_global``, activation
checkpointing with noisy routing and under EP, and device-limited routing where the choice inside a
group matters (K < experts per group x M).

(Native ``trainer.precision=bf16`` is ``test_precision.py``'s; ``torch.compile`` with inductor and
gradients is ``test_transformer.py``'s.)
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moetrain.config import ModelConfig, MoEConfig, ParallelConfig, RouterConfig
from moetrain.data import rank_slice
from moetrain.model import build_model
from moetrain.model.apply import apply_activation_checkpointing
from moetrain.moe.routing import topk_experts
from moetrain.moe.stats import maxvio
from moetrain.parallel import apply_data_parallel, apply_expert_parallel, init_parallel
from moetrain.parallel.expert_parallel import expert_parameters
from moetrain.train.trainer import Trainer, lm_loss
from tests.conftest import tiny_train_config
from tests.helpers import spawned
from tests.helpers.ep_parity import local_grad

V, S = 64, 12
MODEL = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden_size=32, first_k_dense=0)


@pytest.mark.parity
def test_val_maxvio_global_is_maxvio_of_the_load_summed_over_the_whole_split(tmp_path):
    """The value, not only the key: loads summed over every validation sequence (counted here one sequence
    at a time), then MaxVio per layer; ``val/maxvio_global`` is their mean over layers. A per-batch MaxVio
    averaged over batches is another number."""
    cfg = tiny_train_config(tmp_path, micro_batch_size=4)  # 16 val sequences in 4 batches
    cfg.checkpoint.enabled = False
    cfg.model.first_k_dense = 0
    trainer = Trainer(cfg, tmp_path / "run")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a sharp random router: loads far from uniform, a different top expert per sequence
        for layer in trainer.moe_layers.values():
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g) * 3.0)
    metrics = trainer.evaluate()
    model = trainer.model.eval()
    loads = {i: torch.zeros(cfg.moe.num_experts) for i in trainer.moe_layers}
    per_seq = {i: [] for i in trainer.moe_layers}
    val = torch.tensor(trainer.data.val, dtype=torch.long)
    assert val.shape[0] == 16
    with torch.no_grad():
        for k in range(val.shape[0]):
            for i, s in model(val[k : k + 1, :-1]).moe_stats.items():
                loads[i] += s.load_N
                per_seq[i].append(maxvio(s.load_N).item())
    vios = {i: maxvio(load).item() for i, load in loads.items()}
    for i, v in vios.items():
        assert metrics[f"val/layer_{i}/maxvio_global"] == pytest.approx(v, rel=1e-6)
        assert abs(sum(per_seq[i]) / 16 - v) > 1e-3  # MaxVio_batch averaged is another number
    assert metrics["val/maxvio_global"] == pytest.approx(sum(vios.values()) / len(vios), rel=1e-6)
    assert metrics["val/maxvio_global"] > 0.05  # far from uniform (the split, hence the value, depends on the data)


def _grads(model: torch.nn.Module, batch: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    out = model(batch[:, :-1])
    loss = lm_loss(out.logits, batch[:, 1:]) + out.aux_loss
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parity
def test_activation_checkpointing_with_noisy_routing_equals_the_plain_model():
    """The recomputation must draw the same noise, or the backward routes differently from the forward."""
    router = RouterConfig(strategy="noisy_topk", capacity_factor=1.0)
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden_size=8, router=router)
    plain = build_model(MODEL, moe, V, S, seed=0).train()
    ac = apply_activation_checkpointing(copy.deepcopy(plain))
    batch = torch.randint(0, V, (4, S + 1), generator=torch.Generator().manual_seed(3))
    loss_p, grads_p = _grads(plain, batch, seed=11)
    loss_a, grads_a = _grads(ac, batch, seed=11)
    assert torch.equal(loss_p, loss_a)
    assert grads_p.keys() == grads_a.keys() and any("noise_weight" in k for k in grads_p)
    for k, g in grads_p.items():
        torch.testing.assert_close(grads_a[k], g, rtol=1e-5, atol=1e-7, msg=k)
    _, other = _grads(plain, batch, seed=12)  # other noise, other gradients: the comparison is not vacuous
    assert not torch.allclose(other["blocks.0.ffn.router.weight"], grads_p["blocks.0.ffn.router.weight"])


# ------------------------------------------------ device-limited routing where the choice inside a group matters


def reference_group_limited(s_TN: torch.Tensor, k: int, groups: int, m: int, group_score: str) -> list[set[int]]:
    """DeepSeek-V2: the M groups with the highest best affinity (V3: sum of the top K/M), then top-K inside."""
    per = s_TN.shape[1] // groups
    out = []
    for s in s_TN.tolist():
        members = [sorted(s[d * per : (d + 1) * per], reverse=True) for d in range(groups)]
        score = [g[0] if group_score == "max" else sum(g[: max(1, k // m)]) for g in members]
        best = sorted(range(groups), key=lambda d: -score[d])[:m]
        allowed = [i for i in range(len(s)) if i // per in best]
        out.append(set(sorted(allowed, key=lambda i: -s[i])[:k]))
    return out


@pytest.mark.unit
@pytest.mark.parametrize(
    ("n", "groups", "m", "k", "group_score"),
    [(8, 2, 1, 2, "max"), (16, 4, 2, 3, "max"), (16, 4, 2, 4, "topk_sum"), (12, 3, 2, 2, "topk_sum")],
)
def test_device_limited_topk_picks_the_best_experts_inside_the_chosen_groups(n, groups, m, k, group_score):
    assert k < (n // groups) * m  # the choice inside the groups matters
    s = torch.rand(64, n, generator=torch.Generator().manual_seed(n + k))
    idx = topk_experts(s, k, groups, m, group_score)
    ref = reference_group_limited(s, k, groups, m, group_score)
    assert [set(row) for row in idx.tolist()] == ref


def _ep_case(rank: int, world: int, tmp: str, case: str) -> dict[str, Any]:
    """EP=2 vs one process: activation checkpointing (all-to-alls recomputed in the backward) with capacity
    dropping, or device-limited routing with K=2 < 4 experts per group x M=1."""
    router = {"capacity_factor": 1.0} if case == "ac" else {"topk_groups": 1}
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden_size=8, router=RouterConfig(**router))
    pc = init_parallel(ParallelConfig(ep=2), "cpu", num_experts=8)
    ref = build_model(MODEL, moe, V, S, ep=2, seed=0)
    model = apply_expert_parallel(copy.deepcopy(ref), pc)
    if case == "ac":
        apply_activation_checkpointing(model)
    apply_data_parallel(model, pc, shard=False)  # the gradients reduced in the backward, as the trainer's
    batch = torch.randint(0, V, (4, S + 1), generator=torch.Generator().manual_seed(4))
    ref_loss = torch.zeros(())
    for r in range(world):
        mb = rank_slice(batch, r, world)
        out = ref(mb[:, :-1])
        loss = lm_loss(out.logits, mb[:, 1:]) + out.aux_loss
        (loss / world).backward()
        ref_loss += loss.detach() / world
    mb = rank_slice(batch, rank, world)
    out = model(mb[:, :-1])
    loss = lm_loss(out.logits, mb[:, 1:]) + out.aux_loss
    loss.backward()
    dist.all_reduce(loss := loss.detach().clone())
    torch.testing.assert_close(loss / world, ref_loss, rtol=1e-6, atol=1e-7)
    experts = {id(p) for p in expert_parameters(model)}
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if id(p) in experts:
            e = p.shape[0]
            want = want[pc.ep_rank * e : (pc.ep_rank + 1) * e]
        torch.testing.assert_close(local_grad(p), want, rtol=1e-4, atol=1e-7, msg=f"{case}: {name}")
    layer = ref.moe_layers()[0]  # the same router weights; the model's are replicated DTensors outside a forward
    x = torch.randn(16, MODEL.dim, generator=torch.Generator().manual_seed(5))
    r = layer.router(x)
    s = r.scores_TN.detach()
    inside = [set(row) for row in r.expert_idx_TK.tolist()]
    return {
        "dropped": sum(float(st.num_dropped) for st in out.moe_stats.values()),
        "inside_matches": inside == reference_group_limited(s, 2, 2, 1, "max") if case == "limited" else True,
    }


for _case in ("ac", "limited"):
    spawned.register(2, f"never_run/{_case}", functools.partial(_ep_case, case=_case))


@pytest.mark.parity
def test_activation_checkpointing_under_ep_equals_one_process():
    reports = spawned.result(2, "never_run/ac")
    assert sum(r["dropped"] for r in reports) > 0  # dropping active: the recomputed routing must match


@pytest.mark.parity
def test_device_limited_routing_with_choice_inside_groups_under_ep_equals_one_process():
    assert all(r["inside_matches"] for r in spawned.result(2, "never_run/limited"))
