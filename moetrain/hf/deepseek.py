"""moetrain <-> ``transformers`` ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM``: whole models, exact.

A model with ``model.attention=mla`` (:mod:`moetrain.model.mla`) and DeepSeek routing
(:func:`~moetrain.hf.routing.deepseek_routing`: V2 softmax, groups by their best expert; V3 sigmoid, the
loss-free bias as ``e_score_correction_bias``, groups by their top-2 sum) maps tensor for tensor:

============================  =======================================================
moetrain (``blocks.{i}.``)    transformers (``model.layers.{i}.``)
============================  =======================================================
``attn.wq``                   ``self_attn.q_proj`` (no ``q_lora_rank``)
``attn.wq_a`` / ``q_norm``    ``self_attn.q_a_proj`` / ``q_a_layernorm``
``attn.wq_b``                 ``self_attn.q_b_proj``
``attn.wkv_a`` / ``kv_norm``  ``self_attn.kv_a_proj_with_mqa`` / ``kv_a_layernorm``
``attn.wkv_b`` / ``attn.wo``  ``self_attn.kv_b_proj`` / ``self_attn.o_proj``
``ffn.router``                ``mlp.gate`` (+ ``e_score_correction_bias``, V3)
``ffn.experts.w13`` / ``w2``  ``mlp.experts.gate_up_proj`` / ``down_proj`` (transposed)
``ffn.shared.w1/w3/w2``       ``mlp.shared_experts.gate/up/down_proj``
============================  =======================================================

No RoPE permutation: both sides rotate interleaved pairs (V2's complex product; V3's
``rope_interleave=True``). YaRN (``model.rope_scaling``) is transformers' ``rope_parameters`` of type
``yarn``. Multi-token prediction modules are not part of transformers' DeepSeek-V3 model, which ignores
``model.layers.{num_hidden_layers}.*``: :mod:`moetrain.hf.deepseek_mtp` maps them (export when asked, import
when present).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moetrain.config import ModelConfig, MoEConfig, RopeScalingConfig, TrainConfig
from moetrain.hf.mapping import DENSE_MAP, ExportError, _experts_from_hf, _experts_to_hf, common_hf_keys
from moetrain.hf.routing import deepseek_routing
from moetrain.model.transformer import Transformer, is_moe_layer

DEEPSEEK_ARCHS = ("deepseek_v2", "deepseek_v3")

MLA_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
}
"""One block's norms and MLA tensors (those present: ``wq`` or the ``q_lora_rank`` three)."""
SHARED_EXPERTS_MAP = {
    "ffn.shared.w1.weight": "shared_experts.gate_proj.weight",
    "ffn.shared.w3.weight": "shared_experts.up_proj.weight",
    "ffn.shared.w2.weight": "shared_experts.down_proj.weight",
}


def deepseek_architecture(cfg: TrainConfig) -> str:
    """``deepseek_v2`` or ``deepseek_v3`` for an MLA model; :class:`ExportError` naming the key that does not map."""
    m, moe = cfg.model, cfg.moe
    if m.qk_norm or moe.shared_expert_gate:
        key = "model.qk_norm" if m.qk_norm else "moe.shared_expert_gate"
        raise ExportError(f"{key}=True: not in DeepSeek-V2/V3 (transformers has no MLA model that computes this)")
    if m.moe_every != 1:
        raise ExportError(f"model.moe_every={m.moe_every}: DeepSeek's layers after the first k dense are all MoE")
    if moe.num_shared_experts and moe.shared_hidden_size not in (None, moe.expert_hidden_size):
        raise ExportError(f"moe.shared_hidden_size={moe.shared_hidden_size}: DeepSeek's shared experts are expert-wide")
    if m.tie_embeddings:
        raise ExportError("model.tie_embeddings=True: DeepSeek-V2/V3 have an untied LM head")
    return deepseek_routing(cfg)[0]


def rope_parameters(m: ModelConfig) -> dict[str, Any]:
    """transformers' ``rope_parameters`` of ``model.rope_theta`` / ``model.rope_scaling``."""
    r = m.rope_scaling
    if r.type != "yarn":
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    return {
        "rope_type": "yarn",
        "rope_theta": m.rope_theta,
        "factor": r.factor,
        "original_max_position_embeddings": r.original_max_seq_len,
        "beta_fast": r.beta_fast,
        "beta_slow": r.beta_slow,
        "mscale": r.mscale,
        "mscale_all_dim": r.mscale_all_dim,
    }


def deepseek_hf_config(cfg: TrainConfig, vocab_size: int, arch: str, special: dict[str, int] | None = None) -> Any:
    """The whole ``DeepseekV2Config`` / ``DeepseekV3Config`` of an MLA model (sizes, MLA widths, routing)."""
    import transformers

    _, routing = deepseek_routing(cfg)
    m, moe = cfg.model, cfg.moe
    keys: dict[str, Any] = {
        **common_hf_keys(cfg, vocab_size, special),
        "num_key_value_heads": m.n_heads,  # MLA: every head has its own key and value
        "intermediate_size": m.ffn_hidden_size,
        "moe_intermediate_size": moe.expert_hidden_size,
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": moe.num_shared_experts,
        "first_k_dense_replace": m.first_k_dense,
        "kv_lora_rank": m.kv_lora_rank,
        "q_lora_rank": m.q_lora_rank,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "v_head_dim": m.v_head_dim,
        "rope_parameters": rope_parameters(m),
        "tie_word_embeddings": False,
        "attention_bias": False,
        **routing,
    }
    if arch == "deepseek_v3":
        return transformers.DeepseekV3Config(**keys, rope_interleave=True, num_nextn_predict_layers=0)
    keys.pop("norm_topk_prob", None)
    return transformers.DeepseekV2Config(**keys)


def block_to_hf(sd: dict[str, torch.Tensor], model: Transformer, i: int, arch: str) -> dict[str, torch.Tensor]:
    """Block ``i``'s tensors (``blocks.{i}.``, or ``mtp.{i - n_layers}.block.`` for a multi-token prediction
    block) under ``model.layers.{i}.`` names (module docstring's table)."""
    m = model.cfg
    p, h = (f"blocks.{i}." if i < m.n_layers else f"mtp.{i - m.n_layers}.block."), f"model.layers.{i}."
    out = {h + theirs: sd[p + ours] for ours, theirs in MLA_MAP.items() if p + ours in sd}
    if not is_moe_layer(m, i):
        out.update({h + theirs: sd[p + ours] for ours, theirs in DENSE_MAP.items()})
        return out
    out.update(_experts_to_hf(sd, p, h + "mlp.", arch, fused=True))
    out.update({h + "mlp." + theirs: sd[p + ours] for ours, theirs in SHARED_EXPERTS_MAP.items() if p + ours in sd})
    if arch == "deepseek_v3":
        bias = sd[p + "ffn.router.expert_bias"]
        out[h + "mlp.gate.e_score_correction_bias"] = bias if model.moe_cfg.router.bias_update_rate > 0 else 0 * bias
    return out


def deepseek_to_hf_state(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    """moetrain tensors under ``transformers`` DeepSeek names (module docstring's table), without the
    multi-token prediction modules (:func:`moetrain.hf.deepseek_mtp.mtp_to_hf_state` writes those)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(model.cfg.n_layers):
        out.update(block_to_hf(sd, model, i, arch))
    return out


def check_deepseek_importable(hf_cfg: Any) -> None:
    """Raise :class:`ExportError` (one line naming the key) unless moetrain computes what this config computes."""
    checks = [
        ("hidden_act", getattr(hf_cfg, "hidden_act", "silu"), lambda v: v == "silu", "moetrain's FFNs are SwiGLU"),
        ("attention_bias", getattr(hf_cfg, "attention_bias", False), lambda v: not v, "moetrain's MLA has no biases"),
        ("mlp_bias", getattr(hf_cfg, "mlp_bias", False), lambda v: not v, "moetrain's FFNs have no biases"),
        ("rope_interleave", getattr(hf_cfg, "rope_interleave", True), bool, "moetrain rotates interleaved pairs"),
        ("tie_word_embeddings", hf_cfg.tie_word_embeddings, lambda v: not v, "DeepSeek's LM head is untied"),
    ]
    if hf_cfg.model_type == "deepseek_v2":  # V3's router is fixed: sigmoid, bias, top-2 group sums
        greedy = ("greedy", "group_limited_greedy")
        checks.append(("topk_method", hf_cfg.topk_method, lambda v: v in greedy, "V2 routes greedy or group-limited"))
    for key, value, ok, why in checks:
        if not ok(value):
            raise ExportError(f"{key}={value!r}: {why}")
    rope = hf_cfg.rope_parameters or {}
    if rope.get("rope_type", "default") not in ("default", "yarn"):
        raise ExportError(f"rope_parameters.rope_type={rope.get('rope_type')!r}: moetrain has plain RoPE and YaRN")
    if rope.get("attention_factor") is not None or rope.get("truncate", True) is not True:
        raise ExportError(f"rope_parameters={rope}: moetrain's YaRN derives attention_factor and truncates")


def _rope_scaling(rope: dict[str, Any], max_pos: int) -> RopeScalingConfig:
    if rope.get("rope_type", "default") != "yarn":
        return RopeScalingConfig()
    original = int(rope["original_max_position_embeddings"])
    return RopeScalingConfig(
        type="yarn",
        factor=float(rope.get("factor") or max_pos / original),
        original_max_seq_len=original,
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=float(rope.get("mscale") or 0.0),
        mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
    )


def deepseek_config_from_hf(hf_cfg: Any) -> TrainConfig:
    """The moetrain config of a ``DeepseekV2Config`` / ``DeepseekV3Config``."""
    check_deepseek_importable(hf_cfg)
    v3 = hf_cfg.model_type == "deepseek_v3"
    rope = hf_cfg.rope_parameters or {}
    cfg = TrainConfig()
    cfg.model = ModelConfig(
        vocab_size=hf_cfg.vocab_size,
        dim=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=None,
        ffn_hidden_size=hf_cfg.intermediate_size,
        first_k_dense=min(hf_cfg.first_k_dense_replace, hf_cfg.num_hidden_layers),
        moe_every=1,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_eps=hf_cfg.rms_norm_eps,
        tie_embeddings=False,
        attention="mla",
        kv_lora_rank=hf_cfg.kv_lora_rank,
        q_lora_rank=hf_cfg.q_lora_rank,
        qk_rope_head_dim=hf_cfg.qk_rope_head_dim,
        qk_nope_head_dim=hf_cfg.qk_nope_head_dim,
        v_head_dim=hf_cfg.v_head_dim,
        rope_scaling=_rope_scaling(rope, int(hf_cfg.max_position_embeddings)),
    )
    cfg.moe = MoEConfig(
        num_experts=hf_cfg.n_routed_experts,
        top_k=hf_cfg.num_experts_per_tok,
        expert_hidden_size=hf_cfg.moe_intermediate_size,
        num_shared_experts=hf_cfg.n_shared_experts or 0,
    )
    r = cfg.moe.router
    r.score_fn = "sigmoid" if v3 else "softmax"
    r.scaling_factor = float(hf_cfg.routed_scaling_factor)
    r.norm_topk_prob = bool(hf_cfg.norm_topk_prob) if v3 else False
    grouped = v3 or hf_cfg.topk_method == "group_limited_greedy"
    r.num_groups = (hf_cfg.n_group or 1) if grouped else 1
    r.topk_groups = (hf_cfg.topk_group or 1) if grouped else None
    r.group_score = "topk_sum" if v3 else "max"
    if v3:  # the bias must count in the choice; DeepSeek-V3's update speed (sec. 2.1.2), no aux loss
        r.bias_update_rate, cfg.moe.balance.expert_coef = 0.001, 0.0
    return cfg


def block_from_hf(
    state: Mapping[str, torch.Tensor], cfg: TrainConfig, i: int, model_type: str
) -> dict[str, torch.Tensor]:
    """Layer ``i``'s tensors (``model.layers.{i}.``) under moetrain's names: ``blocks.{i}.``, or
    ``mtp.{i - n_layers}.block.`` past the main layers (DeepSeek-V3's multi-token prediction layers)."""
    m = cfg.model
    p, h = (f"blocks.{i}." if i < m.n_layers else f"mtp.{i - m.n_layers}.block."), f"model.layers.{i}."
    low_rank_q = ("attn.wq_a.weight", "attn.q_norm.weight", "attn.wq_b.weight")
    unused = low_rank_q if m.q_lora_rank is None else ("attn.wq.weight",)
    out = {p + ours: state[h + theirs] for ours, theirs in MLA_MAP.items() if ours not in unused}
    if not is_moe_layer(m, i):
        out.update({p + ours: state[h + theirs] for ours, theirs in DENSE_MAP.items()})
        return out
    e = h + "mlp."
    out.update(_experts_from_hf(state, p, e, model_type, cfg.moe.num_experts))  # fused, or per expert as on disk
    if e + "gate.e_score_correction_bias" in state:
        out[p + "ffn.router.expert_bias"] = state[e + "gate.e_score_correction_bias"]
    if cfg.moe.num_shared_experts:
        out.update({p + ours: state[e + theirs] for ours, theirs in SHARED_EXPERTS_MAP.items()})
    return out


def deepseek_from_hf_state(
    state: Mapping[str, torch.Tensor], hf_cfg: Any
) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """A DeepSeek-V2/V3 state dict and config as a moetrain config and ``Transformer`` state of the main model
    (DeepSeek-V3's multi-token prediction layers: :func:`moetrain.hf.deepseek_mtp.mtp_from_hf_state`)."""
    cfg = deepseek_config_from_hf(hf_cfg)
    out = {"embed.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.model.n_layers):
        out.update(block_from_hf(state, cfg, i, hf_cfg.model_type))
    return cfg, out
