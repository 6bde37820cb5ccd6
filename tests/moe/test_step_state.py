"""Per-step state installed around a step's passes (``moetrain.moe.step_state``), not threaded through forwards."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import build_model
from moetrain.model.apply import apply_activation_checkpointing
from moetrain.moe.layer import global_routing_counts
from moetrain.moe.step_state import global_counts_of, step_state

pytestmark = pytest.mark.unit


def _model(checkpointed: bool = False) -> torch.nn.Module:
    m = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, first_k_dense=1)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16)
    moe.balance.seq_coef = 0.1  # a loss without f-type counts, beside the expert loss with them
    model = build_model(m, moe, 64, 16, seed=0)
    return apply_activation_checkpointing(model) if checkpointed else model


def _router_grads(model: torch.nn.Module, x: torch.Tensor, counts=None, backward_inside: bool = True):
    """The aux loss's gradient on every router weight, forward under ``step_state(global_counts=counts)`` and
    the backward inside it (as ``TrainModule.train_batch`` runs both) or after it."""
    model.zero_grad()
    with step_state(global_counts=counts):
        aux = model(x).aux_loss
        if backward_inside:
            aux.backward()
    if not backward_inside:
        aux.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("router.weight")}


def test_global_counts_reach_every_layer_and_a_checkpointed_blocks_recompute():
    """Catches global counts that do not reach the MoE layers (the gradient would equal the micro-batch's) and
    a state that a checkpointed block's recompute in the backward does not see (the gradients of the
    checkpointed and the plain model would differ): the installed counts change every router's gradient,
    identically with and without activation checkpointing (whose wrapper now passes the block's keyword
    arguments through). A backward run after the context is left differs: the context must span it."""
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    other = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    plain, ckpt = _model(), _model(checkpointed=True)
    counts = global_routing_counts(lambda mb: plain(mb).moe_stats, [x, other], lambda t: t)
    assert sorted(counts) == [1, 2]
    local = _router_grads(plain, x)
    want = _router_grads(plain, x, counts)
    got = _router_grads(ckpt, x, counts)
    assert want.keys() == got.keys() and len(want) == 2
    for name in want:
        assert not torch.allclose(want[name], local[name]), name  # the global counts were used
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    late = _router_grads(ckpt, x, counts, backward_inside=False)
    assert any(not torch.equal(late[n], want[n]) for n in want)


def test_step_state_is_restored_after_the_context_even_on_error_and_nests():
    """Catches a state left installed after a step (the next evaluation would use the last step's counts) or
    not restored when the step raises."""
    a = {1: {"expert": torch.ones(4)}}
    b = {1: {"expert": torch.zeros(4)}}
    assert global_counts_of(1) is None
    with step_state(global_counts=a):
        assert global_counts_of(1) is a[1] and global_counts_of(2) is None and global_counts_of(None) is None
        with step_state(global_counts=b):
            assert global_counts_of(1) is b[1]
        assert global_counts_of(1) is a[1]
    with pytest.raises(RuntimeError), step_state(global_counts=a):
        raise RuntimeError("a failed step")
    assert global_counts_of(1) is None
