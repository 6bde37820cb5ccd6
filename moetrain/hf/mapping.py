"""moetrain <-> ``transformers`` architectures: which one a config maps onto, its config, and the tensor names.

Three architectures map exactly (same logits):

- **Mixtral** (``MixtralForCausalLM``; Jiang et al. 2024): every layer MoE, no
  shared experts, softmax top-K with the K weights renormalised.
- **Qwen2-MoE** (``Qwen2MoeForCausalLM``): the same routing (renormalised or
  not), shared experts multiplied by ``sigmoid(x w_g)``, dense layers anywhere
  (``mlp_only_layers``). With ``moe.shared_expert_gate=true`` the gate is
  moetrain's own; without it the export writes ``w_g = 0`` (gate 1/2 for every
  token) and doubles the shared down-projection, which is exact in floating point.
- **Qwen3-MoE** (``Qwen3MoeForCausalLM``): ``model.qk_norm=true`` (per-head RMSNorm
  of q and k), no shared experts, dense layers anywhere.
- **OLMoE** (``OlmoeForCausalLM``; Muennighoff et al. 2024): ``model.qk_norm=true`` with
  ``model.qk_norm_scope=all`` (one RMSNorm over all heads' q, one over k), every layer MoE, no
  shared experts. Its norm weights are permuted head by head like the q/k rows.

Qwen2-MoE's q/k/v biases (Qwen1.5-MoE) are ``model.attention_bias=true``; the q and k biases
are permuted like their rows.

RoPE: moetrain rotates interleaved pairs ``(x[2j], x[2j+1])`` (Su et al. 2021,
eq. 34), ``transformers`` rotates halves ``(x[j], x[j + Dh/2])``
(``rotate_half``). Both use frequency ``theta^(-2j/Dh)`` for pair j, so
permuting each head's rows of ``W_q`` and ``W_k`` (and the q/k norm weights) by
``[0, 2, 4, ..., 1, 3, ...]`` gives the same attention scores.
"""

from __future__ import annotations

from typing import Any

import torch

from moetrain.config import ModelConfig, MoEConfig, TrainConfig, resolve_num_groups
from moetrain.model.transformer import Transformer, is_moe_layer
from moetrain.moe.strategies import STRATEGIES

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
"""``model_type`` of each ``transformers`` architecture moetrain maps onto exactly."""


class ExportError(ValueError):
    """The model cannot be exported in the requested form (one line: what and why)."""


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Row order taking interleaved RoPE pairs to rotate-half layout: ``[0, 2, ..., Dh-2, 1, 3, ..., Dh-1]``."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def permute_heads(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Permute each head's rows of a q/k projection ``[n_heads * Dh, D]`` (or a norm weight ``[Dh]``, n_heads=1)."""
    head_dim = w.shape[0] // n_heads
    perm = rope_permutation(head_dim)
    if inverse:
        perm = torch.argsort(perm)
    return w.reshape(n_heads, head_dim, -1)[:, perm].reshape_as(w)


def _refuse(key: str, value: Any, why: str) -> ExportError:
    return ExportError(f"{key}={value!r}: {why}; transformers has no architecture that computes this")


def check_routing(cfg: TrainConfig, model: Transformer | None) -> bool:
    """Raise unless the routing is plain softmax top-K (what Mixtral / Qwen route with); returns whether the
    K weights are renormalised."""
    r = cfg.moe.router
    strategy = STRATEGIES.get(r.strategy)
    if strategy is None or "softmax_topk" not in strategy.hf_routers:
        raise _refuse("moe.router.strategy", r.strategy, "only plain token-choice top-K maps")
    if r.score_fn != "softmax":
        raise _refuse("moe.router.score_fn", r.score_fn, "Mixtral / Qwen2-MoE route with softmax scores")
    if r.scaling_factor != 1.0:
        raise _refuse("moe.router.scaling_factor", r.scaling_factor, "routed scaling is not in Mixtral / Qwen2-MoE")
    groups = model.num_groups if model is not None else resolve_num_groups(cfg.moe, cfg.parallel.ep)
    if r.topk_groups is not None and r.topk_groups < groups:
        raise _refuse("moe.router.topk_groups", r.topk_groups, "device-limited routing is not in Mixtral / Qwen2-MoE")
    if r.eval_capacity_factor is not None:
        raise _refuse("moe.router.eval_capacity_factor", r.eval_capacity_factor, "capacity drops tokens at inference")
    if model is not None and r.bias_update_rate > 0:
        biases = [layer.router.expert_bias for layer in model.moe_layers().values()]
        if any(b.abs().max() > 0 for b in biases):
            raise _refuse("moe.router.bias_update_rate", r.bias_update_rate, "the loss-free bias changes expert choice")
    return r.norm_topk_prob or strategy.renormalised  # topk_softmax: softmax over the K logits = renormalised


def hf_architecture(cfg: TrainConfig, model: Transformer | None = None) -> str:
    """``mixtral``, ``qwen2_moe`` or ``qwen3_moe``; :class:`ExportError` naming the first key that does not map."""
    m, moe = cfg.model, cfg.moe
    renormalised = check_routing(cfg, model)
    if m.attention_bias and (m.qk_norm or moe.num_shared_experts == 0):
        raise _refuse("model.attention_bias", True, "q/k/v biases map onto Qwen2-MoE (shared experts, no q/k norm)")
    if m.qk_norm and m.qk_norm_scope == "all":
        if moe.num_shared_experts or m.first_k_dense or m.moe_every != 1:
            raise _refuse("model.qk_norm_scope", "all", "OLMoE has MoE in every layer and no shared experts")
        return "olmoe"
    if m.qk_norm:
        if moe.num_shared_experts:
            raise _refuse(
                "moe.num_shared_experts", moe.num_shared_experts, "Qwen3-MoE (q/k norms) has no shared expert"
            )
        return "qwen3_moe"
    if moe.num_shared_experts == 0:
        if m.first_k_dense != 0 or m.moe_every != 1:
            raise _refuse(
                "model.first_k_dense", m.first_k_dense, "Mixtral has MoE in every layer (and no shared experts)"
            )
        if not renormalised:
            raise _refuse("moe.router.norm_topk_prob", cfg.moe.router.norm_topk_prob, "Mixtral renormalises")
        return "mixtral"
    return "qwen2_moe"


def common_hf_keys(cfg: TrainConfig, vocab_size: int, special: dict[str, int] | None = None) -> dict[str, Any]:
    """The ``transformers`` config keys every mapped architecture (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3)
    takes from moetrain's config alike: sizes, heads, context, norm epsilon, tying, top-K, SwiGLU, fp32, and the
    tokenizer's special-token ids."""
    m = cfg.model
    return {
        "vocab_size": vocab_size,
        "hidden_size": m.dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads or m.n_heads,
        "max_position_embeddings": cfg.data.seq_len,
        "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "num_experts_per_tok": cfg.moe.top_k,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **(special or {}),
    }


def hf_config(cfg: TrainConfig, vocab_size: int, arch: str, special: dict[str, int] | None = None) -> Any:
    """The ``transformers`` config of ``arch`` with moetrain's sizes (and the tokenizer's special-token ids)."""
    import transformers

    m, moe = cfg.model, cfg.moe
    common: dict[str, Any] = {
        **common_hf_keys(cfg, vocab_size, special),
        "head_dim": m.dim // m.n_heads,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_dropout": 0.0,
    }
    if arch == "mixtral":
        return transformers.MixtralConfig(
            **common,
            intermediate_size=moe.expert_hidden_size,
            num_local_experts=moe.num_experts,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    qwen: dict[str, Any] = {
        "intermediate_size": m.ffn_hidden_size,
        "moe_intermediate_size": moe.expert_hidden_size,
        "num_experts": moe.num_experts,
        "norm_topk_prob": moe.router.norm_topk_prob or STRATEGIES[moe.router.strategy].renormalised,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(m.n_layers) if not is_moe_layer(m, i)],
        "use_sliding_window": False,
    }
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, **qwen, attention_bias=False)
    if arch == "olmoe":
        qwen["intermediate_size"] = moe.expert_hidden_size
        keep = ("intermediate_size", "num_experts", "norm_topk_prob")
        return transformers.OlmoeConfig(**common, **{k: qwen[k] for k in keep}, clip_qkv=None, attention_bias=False)
    shared = (moe.shared_hidden_size or moe.expert_hidden_size) * moe.num_shared_experts
    qkv_bias = m.attention_bias
    return transformers.Qwen2MoeConfig(**common, **qwen, shared_expert_intermediate_size=shared, qkv_bias=qkv_bias)


def hf_class(arch: str) -> Any:
    """The ``transformers`` causal-LM class of ``arch``."""
    import transformers

    return {
        "mixtral": transformers.MixtralForCausalLM,
        "qwen2_moe": transformers.Qwen2MoeForCausalLM,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
        "olmoe": transformers.OlmoeForCausalLM,
    }[arch]


def _expert_names(arch: str) -> tuple[str, str, str]:
    """(gate, up, down) names of one expert's linears in the per-expert (transformers 4) layout."""
    return ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")


ATTN_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
}
DENSE_MAP = {"ffn.w1.weight": "mlp.gate_proj.weight", "ffn.w3.weight": "mlp.up_proj.weight"}
DENSE_MAP["ffn.w2.weight"] = "mlp.down_proj.weight"
SHARED_MAP = {"ffn.shared.w1.weight": "shared_expert.gate_proj.weight"}
SHARED_MAP["ffn.shared.w3.weight"] = "shared_expert.up_proj.weight"


def _qk_tensors(m: ModelConfig) -> list[tuple[str, str, int | None]]:
    """(moetrain, transformers, heads to permute by; None = as is) of a block's q/k/v tensors: the projections,
    the biases (``attention_bias``) and the q/k norms (per head: one head's order; ``all``: every head's)."""
    heads, kv = m.n_heads, m.n_kv_heads or m.n_heads
    out: list[tuple[str, str, int | None]] = [("wq.weight", "q_proj.weight", heads), ("wk.weight", "k_proj.weight", kv)]
    if m.attention_bias:
        out += [("wq.bias", "q_proj.bias", heads), ("wk.bias", "k_proj.bias", kv), ("wv.bias", "v_proj.bias", None)]
    if m.qk_norm:
        whole = m.qk_norm_scope == "all"
        out += [("q_norm.weight", "q_norm.weight", heads if whole else 1)]
        out += [("k_norm.weight", "k_norm.weight", kv if whole else 1)]
    return out


def _attention_to_hf(sd: dict[str, torch.Tensor], m: ModelConfig, p: str, h: str) -> dict[str, torch.Tensor]:
    """One block's norms and attention under transformers names (q/k rows in rotate-half order)."""
    out = {h + theirs: sd[p + ours] for ours, theirs in ATTN_MAP.items()}
    for ours, theirs, n in _qk_tensors(m):
        t = sd[p + "attn." + ours]
        out[h + "self_attn." + theirs] = t if n is None else permute_heads(t, n)
    return out


def _experts_to_hf(sd: dict[str, torch.Tensor], p: str, e: str, arch: str, fused: bool) -> dict[str, torch.Tensor]:
    """One MoE layer's router and routed experts (fused transformers-5 tensors, or per expert)."""
    out = {e + "gate.weight": sd[p + "ffn.router.weight"]}
    w13, w2 = sd[p + "ffn.experts.w13"], sd[p + "ffn.experts.w2"]  # [N, D, 2F], [N, F, D]
    if fused:
        out[e + "experts.gate_up_proj"] = w13.transpose(1, 2).contiguous()  # [N, 2F, D]: gate rows, then up
        out[e + "experts.down_proj"] = w2.transpose(1, 2).contiguous()  # [N, D, F]
        return out
    g_name, u_name, d_name = _expert_names(arch)
    F_ = w2.shape[1]
    for j in range(w13.shape[0]):
        out[f"{e}experts.{j}.{g_name}.weight"] = w13[j, :, :F_].T.contiguous()
        out[f"{e}experts.{j}.{u_name}.weight"] = w13[j, :, F_:].T.contiguous()
        out[f"{e}experts.{j}.{d_name}.weight"] = w2[j].T.contiguous()
    return out


def _shared_to_hf(sd: dict[str, torch.Tensor], p: str, e: str, dim: int) -> dict[str, torch.Tensor]:
    """Qwen2-MoE's gated shared expert: moetrain's gate, or w_g = 0 with the down-projection doubled."""
    out = {e + theirs: sd[p + ours] for ours, theirs in SHARED_MAP.items()}
    if p + "ffn.shared_gate.weight" in sd:
        out[e + "shared_expert.down_proj.weight"] = sd[p + "ffn.shared.w2.weight"]
        out[e + "shared_expert_gate.weight"] = sd[p + "ffn.shared_gate.weight"]
    else:  # sigmoid(0) = 1/2 exactly; twice the down-projection cancels it exactly.
        out[e + "shared_expert.down_proj.weight"] = sd[p + "ffn.shared.w2.weight"] * 2.0
        out[e + "shared_expert_gate.weight"] = torch.zeros(1, dim)
    return out


def to_hf_state(model: Transformer, arch: str, hf_keys: set[str]) -> dict[str, torch.Tensor]:
    """moetrain tensors under ``transformers`` names; fused (transformers 5) or per-expert experts by ``hf_keys``."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    m = model.cfg
    mlp = "block_sparse_moe" if arch == "mixtral" and any(".block_sparse_moe." in k for k in hf_keys) else "mlp"
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if "lm_head.weight" in hf_keys:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(m.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out.update(_attention_to_hf(sd, m, p, h))
        if not is_moe_layer(m, i):
            out.update({h + theirs: sd[p + ours] for ours, theirs in DENSE_MAP.items()})
            continue
        e = f"{h}{mlp}."
        out.update(_experts_to_hf(sd, p, e, arch, e + "experts.gate_up_proj" in hf_keys))
        if arch == "qwen2_moe":
            out.update(_shared_to_hf(sd, p, e, m.dim))
    return out


def _dense_layers(hf_cfg: Any) -> list[int]:
    """The indices of the dense (MLP-only) layers of a transformers MoE config."""
    if hf_cfg.model_type in ("mixtral", "olmoe"):
        return []
    n = hf_cfg.num_hidden_layers
    step = hf_cfg.decoder_sparse_step
    return [i for i in range(n) if i in hf_cfg.mlp_only_layers or not (hf_cfg.num_experts > 0 and (i + 1) % step == 0)]


def check_importable(hf_cfg: Any) -> None:
    """Raise :class:`ExportError` (one line) unless moetrain computes what this transformers config computes."""
    mtype = hf_cfg.model_type
    if mtype not in ARCHS:
        raise ExportError(f"model_type={mtype!r}: only {', '.join(ARCHS)} import into moetrain")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act={hf_cfg.hidden_act!r}: moetrain's experts are SwiGLU (silu)")
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    if head_dim * hf_cfg.num_attention_heads != hf_cfg.hidden_size:
        raise ExportError(f"head_dim={head_dim}: moetrain needs head_dim * num_attention_heads == hidden_size")
    if getattr(hf_cfg, "attention_bias", False):  # Qwen3-MoE's and OLMoE's include the output projection's
        raise ExportError(f"attention_bias=True: {mtype}'s output-projection bias is not in moetrain")
    if getattr(hf_cfg, "use_sliding_window", False) or getattr(hf_cfg, "clip_qkv", None) is not None:
        key = "use_sliding_window" if getattr(hf_cfg, "use_sliding_window", False) else "clip_qkv"
        raise ExportError(f"{key}={getattr(hf_cfg, key)!r}: not in moetrain's attention")
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"rope_type={rope.get('rope_type')!r}: moetrain has plain RoPE only")
    dense = _dense_layers(hf_cfg)
    k = len(dense) if dense == list(range(len(dense))) else -1
    if k < 0 or (mtype != "mixtral" and k == hf_cfg.num_hidden_layers):
        raise ExportError(f"mlp_only_layers={dense}: moetrain's dense layers are the first k (model.first_k_dense)")


def config_from_hf(hf_cfg: Any) -> TrainConfig:
    """The moetrain config of a Mixtral / Qwen2-MoE / Qwen3-MoE ``transformers`` config."""
    check_importable(hf_cfg)
    mtype = hf_cfg.model_type
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    mixtral, olmoe = mtype == "mixtral", mtype == "olmoe"
    shared = 0 if mtype != "qwen2_moe" else hf_cfg.shared_expert_intermediate_size
    cfg = TrainConfig()
    cfg.model = ModelConfig(
        vocab_size=hf_cfg.vocab_size,
        dim=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=hf_cfg.num_key_value_heads,
        ffn_hidden_size=hf_cfg.intermediate_size,
        first_k_dense=len(_dense_layers(hf_cfg)),
        moe_every=1,
        rope_theta=float(rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))),
        norm_eps=hf_cfg.rms_norm_eps,
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
        qk_norm=mtype in ("qwen3_moe", "olmoe"),
        qk_norm_scope="all" if olmoe else "head",
        attention_bias=bool(getattr(hf_cfg, "qkv_bias", False)),
    )
    expert_hidden = hf_cfg.intermediate_size if mixtral or olmoe else hf_cfg.moe_intermediate_size
    cfg.moe = MoEConfig(
        num_experts=hf_cfg.num_local_experts if mixtral else hf_cfg.num_experts,
        top_k=hf_cfg.num_experts_per_tok,
        expert_hidden_size=expert_hidden,
        num_shared_experts=1 if shared else 0,
        shared_hidden_size=shared if shared and shared != expert_hidden else None,
        shared_expert_gate=bool(shared),
    )
    cfg.moe.router.norm_topk_prob = True if mixtral else bool(hf_cfg.norm_topk_prob)
    cfg.moe.balance.expert_coef = float(getattr(hf_cfg, "router_aux_loss_coef", 0.01) or 0.0)
    return cfg


def _attention_from_hf(state: dict[str, torch.Tensor], m: ModelConfig, p: str, h: str) -> dict[str, torch.Tensor]:
    """One block's norms and attention from transformers names (q/k rows back to interleaved order)."""
    out = {p + ours: state[h + theirs] for ours, theirs in ATTN_MAP.items()}
    for ours, theirs, n in _qk_tensors(m):
        t = state[h + "self_attn." + theirs]
        out[p + "attn." + ours] = t if n is None else permute_heads(t, n, inverse=True)
    return out


def _experts_from_hf(state: dict[str, torch.Tensor], p: str, e: str, arch: str, n: int) -> dict[str, torch.Tensor]:
    """One MoE layer's router and routed experts as moetrain's stacked ``w13`` / ``w2``."""
    out = {p + "ffn.router.weight": state[e + "gate.weight"], p + "ffn.router.expert_bias": torch.zeros(n)}
    if e + "experts.gate_up_proj" in state:
        out[p + "ffn.experts.w13"] = state[e + "experts.gate_up_proj"].transpose(1, 2).contiguous()
        out[p + "ffn.experts.w2"] = state[e + "experts.down_proj"].transpose(1, 2).contiguous()
        return out
    g, u, d = _expert_names("mixtral" if f"{e}experts.0.w1.weight" in state else arch)  # the names on disk
    w13 = [torch.cat([state[f"{e}experts.{j}.{g}.weight"], state[f"{e}experts.{j}.{u}.weight"]]).T for j in range(n)]
    out[p + "ffn.experts.w13"] = torch.stack(w13).contiguous()
    out[p + "ffn.experts.w2"] = torch.stack([state[f"{e}experts.{j}.{d}.weight"].T for j in range(n)]).contiguous()
    return out


def from_hf_state(state: dict[str, torch.Tensor], hf_cfg: Any) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """A Mixtral / Qwen2-MoE / Qwen3-MoE state dict and config as a moetrain config and ``Transformer`` state."""
    cfg = config_from_hf(hf_cfg)
    m, arch = cfg.model, hf_cfg.model_type
    mlp = "block_sparse_moe" if any(".block_sparse_moe." in key for key in state) else "mlp"
    out = {"embed.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    out["lm_head.weight"] = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    for i in range(m.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out.update(_attention_from_hf(state, m, p, h))
        if not is_moe_layer(m, i):
            out.update({p + ours: state[h + theirs] for ours, theirs in DENSE_MAP.items()})
            continue
        e = f"{h}{mlp}."
        out.update(_experts_from_hf(state, p, e, arch, cfg.moe.num_experts))
        if arch == "qwen2_moe":
            out.update({p + ours: state[e + theirs] for ours, theirs in SHARED_MAP.items()})
            out[p + "ffn.shared.w2.weight"] = state[e + "shared_expert.down_proj.weight"]
            out[p + "ffn.shared_gate.weight"] = state[e + "shared_expert_gate.weight"]
    return cfg, out
