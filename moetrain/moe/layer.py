"""The MoE FFN layer: router -> capacity -> dispatch -> grouped experts -> combine (+ shared).

Shape suffixes: B batch, S sequence, T = B*S tokens, D model dim, N routed
experts, K chosen per token, A kept assignments, R rows at this rank's experts,
G device groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from moetrain.moe.capacity import capacity, capacity_keep, device_capacity_keep, drop_priority
from moetrain.moe.dispatch import CommStats, DeviceCapacity, Dispatcher, OverlapWork, kept_after_dispatch
from moetrain.moe.experts import GroupedExperts, SwiGLU
from moetrain.moe.fused import FusedLocalDispatcher
from moetrain.moe.losses import LayerInputs, layer_losses
from moetrain.moe.router import Router, capacity_factors
from moetrain.moe.routing import Routing, protected_sequences
from moetrain.moe.stats import router_entropy
from moetrain.moe.step_state import global_counts_of

if TYPE_CHECKING:
    from moetrain.config import MoEConfig


@dataclass
class MoEStats:
    """What one MoE layer reports for one forward (one micro-batch on one rank)."""

    load_N: torch.Tensor
    """Kept (token, expert) assignments per expert (float, detached)."""
    aux_loss: torch.Tensor
    """Sum of the enabled weighted balance losses (differentiable scalar)."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each enabled weighted ``layer``-scope loss, detached, by key (:data:`~moetrain.moe.losses.BALANCE_LOSSES`)."""
    num_selected: torch.Tensor | None = None
    """Assignments chosen by the router, before capacity dropping."""
    num_dropped: torch.Tensor | None = None
    """Assignments dropped by capacity (per-expert and device-level)."""
    devices_per_token: torch.Tensor | None = None
    """Mean number of distinct device groups a token's kept assignments reach."""
    num_tokens: int = 0
    comm: CommStats | None = None
    """All-to-all traffic of this forward under expert parallelism (``None`` on one process)."""
    sel_counts_N: torch.Tensor | None = None
    """Selections per expert before dropping (the numerator of f_i), float."""
    sent_G: torch.Tensor | None = None
    """Tokens with at least one selected expert in each device group (the numerator of f''_d); groups > 1 only."""
    router_entropy: torch.Tensor | None = None
    """Mean over tokens of the entropy of the (normalised) router scores."""
    num_groups: int = 1
    mean_scores_N: torch.Tensor | None = None
    """P_i, the mean over tokens of the (normalised) affinities (differentiable): the P of the f*P losses."""


def routing_counts(stats: MoEStats) -> dict[str, torch.Tensor]:
    """The f-type statistics of one forward: ``expert`` [N], ``tokens`` [1] and, with groups, ``sent`` [G]."""
    assert stats.sel_counts_N is not None
    counts_N = stats.sel_counts_N
    # torch.full, not new_tensor: a fill on the device, no host-to-device copy (on CUDA a pageable copy waits
    # for the stream) per layer and micro-batch of the global-scope pre-pass.
    tokens = torch.full((1,), float(stats.num_tokens), dtype=counts_N.dtype, device=counts_N.device)
    out = {"expert": counts_N, "tokens": tokens}
    if stats.sent_G is not None:
        out["sent"] = stats.sent_G
    return out


@torch.no_grad()
def global_routing_counts(
    forward: Callable[[torch.Tensor], dict[int, MoEStats]],
    micro_batches: list[torch.Tensor],
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> dict[int, dict[str, torch.Tensor]]:
    """The step's f-type counts per MoE layer, summed over micro-batches and data-parallel ranks.

    Global-batch balance (Qiu et al. 2025, arXiv 2501.11873): runs ``forward``
    (the model's training forward, returning its MoE statistics) without grad
    on each micro-batch, sums :func:`routing_counts` and all-reduces them in
    one flat tensor. Costs one extra forward pass per micro-batch; the caller
    restores the RNG state afterwards so the real pass routes identically.
    """
    totals: dict[int, dict[str, torch.Tensor]] = {}
    for mb in micro_batches:
        for i, s in forward(mb).items():
            counts = routing_counts(s)
            if i not in totals:
                totals[i] = {k: v.detach().float().clone() for k, v in counts.items()}
            else:
                for k, v in counts.items():
                    totals[i][k] += v.detach().float()
    keys = [(i, k) for i in sorted(totals) for k in sorted(totals[i])]
    if not keys:
        return totals
    flat = torch.cat([totals[i][k].reshape(-1) for i, k in keys])
    all_reduce_sum(flat)
    offset = 0
    for i, k in keys:
        n = totals[i][k].numel()
        totals[i][k] = flat[offset : offset + n].view_as(totals[i][k])
        offset += n
    return totals


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's for ``x``'s device while autocast is on (e.g. bf16 under
    ``trainer.precision=bf16``, whose residual stream stays fp32), else ``x``'s own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class MoELayer(nn.Module):
    """Routed experts (sharded by the dispatcher under EP) plus optional shared experts.

    ``num_groups``: the device groups of device-limited routing, resolved when
    the model is built (:func:`moetrain.config.resolve_num_groups`) and kept
    here, so the layer routes the same whatever process runs it. ``dispatcher``:
    how rows reach the experts and come back (:class:`~moetrain.moe.dispatch.Dispatcher`);
    one process's :class:`~moetrain.moe.fused.FusedLocalDispatcher` unless given,
    replaced from outside under expert parallelism. ``layer_idx``: its block's index in the model, under
    which it finds the step's global-batch counts (:func:`~moetrain.moe.step_state.global_counts_of`).
    """

    def __init__(
        self,
        dim: int,
        cfg: MoEConfig,
        *,
        num_groups: int = 1,
        vocab_size: int | None = None,
        dispatcher: Dispatcher | None = None,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.num_groups = num_groups
        self.router = Router(dim, cfg, num_groups, vocab_size)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_hidden_size)
        shared_hidden = (cfg.shared_hidden_size or cfg.expert_hidden_size) * cfg.num_shared_experts
        self.shared = SwiGLU(dim, shared_hidden) if cfg.num_shared_experts > 0 else None
        # Qwen2-MoE's sigmoid gate on the shared experts; absent (no parameter) by default.
        gated = cfg.shared_expert_gate and self.shared is not None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if gated else None
        self.dispatcher: Dispatcher = dispatcher if dispatcher is not None else FusedLocalDispatcher(cfg.num_experts)

    def forward(self, x_BSD: torch.Tensor, token_ids_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """The layer's output and statistics.

        Inside :func:`~moetrain.moe.step_state.step_state` with global counts (``moe.balance.scope=global``),
        every f*P balance loss uses this layer's counts summed over the step's micro-batches and ranks
        (:func:`global_routing_counts`) instead of this micro-batch's.
        """
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        T = x_TD.shape[0]
        token_ids_T = token_ids_BS.reshape(-1) if token_ids_BS is not None else None
        r = self.router(x_TD, token_ids_T)
        keep_TK, device_capacity = self._drop(r, token_ids_BS)

        # Every slot kept (token choice, nothing dropped): no boolean indexing, so no host sync on GPU.
        dropless = keep_TK is r.keep_TK and not self.router.strategy.variable_k
        # The experts (routed and shared) and the all-to-all see the compute dtype; the router stayed fp32.
        xc_TD = x_TD.to(compute_dtype(x_TD))
        # Flat kept assignments (token-major), dispatched, computed (each row scaled by its weight), combined.
        K = r.expert_idx_TK.shape[1]
        token_idx_A = torch.arange(T, device=x_TD.device).repeat_interleave(K)
        expert_idx_A, weight_A = r.expert_idx_TK.reshape(-1), r.weight_TK.reshape(-1)
        if not dropless:
            keep_A = keep_TK.reshape(-1)
            token_idx_A, expert_idx_A, weight_A = token_idx_A[keep_A], expert_idx_A[keep_A], weight_A[keep_A]
            if device_capacity is not None:
                device_capacity = device_capacity._replace(priority_A=device_capacity.priority_A[keep_A])
        # The shared experts depend on x alone: the dispatcher runs them while its all-to-alls are in flight.
        out = self.dispatcher.run(
            self.experts, xc_TD, token_idx_A, expert_idx_A, weight_A,
            slots_per_token=K if dropless else None, device_capacity=device_capacity,
            overlap=self._shared_work(xc_TD) if self.shared is not None else None,
        )  # fmt: skip
        if out.keep_A is not None:  # dropped at the receivers (device level, budget)
            keep_TK = kept_after_dispatch(keep_TK, out.keep_A)
        y_TD = out.y_TD.to(x_TD.dtype)
        if out.overlap_out is not None:
            y_TD = y_TD + out.overlap_out  # the shared experts, added in x's dtype (the residual stream's)

        stats = self._stats(r, r.keep_TK, keep_TK, B=B, S=S)
        stats.comm = out.comm
        return y_TD.view(B, S, D), stats

    def _shared_work(self, x_TD: torch.Tensor) -> OverlapWork:
        """The shared experts' output, times sigmoid(x w_g) per token when ``moe.shared_expert_gate`` is on,
        as two stages a dispatcher may overlap with its all-to-alls (:class:`~moetrain.moe.dispatch.OverlapWork`):
        the up projections and activation, then the down projection and the gate."""
        shared, gate = self.shared, self.shared_gate
        assert shared is not None

        def down(h_TF: torch.Tensor) -> torch.Tensor:
            y_TD = shared(h_TF, part="down")
            if gate is None:
                return y_TD
            return torch.sigmoid(gate(x_TD)) * y_TD  # [T, 1] * [T, D] (Qwen2-MoE)

        return OverlapWork(lambda: shared(x_TD, part="up"), down)

    def _drop(self, r: Routing, token_ids_BS: torch.Tensor | None) -> tuple[torch.Tensor, DeviceCapacity | None]:
        """Capacity: the kept slots after per-expert and (training only) device-level dropping, and the
        device-level dropping left to the receiving devices (expert parallelism with one device per EP rank).

        Per expert: capacity ceil(factor T K / N) (GShard; Switch eq. 3), with
        the training or evaluation factor by mode, the over-capacity assignments
        chosen by ``router.drop_policy`` (:func:`drop_priority`: lowest affinity
        first, or by position as GShard and Switch fill their buffers); not for
        expert choice, whose capacity is exact by construction. Per device:
        DeepSeek-V2 device-level dropping, lowest affinity first, never the tokens of
        the ``router.device_protect_fraction`` of sequences it protects
        (``router.device_capacity_factor``, see :func:`device_capacity_keep`): here
        over this batch's groups, or, when the dispatcher's devices are the groups,
        by each receiving device over all senders.
        """
        rc = self.cfg.router
        keep_TK = r.keep_TK
        cap_factor = capacity_factors(rc, self.training).drop
        if cap_factor is not None:
            cap = capacity(r.expert_idx_TK.shape[0], self.num_experts, self.top_k, cap_factor)
            priority_TK = drop_priority(r.scores_TN, r.expert_idx_TK, rc.drop_policy)
            keep_TK = capacity_keep(r.expert_idx_TK, priority_TK, keep_TK, self.num_experts, cap)
        if not (self.training and rc.device_capacity_factor is not None and self.num_groups > 1):
            return keep_TK, None
        priority_TK = drop_priority(r.scores_TN, r.expert_idx_TK, "score")
        if token_ids_BS is not None and rc.device_protect_fraction > 0:
            protected_B = protected_sequences(token_ids_BS, rc.device_protect_fraction)
            protected_T1 = protected_B.repeat_interleave(token_ids_BS.shape[1]).unsqueeze(1)
            priority_TK = priority_TK.double().masked_fill(protected_T1, float("inf"))
        if self.dispatcher.device_groups == self.num_groups:
            return keep_TK, DeviceCapacity(rc.device_capacity_factor, priority_TK.reshape(-1))
        keep_TK = device_capacity_keep(
            r.expert_idx_TK, priority_TK, keep_TK, self.num_experts, self.num_groups, rc.device_capacity_factor
        )
        return keep_TK, None

    def _stats(self, r: Routing, selected_TK: torch.Tensor, keep_TK: torch.Tensor, *, B: int, S: int) -> MoEStats:
        N, G = self.num_experts, self.num_groups
        T = B * S
        idx_TK = r.expert_idx_TK
        dev = idx_TK.device
        # scatter_add rather than bincount: no host sync on GPU (bincount sizes its output from the data)
        load_N = torch.zeros(N, device=dev).scatter_add_(0, idx_TK.reshape(-1), keep_TK.reshape(-1).float())
        sel_counts_N = torch.zeros(N, device=dev).scatter_add_(0, idx_TK.reshape(-1), selected_TK.reshape(-1).float())
        sent_G = None
        devices_per_token = None
        if G > 1:
            group_TK = idx_TK // (N // G)
            sel_hits_TG = torch.zeros(T, G, device=load_N.device).scatter_add_(1, group_TK, selected_TK.float())
            sent_G = (sel_hits_TG > 0).float().sum(dim=0)
            kept_hits_TG = torch.zeros(T, G, device=load_N.device).scatter_add_(1, group_TK, keep_TK.float())
            devices_per_token = (kept_hits_TG > 0).float().sum(dim=1).mean()

        # f-type statistics: this micro-batch's, or the step's global ones (Qiu et al. 2025).
        g = global_counts_of(self.layer_idx)
        counts_f = g["expert"] if g is not None else sel_counts_N
        tokens_f = g["tokens"].reshape(()) if g is not None else T
        sent_f = g.get("sent", sent_G) if g is not None else sent_G

        # P_i from affinities that sum to 1 per token (sigmoid ones renormalised, DeepSeek-V3 eq. 19).
        s_TN = r.scores_TN
        if self.cfg.router.score_fn == "sigmoid":
            s_TN = s_TN / s_TN.sum(dim=-1, keepdim=True)
        p_N = s_TN.mean(0)
        inputs = LayerInputs(
            routing=r, selected_TK=selected_TK, scores_TN=s_TN, mean_scores_N=p_N,
            counts_N=counts_f, num_tokens=tokens_f, sent_G=sent_f,
            batch=B, seq_len=S, top_k=self.top_k, num_groups=G, topk_groups=self.cfg.router.topk_groups,
        )  # fmt: skip
        losses = layer_losses(self.cfg.balance, inputs)
        aux = sum(losses.values(), torch.zeros((), device=load_N.device))
        num_selected = selected_TK.sum()
        return MoEStats(
            load_N=load_N,
            aux_loss=aux,
            losses={k: v.detach() for k, v in losses.items()},
            num_selected=num_selected.float(),
            num_dropped=(num_selected - keep_TK.sum()).float(),
            devices_per_token=devices_per_token,
            num_tokens=T,
            sel_counts_N=sel_counts_N,
            sent_G=sent_G,
            router_entropy=router_entropy(r.scores_TN),
            num_groups=G,
            mean_scores_N=p_N,
        )
