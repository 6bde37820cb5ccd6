"""DeepSeek-V2 / V3 routing as a ``transformers`` config, so ``transformers``' own router reproduces moetrain's.

moetrain's attention is not DeepSeek's MLA, so a DeepSeek-style model does not
export as a whole ``transformers`` model. Its routing does: ``moetrain-export``
writes ``OUT_DIR/hf_routing/config.json`` (a ``DeepseekV2Config`` /
``DeepseekV3Config`` with the sizes and the router keys ``n_group``,
``topk_group``, ``routed_scaling_factor``, ``norm_topk_prob``, ``topk_method``)
and ``OUT_DIR/hf_routing/router.safetensors`` (each MoE layer's
``model.layers.{i}.mlp.gate.weight`` and, for V3, the loss-free bias as
``gate.e_score_correction_bias``). ``DeepseekV3TopkRouter`` /
``DeepseekV2TopkRouter`` built from that config, with those tensors, choose the
same experts with the same weights (``tests/hf/test_transformers_interop.py``).

What maps: V3 — sigmoid scores, plain top-K, groups scored by the sum of their
top 2 (``group_score=topk_sum`` with K / M = 2, what transformers hard-codes),
the bias (selection only), renormalisation and scaling. V2 — softmax scores,
groups scored by their best expert (``group_score=max``), no renormalisation and
no bias (transformers' V2 router has neither), scaling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moetrain.config import TrainConfig, resolve_num_groups
from moetrain.hf.mapping import ExportError
from moetrain.model.transformer import Transformer
from moetrain.moe.strategies import STRATEGIES


def _groups(cfg: TrainConfig) -> tuple[int, int]:
    """(groups, groups a token may use) of the router; (1, 1) without a group limit."""
    r = cfg.moe.router
    groups = resolve_num_groups(cfg.moe, cfg.parallel.ep)  # the config a checkpoint was trained with
    if r.topk_groups is None or r.topk_groups >= groups:
        return 1, 1
    return groups, r.topk_groups


def deepseek_routing(cfg: TrainConfig) -> tuple[str, dict[str, Any]]:
    """(``deepseek_v2`` or ``deepseek_v3``, the router keys of its transformers config); :class:`ExportError`
    (one line naming the key) when transformers' DeepSeek routers would choose differently."""
    r = cfg.moe.router
    dropless = r.capacity_factor is None and r.eval_capacity_factor is None
    strategy = STRATEGIES.get(r.strategy)
    if strategy is None or "deepseek" not in strategy.hf_routers or not dropless:
        raise ExportError(f"moe.router.strategy={r.strategy!r} with capacity: DeepSeek routers are dropless top-K")
    groups, m = _groups(cfg)
    keys: dict[str, Any] = {"n_group": groups, "topk_group": m, "routed_scaling_factor": r.scaling_factor}
    if r.score_fn == "sigmoid":
        if groups > 1 and (r.group_score != "topk_sum" or cfg.moe.top_k // m != 2):
            raise ExportError(
                f"moe.router.group_score={r.group_score!r} (K/M={cfg.moe.top_k // m}): DeepSeek-V3 scores a group "
                "by the sum of its top 2 (topk_sum with top_k / topk_groups = 2)"
            )
        return "deepseek_v3", {**keys, "norm_topk_prob": r.norm_topk_prob}
    if r.norm_topk_prob or r.bias_update_rate > 0:
        raise ExportError("moe.router.norm_topk_prob / bias_update_rate: DeepSeek-V2's router has neither")
    if groups > 1 and r.group_score != "max":
        raise ExportError(f"moe.router.group_score={r.group_score!r}: DeepSeek-V2 scores a group by its best expert")
    method = "group_limited_greedy" if groups > 1 else "greedy"
    return "deepseek_v2", {**keys, "topk_method": method}


def deepseek_config(cfg: TrainConfig, vocab_size: int) -> Any:
    """The ``transformers`` DeepSeek-V2 / V3 config carrying moetrain's sizes and routing."""
    import transformers

    arch, keys = deepseek_routing(cfg)
    m, moe = cfg.model, cfg.moe
    shared_width = (moe.shared_hidden_size or moe.expert_hidden_size) * moe.num_shared_experts
    if moe.num_shared_experts and shared_width % moe.expert_hidden_size:
        raise ExportError(f"moe.shared_hidden_size={moe.shared_hidden_size}: DeepSeek's shared width is a multiple")
    sizes: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": m.dim,
        "intermediate_size": m.ffn_hidden_size,
        "moe_intermediate_size": moe.expert_hidden_size,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": shared_width // moe.expert_hidden_size,
        "num_experts_per_tok": moe.top_k,
        "first_k_dense_replace": m.first_k_dense,
        "max_position_embeddings": cfg.data.seq_len,
    }
    cls = transformers.DeepseekV3Config if arch == "deepseek_v3" else transformers.DeepseekV2Config
    return cls(**sizes, **keys)


def router_state(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    """Each MoE layer's router weight (and the V3 bias) under transformers' names."""
    out = {}
    for i, layer in model.moe_layers().items():
        router = layer.router
        out[f"model.layers.{i}.mlp.gate.weight"] = router.weight.detach().float().cpu().contiguous()
        if arch == "deepseek_v3":
            bias = router.expert_bias if router.bias_update_rate > 0 else torch.zeros_like(router.expert_bias)
            out[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = bias.detach().float().cpu().contiguous()
    return out


def export_routing(model: Transformer, cfg: TrainConfig, out_dir: Path) -> str:
    """Write ``out_dir/config.json`` and ``out_dir/router.safetensors``; returns the architecture."""
    from safetensors.torch import save_file

    config = deepseek_config(cfg, model.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(router_state(model, config.model_type), str(out_dir / "router.safetensors"))
    return str(config.model_type)
