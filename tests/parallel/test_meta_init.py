"""Meta-device initialisation: each EP rank materialises only its experts, bitwise equal to the one-process
model's (moetrain.parallel.meta_init), in one process and through the trainer on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moetrain.model import build_model
from moetrain.parallel.meta_init import InitStats, build_local_model
from tests.helpers import spawned

pytestmark = pytest.mark.unit

VOCAB, SEQ, SEED = 64, 16, 5


def _configs() -> dict[str, tuple[ModelConfig, MoEConfig]]:
    base = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=1)
    # dim 4, hidden 2: w2's experts hold 8 elements, not a multiple of 16 (the whole-tensor fallback)
    odd = ModelConfig(dim=4, n_layers=2, n_heads=2, ffn_hidden_size=6, first_k_dense=0, tie_embeddings=True)
    return {
        "topk": (base, MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16)),
        "noisy_zero_init_gated_tied_odd": (
            odd,
            MoEConfig(
                num_experts=4,
                top_k=2,
                expert_hidden_size=2,
                shared_expert_gate=True,
                router=RouterConfig(strategy="noisy_topk", zero_init=True),
            ),
        ),
        "hash": (base, MoEConfig(num_experts=4, top_k=1, expert_hidden_size=8, router=RouterConfig(strategy="hash"))),
        # MLA (moetrain.model.mla): its low-rank projections, latent norms and output projection drawn as eager
        "mla": (
            ModelConfig(dim=32, n_layers=3, n_heads=4, ffn_hidden_size=48, attention="mla", q_lora_rank=12),
            MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16),
        ),
    }


def _assert_slices_of(local: dict[str, torch.Tensor], full: dict[str, torch.Tensor], ep: int, rank: int) -> None:
    assert local.keys() == full.keys()
    for name, t in local.items():
        want = full[name]
        if ".experts.w" in name:
            e = want.shape[0] // ep
            want = want[rank * e : (rank + 1) * e]
        assert torch.equal(t, want), name


@pytest.mark.parametrize("case", list(_configs()))
def test_each_ep_rank_materialises_its_slice_of_the_one_process_init_bitwise(case):
    m_cfg, moe_cfg = _configs()[case]
    ep = 2
    full = build_model(m_cfg, moe_cfg, VOCAB, SEQ, ep=ep, seed=SEED)
    full_state = {**dict(full.named_parameters()), **dict(full.named_buffers())}
    expert_total = sum(p.numel() for n, p in full.named_parameters() if ".experts.w" in n)
    one_expert = max(p[0].numel() for n, p in full.named_parameters() if ".experts.w" in n)
    largest_other = max(p.numel() for n, p in full.named_parameters() if ".experts.w" not in n)
    before = torch.get_rng_state()
    for rank in range(ep):
        stats = InitStats()
        local = build_local_model(m_cfg, moe_cfg, VOCAB, SEQ, ep=ep, ep_rank=rank, seed=SEED, stats=stats)
        _assert_slices_of({**dict(local.named_parameters()), **dict(local.named_buffers())}, full_state, ep, rank)
        assert local.lm_head.weight is local.embed.weight or not m_cfg.tie_embeddings
        # peak memory: this rank's experts are 1/ep of them; scratch is one expert (or, for experts of under
        # 16 elements, one layer's tensor) or the largest replicated parameter a constructor draws
        assert stats.expert_numel == expert_total // ep
        assert stats.param_numel == sum(p.numel() for p in full.parameters()) - expert_total + expert_total // ep
        assert stats.peak_scratch_numel <= max(largest_other, 4 * one_expert if case.endswith("odd") else one_expert)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is left as it was


def _trainer_build(rank: int, world: int, tmp: str) -> dict[str, torch.Tensor]:
    """EP=2 through the trainer's build (meta init + apply_expert_parallel): this rank's parameters."""
    from moetrain.parallel.context import init_parallel
    from moetrain.train.trainer import build_parallel_model

    cfg = _train_cfg()
    pc = init_parallel(cfg.parallel, "cpu", cfg.moe.num_experts)
    model = build_parallel_model(cfg, VOCAB, None, pc)
    layer = next(iter(model.moe_layers().values()))
    assert type(layer.dispatcher).__name__ == "AllToAllDispatcher"
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_cfg() -> TrainConfig:
    cfg = TrainConfig(
        model=ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=64, first_k_dense=1),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16),
    )
    cfg.parallel.ep = 2
    cfg.data.seq_len = SEQ
    cfg.trainer.seed = SEED
    return cfg


spawned.register(2, "meta_init/trainer_ep2", _trainer_build)


def test_trainer_ep2_ranks_hold_bitwise_slices_of_the_one_process_model():
    cfg = _train_cfg()
    full = build_model(cfg.model, cfg.moe, VOCAB, SEQ, ep=2, seed=SEED)
    full_params = dict(full.named_parameters())
    for rank, local in enumerate(spawned.result(2, "meta_init/trainer_ep2")):
        _assert_slices_of(local, full_params, 2, rank)
        expert = sum(p.numel() for n, p in local.items() if ".experts.w" in n)
        assert expert * 2 == sum(p.numel() for n, p in full_params.items() if ".experts.w" in n)
