"""Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, sec. 2.1, eq. 9-19), its latent KV cache,
YaRN RoPE tables and softmax scale (DeepSeek-V3, arXiv 2412.19437, sec. 4.3), and what it costs.

Names follow DeepSeek's reference implementation (``wq`` / ``wq_a``, ``q_norm``, ``wq_b``, ``wkv_a``, ``kv_norm``,
``wkv_b``, ``wo``); eq. numbers are DeepSeek-V2's:

- queries (eq. 12-13, 15): ``c_Q = q_norm(W^DQ h)`` (``wq_a``), ``[q^C; q^R] = W^UQ c_Q`` (``wq_b``), or
  ``W_Q h`` (``wq``) without ``q_lora_rank``; ``q^R`` gets RoPE per head;
- keys and values (eq. 9-11, 14): ``[c_KV; k^R] = W^DKV h`` (``wkv_a``, one matrix for the latent and the
  RoPE key, which is shared by every head), ``c_KV`` normed (``kv_norm``), ``[k^C; v^C] = W^UK,UV c_KV``
  (``wkv_b``), ``k = [k^C; RoPE(k^R)]``;
- attention (eq. 16-19): softmax(q k^T x scale) v, then ``wo``. The scale is
  1/sqrt(d_h + d_h^R), times DeepSeek-V3's YaRN mscale^2 when ``rope_scaling.mscale_all_dim`` is set.

The latent norms keep DeepSeek's epsilon 1e-6 (its reference code and transformers' ``DeepseekV2Attention``
build them with the default), whatever ``model.norm_eps`` is. RoPE rotates interleaved pairs, as DeepSeek's
checkpoints are laid out (transformers' ``rope_interleave=True``).

Generation caches, per token and layer, only ``c_KV`` and the rotated ``k^R``: ``kv_lora_rank +
qk_rope_head_dim`` numbers instead of GQA's ``2 n_kv_heads head_dim`` (:func:`kv_numbers_per_token`). Decode
steps (a cache, ``pos > 0``) attend in the latent space by default (:meth:`MLA.absorbed`; DeepSeek-V2 sec.
2.1.2: W^UK absorbed into the query, W^UV applied after the weighted sum, as DeepSeek-V3's reference
``attn_impl="absorb"``), so no cached position is re-expanded; ``absorb_decode = False`` (``moetrain-generate
--mla-decode expanded``) re-expands the cached latents through ``wkv_b`` as transformers does. The prefill and
training always expand.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config import ModelConfig, RopeScalingConfig
from moetrain.model.layers import RMSNorm, apply_rope, rope_tables

LATENT_NORM_EPS = 1e-6
"""Epsilon of ``q_norm`` / ``kv_norm`` (DeepSeek's reference ``RMSNorm`` default)."""


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 mscale ln(s) + 1 (Peng et al. 2023, eq. 22; 1 when s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, theta: float, r: RopeScalingConfig) -> torch.Tensor:
    """YaRN's per-pair frequencies (float64): interpolated by 1/s below the slow boundary, kept above the fast
    one, a linear ramp between (Peng et al. 2023, sec. 3.2; DeepSeek-V3's ``precompute_freqs_cis``,
    transformers' ``_compute_yarn_parameters`` with ``truncate``)."""
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(r.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(r.beta_fast)), 0)
    high = min(math.ceil(correction_dim(r.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (1 / (r.factor * base)) * (1 - extrapolation) + (1 / base) * extrapolation


def rope_dim(cfg: ModelConfig) -> int:
    """The width RoPE rotates: the head dim (GQA) or ``qk_rope_head_dim`` (MLA)."""
    return cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.dim // cfg.n_heads


def model_rope_tables(cfg: ModelConfig, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[S, rope_dim / 2]`` of the model: plain RoPE, or YaRN's frequencies with the tables
    scaled by its attention factor mscale(s, mscale) / mscale(s, mscale_all_dim) (transformers' convention)."""
    dim, r = rope_dim(cfg), cfg.rope_scaling
    if r.type != "yarn":
        return rope_tables(dim, max_seq_len, cfg.rope_theta)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), yarn_inv_freq(dim, cfg.rope_theta, r))
    if r.mscale and r.mscale_all_dim:
        factor = yarn_get_mscale(r.factor, r.mscale) / yarn_get_mscale(r.factor, r.mscale_all_dim)
    else:
        factor = yarn_get_mscale(r.factor)
    return (angles.cos() * factor).float(), (angles.sin() * factor).float()


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_h + d_h^R) (DeepSeek-V2 eq. 17), times mscale(s, mscale_all_dim)^2 under YaRN (DeepSeek-V3)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    r = cfg.rope_scaling
    if r.type == "yarn" and r.mscale_all_dim:
        scale *= yarn_get_mscale(r.factor, r.mscale_all_dim) ** 2
    return scale


class LatentCache(nn.Module):
    """The generation cache of one MLA layer: the normed latent c_KV and the rotated shared key k^R."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, device, dtype) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.register_buffer("c", torch.zeros(batch, max_len, kv_lora_rank, device=device, dtype=dtype), False)
        self.register_buffer("k_rope", torch.zeros(batch, 1, max_len, rope_dim, device=device, dtype=dtype), False)

    def update(self, pos: int, c_BSC: torch.Tensor, kr_B1SR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store positions [pos, pos + S) and return the latents and RoPE keys of [0, pos + S)."""
        end = pos + c_BSC.shape[1]
        self.c[:, pos:end] = c_BSC
        self.k_rope[:, :, pos:end] = kr_B1SR
        return self.c[:, :end], self.k_rope[:, :, :end]


class MLA(nn.Module):
    """Multi-head Latent Attention (module docstring); the same call as :class:`~moetrain.model.layers.Attention`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H = cfg.dim, cfg.n_heads
        self.n_heads, self.kv_lora_rank = H, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = self.nope + self.rope
        if cfg.q_lora_rank is None:
            self.wq: nn.Linear | None = nn.Linear(D, H * qk, bias=False)
        else:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
            self.wq = None
        self.wkv_a = nn.Linear(D, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, D, bias=False)
        self.scale = softmax_scale(cfg)
        self.absorb_decode = True  # decode steps in the latent space (module docstring); not a tensor

    def queries(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q^C, q^R) ``[B, H, S, d_h]``, ``[B, H, S, d_h^R]`` (eq. 12-13, 15; ``q^R`` not yet rotated)."""
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q = q.view(B, S, self.n_heads, self.nope + self.rope).transpose(1, 2)
        return q.split([self.nope, self.rope], dim=-1)  # type: ignore[return-value]

    def expand(self, c_BTC: torch.Tensor, kr_B1TR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[B, H, T, d_h + d_h^R]`` and values ``[B, H, T, d_v]`` of the latents (eq. 10-11, 14)."""
        B, T, _ = c_BTC.shape
        kv = self.wkv_b(c_BTC).view(B, T, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        return torch.cat([k_nope, kr_B1TR.expand(B, self.n_heads, T, self.rope)], dim=-1), v

    def absorbed(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        c_BTC: torch.Tensor,
        kr_B1TR: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The attention output ``[B, H, S, d_v]`` computed in the latent space (DeepSeek-V2 sec. 2.1.2):
        ``q^C . (W^UK_h c_t) = (W^UK_h^T q^C) . c_t``, so each head's query is absorbed into ``d_c`` and the
        keys are the cached ``[c_t; k^R_t]`` shared by every head (multi-query attention of width d_c +
        d_h^R); the weighted sum of the ``c_t`` goes through ``W^UV_h`` after. Nothing per cached position is
        expanded."""
        B, H, T = c_BTC.shape[0], self.n_heads, c_BTC.shape[1]
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)  # [H, d_h, d_c], [H, d_v, d_c]
        q = torch.cat([torch.einsum("bhsn,hnc->bhsc", q_nope, w_uk), q_rope], dim=-1)
        k = torch.cat([c_BTC.unsqueeze(1), kr_B1TR], dim=-1).expand(B, H, T, self.kv_lora_rank + self.rope)
        v = c_BTC.unsqueeze(1).expand(B, H, T, self.kv_lora_rank)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return torch.einsum("bhsc,hvc->bhsv", o, w_uv)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        pos: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens at positions [pos, pos + S); with a cache, attend to every earlier position too. A document
        ``mask`` ``[B, 1, S, S]`` comes with per-token ``cos`` / ``sin`` (``document_layout``)."""
        B, S, _ = x_BSD.shape
        q_nope, q_rope = self.queries(x_BSD)
        c, k_rope = self.wkv_a(x_BSD).split([self.kv_lora_rank, self.rope], dim=-1)
        c, k_rope = self.kv_norm(c), k_rope.unsqueeze(1)  # [B, S, d_c], [B, 1, S, d_h^R]
        if mask is None:
            cos, sin = cos[pos : pos + S], sin[pos : pos + S]
        q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        if cache is not None:
            c, k_rope = cache.update(pos, c, k_rope)
        if mask is None and pos > 0:  # query i (absolute position pos + i) sees keys 0 .. pos + i
            mask = torch.ones(S, pos + S, dtype=torch.bool, device=x_BSD.device).tril(diagonal=pos)
        if cache is not None and pos > 0 and self.absorb_decode:
            o = self.absorbed(q_nope, q_rope, c, k_rope, mask)
        else:
            k, v = self.expand(c, k_rope)
            q = torch.cat([q_nope, q_rope], dim=-1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.wo(o.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))


def set_absorbed_decode(model: nn.Module, absorbed: bool) -> None:
    """Every MLA layer's decode steps in the latent space (``True``, the default) or re-expanded (``False``)."""
    for module in model.modules():
        if isinstance(module, MLA):
            module.absorb_decode = absorbed


def latent_caches(cfg: ModelConfig, n_layers: int, batch: int, max_len: int, device, dtype) -> list[LatentCache]:  # type: ignore[no-untyped-def]
    """One empty :class:`LatentCache` per layer."""
    return [LatentCache(batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, device, dtype) for _ in range(n_layers)]


def kv_numbers_per_token(cfg: ModelConfig) -> int:
    """Numbers the generation cache holds per token and layer: ``kv_lora_rank + qk_rope_head_dim`` (MLA) or
    ``2 n_kv_heads head_dim`` (GQA). DeepSeek-V2 sec. 2.1.4: MLA's (d_c + d_h^R) against MHA's 2 n_h d_h."""
    if cfg.attention == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * (cfg.n_kv_heads or cfg.n_heads) * (cfg.dim // cfg.n_heads)


def attention_score_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the attention scores and the weighted sum (not the projections): 6 L S H
    (d_qk + d_v), i.e. 12 L D S when d_qk = d_v = D / H (PaLM, Chowdhery et al. 2022, appendix B)."""
    if cfg.attention == "mla":
        width = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    else:
        width = 2 * cfg.dim
    return 6.0 * cfg.n_layers * seq_len * width
