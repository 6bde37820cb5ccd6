"""Multi-token prediction (DeepSeek-V3, arXiv 2412.19437, sec. 2.2, eq. 21-25): ``model.mtp_depth`` = D
sequential modules after the main model, sharing its embedding and output head.

Module k (1..D), at position i: ``h'_i^k = M_k [RMSNorm(h_i^{k-1}); RMSNorm(Emb(t_{i+k}))]`` (eq. 21: ``hnorm``,
``enorm``, the projection ``proj``), ``h^k = TRM_k(h'^k)`` (eq. 22: one Transformer block, MoE after the
first ``first_k_dense`` layers like the main model's), ``P^k = OutHead(h^k)`` (eq. 23: its own final RMSNorm
``norm``, then the shared LM head). ``h^0`` is the main model's last hidden state before its final norm.
Depth k predicts the token k + 1 places ahead, at the S - k positions where it exists.

Loss (eq. 24-25): ``L^k = -1/T sum_i log P^k_i[t_i]`` over depth k's S - k targets with T = S, the tokens of
the main loss, and ``L_MTP = lambda / D sum_k L^k`` (``model.mtp_lambda``). The MTP blocks' balance losses
are weighted by lambda too, so with lambda = 0 the main model's loss and gradients are exactly those of a run
without MTP. Training only: in evaluation (``model.eval()``) and generation the modules do not run, and the
``transformers`` export leaves them out unless asked (``--with-mtp``: :mod:`moetrain.hf.deepseek_mtp`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config import ModelConfig
from moetrain.model.layers import RMSNorm

if TYPE_CHECKING:
    from moetrain.moe.layer import MoEStats


class MTPModule(nn.Module):
    """One depth of eq. 21-23 around ``block`` (built by the model, so its layer index follows the main ones)."""

    def __init__(self, cfg: ModelConfig, block: nn.Module) -> None:
        super().__init__()
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = block
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


def _cut(cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, n: int) -> tuple:  # type: ignore[type-arg]
    """The first n positions of per-token RoPE tables and a document mask (plain tables are cut by attention)."""
    if mask is None:
        return cos, sin, None
    return cos[:, :, :n], sin[:, :, :n], mask[:, :, :n, :n]


def mtp_logits(
    model: nn.Module,
    h_BSD: torch.Tensor,
    tokens_BS: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    stats: dict[int, MoEStats],
) -> list[torch.Tensor]:
    """Depth k's logits ``[B, S - k, V]`` for k = 1..D; the MTP blocks' MoE statistics go into ``stats`` with
    their balance losses times ``mtp_lambda`` (module docstring)."""
    lam = model.cfg.mtp_lambda
    out = []
    h = h_BSD
    S = tokens_BS.shape[1]
    for k, module in enumerate(model.mtp, start=1):
        n = S - k
        if n <= 0:
            break
        emb = model.embed(tokens_BS[:, k:])  # Emb(t_{i+k}) for i < S - k
        x = module.proj(torch.cat([module.hnorm(h[:, :n]), module.enorm(emb)], dim=-1))
        cos, sin, mask = _cut(*rope, n)
        idx = module.block.layer_idx
        h, s = module.block(x, cos=cos, sin=sin, token_ids_BS=tokens_BS[:, k:], cache=None, pos=0, mask=mask)
        if s is not None:
            stats[idx] = dataclasses.replace(s, aux_loss=s.aux_loss * lam)
        out.append(model.lm_head(module.norm(h)))
    return out


def mtp_loss(logits: list[torch.Tensor], targets_BS: torch.Tensor, lam: float) -> tuple[torch.Tensor, list]:  # type: ignore[type-arg]
    """(lambda / D sum_k L^k, [L^1, ..., L^D]) with ``L^k`` eq. 24's cross-entropy of depth k (fp32, summed over
    its S - k targets, divided by T = B S). ``targets_BS`` are the main loss's (the inputs shifted by one)."""
    B, S = targets_BS.shape
    per_depth = []
    for k, lg in enumerate(logits, start=1):
        ce = F.cross_entropy(lg.float().flatten(0, 1), targets_BS[:, k:].flatten(), reduction="sum")
        per_depth.append(ce / (B * S))
    total = (
        lam / len(per_depth) * torch.stack(per_depth).sum()
        if per_depth
        else targets_BS.new_zeros((), dtype=torch.float32)
    )
    return total, per_depth
