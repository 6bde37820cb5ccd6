"""The native engine's one gradient path: FSDP2 ``replicate`` units over DP / EDP (:mod:`moetrain.parallel.data_parallel`).

On 2 gloo ranks, EP=1 and EP=2, gradient accumulation 2 and activation checkpointing: after the trainer's
micro-batches the gradients equal, bitwise, the flat reduction the engine did before (docs/parallelism.md,
"Gradient scaling": every non-expert gradient summed over all W ranks, every expert gradient over its EDP
group, both then scaled by 1/W; on 2 ranks every sum is a + b and the scalings exact), computed here by hand
from a plain copy of the model on the same micro-batches. Only the last micro-batch's backward reduces, and its
reductions start while the backward is still walking back through the blocks (before it reaches the
embedding). The 4-rank EP=2 x DP=2 case, experts reduced over their EDP pair, is ``tests/parallel/test_ep.py``'s balance
matrix; FSDP (``fully_shard``) is ``tests/parallel/test_fsdp.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_train_config
from tests.helpers import spawned


def _trainer(tmp: str, name: str, ep: int) -> Any:
    """Global batch 8 on 2 ranks: 2 micro-batches of 2 each, activation checkpointing, fp32."""
    from moetrain.parallel.context import init_parallel
    from moetrain.train.trainer import Trainer

    cfg = tiny_train_config(Path(tmp) / "dp", max_steps=2, micro_batch_size=2, eval_at_start=False)
    cfg.checkpoint.enabled = False
    cfg.trainer.resume = "none"
    cfg.trainer.precision = "fp32"
    cfg.trainer.activation_checkpointing = True
    cfg.parallel.ep = ep
    pc = init_parallel(cfg.parallel, "cpu", num_experts=cfg.moe.num_experts)
    return Trainer(cfg, Path(tmp) / name, pc)


def _flat_reference(t: Any, micro: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradients of a plain copy of ``t``'s model (same weights, no units) on the same micro-batches, reduced
    by hand: non-expert ones summed over all ranks, expert ones over their EDP group (divided alone when there is
    none), then scaled by 1/W."""
    import torch.distributed as dist

    from moetrain.parallel.expert_parallel import expert_parameters
    from moetrain.train.checkpoint.sharded import local_tensor
    from moetrain.train.step import micro_batch_loss
    from moetrain.train.trainer import build_parallel_model

    pc = t.pc
    plain = build_parallel_model(t.cfg, t.model.embed.num_embeddings, None, pc)
    plain.load_state_dict({k: local_tensor(v) for k, v in t.model.state_dict().items()})
    for mb in micro:
        _, lm, aux, _, _ = micro_batch_loss(plain, mb, pc.device, t.module.autocast)
        ((lm + aux) / len(micro)).backward()
    experts = {id(p) for p in expert_parameters(plain)} if pc.ep_size > 1 else set()
    out = {}
    for name, p in plain.named_parameters():
        g = p.grad
        if id(p) not in experts:
            dist.all_reduce(g)
            g.mul_(1.0 / pc.world_size)
        elif pc.edp_group is not None:
            dist.all_reduce(g, group=pc.edp_group)
            g.mul_(1.0 / pc.world_size)
        else:
            g.div_(pc.world_size)
        out[name] = g
    return out


def _bitwise_check(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """For EP=1 and EP=2: the trainer's reduced gradients of one step and the hand-reduced reference."""
    from moetrain.train.checkpoint.sharded import local_tensor

    out: dict[str, Any] = {}
    for ep in (1, 2):
        t = _trainer(tmp, f"bitwise{ep}", ep)
        batch = t.loader.next_batch()
        t.forward_backward(batch)
        got = {n: local_tensor(p.grad).clone() for n, p in t.model.named_parameters()}
        want = _flat_reference(t, t.micro_batches(batch))
        out[f"ep{ep}"] = {"got": got, "want": want}
    return out


spawned.register(2, "data_parallel/bitwise", _bitwise_check)


@pytest.mark.parity
@pytest.mark.parametrize("ep", [1, 2])
def test_reduced_gradients_equal_the_flat_sum_over_ranks_divided_by_w_bitwise(ep):
    """Bugs caught: a wrong divisor (1/EDP or none for the experts, a mean over a subgroup), a parameter left
    unreduced or reduced twice (a micro-batch's reduction repeated), an expert reduced over the wrong group."""
    for rank, res in enumerate(spawned.result(2, "data_parallel/bitwise")):
        got, want = res[f"ep{ep}"]["got"], res[f"ep{ep}"]["want"]
        assert got.keys() == want.keys()
        for name, w in want.items():
            torch.testing.assert_close(got[name], w, rtol=0, atol=0, msg=f"rank {rank} ep{ep}: {name}")


def _overlap_check(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """The order of events in one trainer step (EP=2, 2 micro-batches): each micro-batch's backward start and
    end, each all-reduce, and the backward reaching the embedding's output."""
    import torch.distributed as dist

    t = _trainer(tmp, "overlap", 2)
    events: list[str] = []
    backward = t.module.backward

    def recorded_backward(loss: torch.Tensor, num_micro: int) -> None:
        events.append("backward")
        backward(loss, num_micro)
        events.append("backward_end")

    def embedded(_m: Any, _a: Any, out: torch.Tensor) -> None:
        out.register_hook(lambda g: events.append("embedding"))

    all_reduce = dist.all_reduce

    def recorded_all_reduce(*args: Any, **kw: Any) -> Any:
        events.append("all_reduce")
        return all_reduce(*args, **kw)

    t.module.backward = recorded_backward
    handle = t.model.embed.register_forward_hook(embedded)
    dist.all_reduce = recorded_all_reduce
    try:
        t.forward_backward(t.loader.next_batch())
    finally:
        dist.all_reduce = all_reduce
        handle.remove()
    return {"events": events}


spawned.register(2, "data_parallel/overlap", _overlap_check)


@pytest.mark.parity
def test_only_the_last_micro_batch_reduces_and_the_reduction_overlaps_the_backward():
    """Bugs caught: every micro-batch reducing (``set_requires_gradient_sync`` left on: the reduction repeated
    per micro-batch), and the whole reduction deferred until after the backward (no overlap)."""
    for rank, res in enumerate(spawned.result(2, "data_parallel/overlap")):
        ev = res["events"]
        starts = [i for i, e in enumerate(ev) if e == "backward"]
        ends = [i for i, e in enumerate(ev) if e == "backward_end"]
        assert len(starts) == len(ends) == 2, ev  # accumulation 2
        assert "all_reduce" not in ev[starts[0] : ends[0]], (rank, ev)  # the first backward only accumulates
        last = ev[starts[1] : ends[1]]
        assert last.count("all_reduce") >= 3, (rank, last)  # the blocks', the experts' and the root's units
        assert last.index("all_reduce") < last.index("embedding"), (rank, last)  # launched before the backward ends


@pytest.mark.unit
def test_a_checkpoint_config_with_the_retired_bucket_key_still_loads():
    """Bug caught: the removed ``parallel.bucket_mb`` key failing ``from_dict`` ("unknown key"), so a checkpoint
    written before the gradient path moved to FSDP2 could no longer be exported or inspected."""
    from moetrain.config import TrainConfig, to_dict
    from moetrain.config.run import from_dict

    saved = to_dict(TrainConfig())
    saved["parallel"]["bucket_mb"] = 25.0
    assert from_dict(saved) == TrainConfig()
