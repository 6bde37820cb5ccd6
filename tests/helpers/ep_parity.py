"""Shared steps of the expert-parallel parity tests: one rank's loss and gradients against one process's."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moetrain.parallel import apply_data_parallel, apply_expert_parallel
from moetrain.parallel.expert_parallel import expert_parameters
from moetrain.train.trainer import lm_loss


def ep_model(ref: torch.nn.Module, pc: Any, **kw: Any) -> torch.nn.Module:
    """A copy of the one-process model ``ref`` as the native engine trains it on ``pc``: experts sharded over EP
    (``kw``: :func:`~moetrain.parallel.apply_expert_parallel`'s options), gradients reduced by FSDP2's
    ``replicate`` units over DP / EDP in the backward."""
    return apply_data_parallel(apply_expert_parallel(copy.deepcopy(ref), pc, **kw), pc, shard=False)


def local_grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad`` as this rank holds it (a replicated DTensor's local tensor is the whole gradient)."""
    return p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad


def model_loss(model: torch.nn.Module, mb: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """LM loss + balance losses of one micro-batch of token ids [B, S + 1], and the model's output."""
    out = model(mb[:, :-1])
    return lm_loss(out.logits, mb[:, 1:]) + out.aux_loss, out


def ep_backward(model: torch.nn.Module, pc: Any, mb: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """This rank's loss on its slice, backward (``model`` from :func:`ep_model`: the gradients reduced in it);
    returns the mean loss over ranks."""
    loss, out = model_loss(model, mb)
    loss.backward()
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    return global_loss / pc.world_size, out


def assert_grads_equal_reference(
    model: torch.nn.Module, ref: torch.nn.Module, pc: Any, what: str, rtol: float = 1e-4, atol: float = 1e-7
) -> float:
    """Every gradient of the EP model equals the one-process model's (experts slice by slice: this EP rank's
    shard of the full tensors). Returns the largest absolute difference."""
    experts = {id(p) for p in expert_parameters(model)}
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if id(p) in experts:
            e = p.shape[0]
            want = want[pc.ep_rank * e : (pc.ep_rank + 1) * e]
        got = local_grad(p)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"{what}: grad of {name}")
        worst = max(worst, (got - want).abs().max().item())
    return worst
