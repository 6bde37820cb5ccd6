"""Paper conventions that change what a published recipe does: the drop order of capacity, the
transformers / Mixtral balance-loss form, Shazeer et al.'s smooth load loss and zero-initialised gates.

Each test checks against an independent, literal reading of the paper (or of the reference
implementation), on hand-computed examples where that is short.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.moe.routing import capacity_keep, drop_priority

pytestmark = pytest.mark.unit


def gshard_position_keep(expert_idx_TK: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """GShard Algorithm 2, literally: position_in_expert of the first choices is a cumulative count over tokens;
    the second choices start after the expert's first-choice count; keep while position < capacity."""
    T, K = expert_idx_TK.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    filled = [0] * num_experts
    for k in range(K):
        for t in range(T):
            e = int(expert_idx_TK[t, k])
            keep[t, k] = filled[e] < cap
            filled[e] += 1
    return keep


def test_position_policy_is_gshard_order_and_score_policy_keeps_the_best():
    # Expert 0 is wanted by tokens 0..3: token 1 as second choice with the highest affinity.
    idx = torch.tensor([[0, 1], [2, 0], [0, 2], [0, 1]])
    scores = torch.tensor(
        [[0.5, 0.3, 0.2], [0.45, 0.05, 0.5], [0.3, 0.1, 0.6], [0.25, 0.7, 0.05]]
    )  # s[t, e]; token 1's affinity to expert 0 (0.45) is the 2nd highest of expert 0's four
    ones = torch.ones(4, 2, dtype=torch.bool)
    by_pos = capacity_keep(idx, drop_priority(scores, idx, "position"), ones, 3, cap=2)
    # position: first choices of expert 0 are tokens 0, 2, 3 (in token order): tokens 0 and 2 fit; token 1's
    # second choice and token 3's first choice overflow.
    assert by_pos[:, 0].tolist() == [True, True, True, False] and by_pos[1, 1].item() is False
    assert torch.equal(by_pos, gshard_position_keep(idx, 3, 2))
    by_score = capacity_keep(idx, drop_priority(scores, idx, "score"), ones, 3, cap=2)
    # score: expert 0 keeps its two highest affinities, 0.5 (token 0) and 0.45 (token 1's second choice).
    assert by_score[0, 0] and by_score[1, 1] and not by_score[2, 0] and not by_score[3, 0]


@pytest.mark.parametrize("seed", range(5))
def test_position_policy_equals_gshard_algorithm_on_random_routings(seed):
    g = torch.Generator().manual_seed(seed)
    T, N, K = 37, 5, 2
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)])
    scores = torch.rand(T, N, generator=g)
    for cap in (1, 4, 9, 15):
        got = capacity_keep(idx, drop_priority(scores, idx, "position"), torch.ones(T, K, dtype=torch.bool), N, cap)
        assert torch.equal(got, gshard_position_keep(idx, N, cap)), cap


def test_switch_and_gshard_presets_drop_by_position_and_the_layer_uses_the_policy():
    from pathlib import Path

    from omegaconf import OmegaConf

    from moetrain.config import MoEConfig, RouterConfig
    from moetrain.moe import MoELayer

    root = Path(__file__).resolve().parents[1] / "configs" / "moe"
    for name in ("switch", "gshard"):
        assert OmegaConf.load(root / f"{name}.yaml").router.drop_policy == "position", name
    for name in ("default", "deepseek_v2", "mixtral"):
        assert "drop_policy" not in OmegaConf.load(root / f"{name}.yaml").router, name  # score, the default
    # A Switch-like layer (top-1, capacity 1 token per expert): position keeps each expert's first token.
    torch.manual_seed(0)
    layer = MoELayer(8, MoEConfig(num_experts=2, top_k=1, expert_hidden_size=8, num_shared_experts=0,
                                  router=RouterConfig(capacity_factor=0.25, drop_policy="position")))  # fmt: skip
    layer.train()
    x = torch.randn(1, 8, 8)
    r = layer.router(x.view(-1, 8))
    keep = layer._drop(r)
    for e in range(2):
        mine = (r.expert_idx_TK[:, 0] == e).nonzero().flatten().tolist()
        kept = [t for t in mine if keep[t, 0]]
        assert kept == mine[:1], (e, mine, kept)
