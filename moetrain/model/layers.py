"""Building blocks of the plain Transformer: RMSNorm, RoPE, GQA attention, KV cache.

The SwiGLU MLP of the dense layers is :class:`moetrain.moe.experts.SwiGLU` (the shared experts' too).

Shape suffixes: B batch, S sequence, D model dim, H query heads, G kv heads,
Dh head dim, F MLP hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, Dh/2] of rotary position embeddings (Su et al. 2021, eq. 34)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2j], x[2j+1]) of every head by the position's angles."""
    x = x_BHSD.float().unflatten(-1, (-1, 2))  # [B, H, S, Dh/2, 2]
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack((x0 * cos_SD - x1 * sin_SD, x0 * sin_SD + x1 * cos_SD), dim=-1)
    return out.flatten(-2).type_as(x_BHSD)


def document_ids(tokens_BS: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document index of every token of packed rows: the token after each EOS starts a new document."""
    is_eos = (tokens_BS == eos_id).long()
    return torch.cumsum(is_eos, dim=1) - is_eos  # EOS belongs to the document it ends


def document_layout(
    doc_BS: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token RoPE tables ``[B, 1, S, Dh/2]`` with positions restarting at each document, and the
    block-diagonal causal mask ``[B, 1, S, S]`` (True = attend: same document, not in the future)."""
    B, S = doc_BS.shape
    idx = torch.arange(S, device=doc_BS.device).expand(B, S)
    starts = torch.ones_like(doc_BS, dtype=torch.bool)
    starts[:, 1:] = doc_BS[:, 1:] != doc_BS[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    positions_BS = idx - first
    mask = (doc_BS[:, :, None] == doc_BS[:, None, :]) & torch.ones(S, S, dtype=torch.bool, device=doc_BS.device).tril()
    return cos_SD[positions_BS].unsqueeze(1), sin_SD[positions_BS].unsqueeze(1), mask.unsqueeze(1)


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer for incremental decoding."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, pos: int, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions [pos, pos + S) and return keys/values of [0, pos + S)."""
        end = pos + k_BGSD.shape[2]
        self.k[:, :, pos:end] = k_BGSD
        self.v[:, :, pos:end] = v_BGSD
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query attention (Ainslie et al. 2023)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        qk_norm: bool = False,
        eps: float = 1e-6,
        bias: bool = False,
        qk_norm_scope: str = "head",
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=bias)  # biased q, k, v: Qwen2 / Qwen1.5-MoE
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        # RMSNorm of q and k before RoPE, per head (Qwen3) or over all heads at once (OLMoE, OLMo-2);
        # absent (no parameters) by default.
        self.norm_all = qk_norm_scope == "all"
        q_width, k_width = (
            (n_heads * self.head_dim, n_kv_heads * self.head_dim) if self.norm_all else (self.head_dim,) * 2
        )
        self.q_norm = RMSNorm(q_width, eps) if qk_norm else None
        self.k_norm = RMSNorm(k_width, eps) if qk_norm else None

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        pos: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens at positions [pos, pos + S); with a cache, attend to every earlier position too.

        With a document ``mask`` ``[B, 1, S, S]`` (:func:`document_layout`), ``cos`` / ``sin`` are
        already per token (``[B, 1, S, Dh/2]``) and attention stays inside each document."""
        B, S, _ = x_BSD.shape
        q, k = self.wq(x_BSD), self.wk(x_BSD)
        if self.norm_all and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over all heads at once, per position
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, Dh]
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, G, S, Dh]
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if not self.norm_all and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over Dh, per head and position
        if mask is None:
            cos, sin = cos[pos : pos + S], sin[pos : pos + S]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_heads != self.n_kv_heads
        if mask is not None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif cache is None or (pos == 0 and S > 1):
            if cache is not None:
                cache.update(pos, k, v)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = cache.update(pos, k, v)  # [B, G, pos + S, Dh]
            # query i (absolute position pos + i) sees keys 0 .. pos + i
            mask = torch.ones(S, pos + S, dtype=torch.bool, device=x_BSD.device).tril(diagonal=pos)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))
