"""DeepSeek-V2 device-level token dropping done by the receiving devices under expert parallelism.

DeepSeek-V2 (arXiv 2405.04434, sec. 2.2.4) drops, on a device over its budget, the received
assignments with the lowest affinities. Under expert parallelism each EP rank is one device and
decides for itself, after the dispatch all-to-all (:class:`~moetrain.parallel.all_to_all.AllToAllDispatcher`);
one process does the same over its groups with :func:`~moetrain.moe.capacity.device_capacity_keep`.

Shape suffixes: A assignments this rank sends (in send order), R assignments it receives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from moetrain.moe.capacity import device_budget
from moetrain.moe.dispatch import DeviceCapacity, inverse_permutation, kept_within
from moetrain.parallel.collectives import all_to_all_detached


def receiver_keep(
    factor: float, prio_send_A: torch.Tensor, send_assign_P: torch.Tensor, send_assign: list[int],
    recv_assign: list[int], group: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The keep mask of this device's received assignments, in receive order, and each sent assignment's keep
    flag sent back, in send order; no host sync.

    This rank is one device. Its budget is ceil(factor * A / D) with A the
    assignments of every sender of the EP group (an all-reduce) and D the EP size;
    it keeps its received assignments with the highest affinities, protected ones
    (+inf) always. Received assignments arrive in (source rank, token, slot) order,
    the order of one process's batch of all the ranks' tokens, so a stable sort
    breaks ties as :func:`~moetrain.moe.capacity.device_capacity_keep` does there.
    """
    total = send_assign_P.sum().reshape(1)
    dist.all_reduce(total, group=group)
    budget = device_budget(factor, total, dist.get_world_size(group))
    prio_recv = all_to_all_detached(prio_send_A.double(), recv_assign, send_assign, group)
    rank_R = inverse_permutation(prio_recv.argsort(descending=True, stable=True))
    keep_recv = (rank_R < budget) | torch.isposinf(prio_recv)
    keep_sent = all_to_all_detached(keep_recv.to(torch.uint8), send_assign, recv_assign, group).bool()
    return keep_recv, keep_sent


def drop_at_devices(
    device_capacity: DeviceCapacity, prio_A: torch.Tensor, order_A: torch.Tensor,
    sent: tuple[torch.Tensor, list[int], list[int]], w_recv: torch.Tensor, keep_A: torch.Tensor | None, group: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The received weights with the dropped rows zeroed, and ``keep_A`` over the original assignments.

    ``prio_A``: each sent assignment's priority in the sender's order, ``order_A`` the send order;
    ``sent``: the assignments sent to each rank (device) and the host splits, sent and received;
    ``keep_A``: the receive budget's mask to compose with (``None`` = all kept).
    """
    send_assign_P, send_assign, recv_assign = sent
    keep_recv, keep_sent = receiver_keep(
        device_capacity.factor, prio_A[order_A], send_assign_P, send_assign, recv_assign, group
    )
    w_recv = w_recv * keep_recv.to(w_recv.dtype)  # a dropped row is computed with weight 0: no value, no gradient
    keep_dev_A = torch.empty_like(keep_sent).scatter_(0, order_A, keep_sent)  # back to this rank's A order
    if keep_A is None:
        return w_recv, keep_dev_A
    return w_recv, kept_within(keep_A, keep_dev_A)  # composed with the receive budget's mask (no host sync)
