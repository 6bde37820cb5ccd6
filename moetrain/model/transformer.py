"""The decoder-only MoE Transformer: a plain single-device ``nn.Module``.

Parallelism is applied to it from outside (``moetrain.parallel``); the model
never asks whether it is distributed.

Shape suffixes: B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moetrain.config import ModelConfig, MoEConfig, resolve_num_groups
from moetrain.model.layers import Attention, KVCache, RMSNorm, document_ids, document_layout
from moetrain.model.mla import MLA, LatentCache, latent_caches, model_rope_tables
from moetrain.model.mtp import MTPModule, mtp_logits
from moetrain.moe.experts import SwiGLU
from moetrain.moe.layer import MoELayer, MoEStats
from moetrain.moe.losses import model_loss


def is_moe_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    """Layers [0, first_k_dense) are dense; after them every ``moe_every``-th layer is MoE."""
    return layer_idx >= cfg.first_k_dense and (layer_idx - cfg.first_k_dense) % cfg.moe_every == 0


class Block(nn.Module):
    """Pre-norm block: x = x + attn(norm(x)); x = x + ffn(norm(x))."""

    def __init__(
        self, cfg: ModelConfig, moe_cfg: MoEConfig, layer_idx: int, num_groups: int, vocab_size: int | None = None
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn: nn.Module = (
            MLA(cfg)
            if cfg.attention == "mla"
            else Attention(
                cfg.dim,
                cfg.n_heads,
                cfg.n_kv_heads or cfg.n_heads,
                cfg.qk_norm,
                cfg.norm_eps,
                cfg.attention_bias,
                cfg.qk_norm_scope,
            )
        )
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = is_moe_layer(cfg, layer_idx)
        self.ffn: nn.Module = (
            MoELayer(cfg.dim, moe_cfg, num_groups=num_groups, vocab_size=vocab_size, layer_idx=layer_idx)
            if self.is_moe
            else SwiGLU(cfg.dim, cfg.ffn_hidden_size)
        )

    def forward(
        self,
        x_BSD: torch.Tensor,
        *,
        cos: torch.Tensor,
        sin: torch.Tensor,
        token_ids_BS: torch.Tensor,
        cache: KVCache | None = None,
        pos: int = 0,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, cache, pos, mask)
        h = self.ffn_norm(x_BSD)
        if self.is_moe:
            y, stats = self.ffn(h, token_ids_BS)
            return x_BSD + y, stats
        return x_BSD + self.ffn(h), None


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """[B, S, V] next-token logits."""
    moe_stats: dict[int, MoEStats]
    """Statistics of each MoE layer, by block index."""
    pooled_loss: torch.Tensor | None = None
    """The weighted ``model``-scope balance losses, pooled over all MoE layers (:func:`pooled_loss`)."""
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    """Multi-token prediction, training only: depth k's ``[B, S - k, V]`` logits (:mod:`moetrain.model.mtp`)."""
    mtp_lambda: float = 0.0
    """lambda of the MTP loss (``model.mtp_lambda``), for :func:`~moetrain.model.mtp.mtp_loss`."""

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum over MoE layers of their weighted balance losses (plus the pooled expert loss, if any)."""
        total = sum((s.aux_loss for s in self.moe_stats.values()), torch.zeros((), device=self.logits.device))
        return total if self.pooled_loss is None else total + self.pooled_loss


def pooled_loss(moe_cfg: MoEConfig, stats: dict[int, MoEStats]) -> torch.Tensor | None:
    """The enabled ``model``-scope balance losses over this forward's MoE layers
    (:func:`~moetrain.moe.losses.model_loss`): transformers' ``load_balancing_loss_func`` times ``expert_coef``
    when ``balance.expert_form=transformers``."""
    return model_loss(moe_cfg.balance, list(stats.values()), moe_cfg.top_k)


class Transformer(nn.Module):
    """Token embedding, N pre-norm blocks, final RMSNorm, LM head (optionally tied).

    ``num_groups``: the device groups of device-limited routing, resolved once by :func:`build_model` and
    carried by the model (and each MoE layer), so inference and export need no EP size. ``skip_init``: leave
    the parameters as constructed (the meta-device build, :mod:`moetrain.parallel.meta_init`, draws them itself).

    ``doc_eos`` (``data.doc_mask``): packed rows are split into documents after each ``doc_eos``
    token; attention stays inside a document and RoPE positions restart at each one.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        moe_cfg: MoEConfig,
        vocab_size: int,
        max_seq_len: int,
        num_groups: int = 1,
        doc_eos: int | None = None,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        self.doc_eos = doc_eos
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.num_groups = num_groups
        self.embed = nn.Embedding(vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, moe_cfg, i, num_groups, vocab_size) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        with torch.random.fork_rng(devices=[]):  # registered last, built aside: the main model's draws unchanged
            self.mtp = nn.ModuleList(
                MTPModule(cfg, Block(cfg, moe_cfg, cfg.n_layers + k, num_groups, vocab_size))
                for k in range(cfg.mtp_depth)
            )
        cos, sin = model_rope_tables(cfg, max_seq_len)  # the head dim's, or MLA's RoPE width's (YaRN too)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not skip_init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) for every matrix; residual-output projections (attention out,
        MLP/expert down) scaled by 1/sqrt(2 n_layers) (GPT-2, Radford et al. 2019);
        norms at 1; loss-free biases at 0 (:meth:`init_std_of`, :meth:`zero_init`)."""
        for name, p in self.named_parameters():
            std = self.init_std_of(name, p)
            if std is None:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        self.zero_init()

    def init_std_of(self, name: str, p: torch.Tensor) -> float | None:
        """The std of parameter ``name``'s normal draw; None for a vector (filled with 1). The one rule shared
        by :meth:`init_weights` and the meta-device build (:mod:`moetrain.parallel.meta_init`)."""
        if p.dim() == 1:
            return None
        std = self.cfg.init_std
        if name.endswith(("attn.wo.weight", "w2.weight", "experts.w2")):
            return std / math.sqrt(2 * self.cfg.n_layers)
        return std

    @torch.no_grad()
    def zero_init(self) -> None:
        """After the draws: loss-free biases and attention biases at 0; with ``router.zero_init`` the router
        weights too."""
        for name, buf in self.named_buffers():
            if name.endswith("expert_bias"):
                buf.zero_()
        for name, p in self.named_parameters():
            if name.endswith(".bias"):  # the q/k/v biases (model.attention_bias) start at 0
                p.zero_()
        if self.moe_cfg.router.zero_init:  # Shazeer et al. 2017, appendix A: no signal and some noise at first
            for name, p in self.named_parameters():
                if name.endswith(("router.weight", "router.noise_weight")):
                    p.zero_()

    def moe_layers(self) -> dict[int, MoELayer]:
        """The MoE layers by layer index, the multi-token prediction blocks' (indices from ``n_layers``) too."""
        blocks = [*self.blocks, *(m.block for m in self.mtp)]
        return {b.layer_idx: b.ffn for b in blocks if b.is_moe}  # type: ignore[misc]

    def new_kv_caches(
        self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> list[KVCache] | list[LatentCache]:
        """One empty :class:`KVCache` (MLA: :class:`~moetrain.model.mla.LatentCache`) per block for incremental
        decoding of up to ``max_len`` positions."""
        max_len = max_len or self.max_seq_len
        if max_len > self.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {self.max_seq_len}")
        w = self.embed.weight
        if self.cfg.attention == "mla":
            return latent_caches(self.cfg, len(self.blocks), batch, max_len, w.device, dtype or w.dtype)
        n_kv = self.cfg.n_kv_heads or self.cfg.n_heads
        head_dim = self.cfg.dim // self.cfg.n_heads
        return [KVCache(batch, n_kv, max_len, head_dim, w.device, dtype or w.dtype) for _ in self.blocks]

    def forward(
        self,
        tokens_BS: torch.Tensor,
        caches: list[KVCache] | None = None,
        pos: int = 0,
        doc_ids_BS: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for tokens at positions [pos, pos + S); ``caches`` (from :meth:`new_kv_caches`)
        hold the keys and values of the earlier positions for incremental decoding.

        The step's global-batch routing counts (``moe.balance.scope=global``) reach the MoE layers through
        :func:`~moetrain.moe.step_state.step_state`, not through here. ``doc_ids_BS`` (non-decreasing along
        each row; default: from ``doc_eos`` when set, without caches) masks attention across documents and
        restarts positions per document.
        """
        S = tokens_BS.shape[1]
        if pos + S > self.max_seq_len:
            raise ValueError(f"positions up to {pos + S} exceed the model's max_seq_len {self.max_seq_len}")
        if doc_ids_BS is None and self.doc_eos is not None and caches is None:
            doc_ids_BS = document_ids(tokens_BS, self.doc_eos)
        cos, sin, mask = self.rope_cos, self.rope_sin, None
        if doc_ids_BS is not None:
            if caches is not None:
                raise ValueError("document masking (doc_ids_BS) is not supported with KV caches")
            cos, sin, mask = document_layout(doc_ids_BS, self.rope_cos[:S], self.rope_sin[:S])
        x = self.embed(tokens_BS)
        stats: dict[int, MoEStats] = {}
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            x, s = block(x, cos=cos, sin=sin, token_ids_BS=tokens_BS, cache=cache, pos=pos, mask=mask)
            if s is not None:
                stats[block.layer_idx] = s
        mtp = mtp_logits(self, x, tokens_BS, (cos, sin, mask), stats) if self.training else []
        logits = self.lm_head(self.norm(x))
        return ModelOutput(logits, stats, pooled_loss(self.moe_cfg, stats), mtp, self.cfg.mtp_lambda)

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by part, the one counting rule (``moetrain.tools.plan`` reports these too).

        Parts: ``embedding``, ``lm_head`` (0 when tied), ``attention`` (with every
        norm), ``dense_ffn``, ``router``, ``shared_experts``, ``routed_experts``
        (all N experts: under expert parallelism a rank's N / ep experts are
        scaled up to N, so the count does not depend on ep) and
        ``routed_experts_active`` (K of the N per MoE layer), plus ``moe_layers``; ``mtp``, the multi-token
        prediction modules, is apart from the totals (DeepSeek-V3 counts its 671B without them).
        """
        moe = self.moe_cfg
        out = dict.fromkeys(PARAM_PARTS, 0)
        for name, p in self.named_parameters():
            n = p.numel()
            if name.endswith(("experts.w13", "experts.w2")):
                n = n // p.shape[0] * moe.num_experts
                if not name.startswith("mtp."):
                    out["routed_experts_active"] += n * moe.top_k // moe.num_experts
            out[_param_part(name)] += n
        out["moe_layers"] = len(self.moe_layers())
        return out

    def num_params(self, active: bool = False, embeddings: bool = True) -> int:
        """Parameter count of the whole model (:meth:`param_counts`); ``active`` counts only K of N routed
        experts per MoE layer; ``embeddings=False`` leaves out the embedding and the LM head."""
        total, active_total = total_and_active(self.param_counts(), embeddings)
        return active_total if active else total


def active_per_token(counts: dict[str, int], tied: bool) -> int:
    """DeepSeek's "activated parameters" reading (docs/deepseek.md): K of N routed experts, the LM head in, the
    embedding lookup out (a lookup reads one row per token; a tied table is the head and stays in)."""
    return total_and_active(counts)[1] - (0 if tied else counts["embedding"])


def total_and_active(counts: dict[str, int], embeddings: bool = True) -> tuple[int, int]:
    """(total, active) parameters from :meth:`Transformer.param_counts`: active counts K of N routed experts."""
    skip = {"routed_experts", "routed_experts_active", "moe_layers", "mtp"} | (
        set() if embeddings else {"embedding", "lm_head"}
    )
    base = sum(v for k, v in counts.items() if k not in skip)
    return base + counts["routed_experts"], base + counts["routed_experts_active"]


PARAM_PARTS = (
    "embedding", "lm_head", "attention", "dense_ffn", "router", "shared_experts",
    "routed_experts", "routed_experts_active", "moe_layers", "mtp",
)  # fmt: skip
"""The parts of :meth:`Transformer.param_counts`."""


def _param_part(name: str) -> str:
    """The part of :meth:`Transformer.param_counts` a parameter belongs to, by its name."""
    if name == "embed.weight":
        return "embedding"
    if name.startswith("mtp."):
        return "mtp"
    if name == "lm_head.weight":
        return "lm_head"
    if ".ffn.experts." in name:
        return "routed_experts"
    if ".ffn.router." in name:
        return "router"
    if ".ffn.shared" in name:  # the shared experts and their gate
        return "shared_experts"
    if ".ffn." in name:
        return "dense_ffn"
    return "attention"


def vocab_for(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    """The model's vocabulary: ``cfg.vocab_size`` or the tokenizer's rounded up to ``vocab_multiple``."""
    if cfg.vocab_size is not None:
        if cfg.vocab_size < tokenizer_vocab:
            from moetrain.config import ConfigError

            raise ConfigError(f"model.vocab_size={cfg.vocab_size}: smaller than the tokenizer's {tokenizer_vocab}")
        return cfg.vocab_size
    m = cfg.vocab_multiple
    return -(-tokenizer_vocab // m) * m


def build_model(
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    vocab_size: int,
    max_seq_len: int,
    ep: int = 1,
    seed: int | None = None,
    num_groups: int | None = None,
    doc_eos: int | None = None,
) -> Transformer:
    """Build the plain model from config dataclasses (no Hydra needed).

    ``vocab_size`` is the model's (see :func:`vocab_for`). ``num_groups``: the
    device groups of a trained model (its checkpoint's ``arch``); else resolved
    from the config and the EP size (:func:`~moetrain.config.resolve_num_groups`).
    """
    if num_groups is None:
        num_groups = resolve_num_groups(moe_cfg, ep)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Transformer(model_cfg, moe_cfg, vocab_size, max_seq_len, num_groups, doc_eos)
    return Transformer(model_cfg, moe_cfg, vocab_size, max_seq_len, num_groups, doc_eos)
