"""The one entry to every ``transformers`` architecture moetrain maps exactly: GQA models onto Mixtral /
Qwen2-MoE / Qwen3-MoE (:mod:`moetrain.hf.mapping`), MLA models onto DeepSeek-V2 / V3 (:mod:`moetrain.hf.deepseek`).
The export and import code call these; each picks the module by ``model.attention`` or the ``model_type``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moetrain.config import TrainConfig
from moetrain.hf import deepseek, deepseek_mtp, mapping
from moetrain.hf.mapping import ExportError
from moetrain.model.transformer import Transformer

ARCHS = (*mapping.ARCHS, *deepseek.DEEPSEEK_ARCHS)
"""``model_type`` of every ``transformers`` architecture moetrain maps onto exactly."""


def hf_architecture(cfg: TrainConfig, model: Transformer | None = None) -> str:
    """The architecture ``cfg`` exports as; :class:`ExportError` naming the first key that does not map."""
    if cfg.model.attention == "mla":
        return deepseek.deepseek_architecture(cfg)
    return mapping.hf_architecture(cfg, model)


def hf_config(cfg: TrainConfig, vocab_size: int, arch: str, special: dict[str, int] | None = None) -> Any:
    """The ``transformers`` config of ``arch`` with moetrain's sizes (and the tokenizer's special-token ids)."""
    if arch in deepseek.DEEPSEEK_ARCHS:
        return deepseek.deepseek_hf_config(cfg, vocab_size, arch, special)
    return mapping.hf_config(cfg, vocab_size, arch, special)


def hf_class(arch: str) -> Any:
    """The ``transformers`` causal-LM class of ``arch``."""
    import transformers

    if arch == "deepseek_v2":
        return transformers.DeepseekV2ForCausalLM
    if arch == "deepseek_v3":
        return transformers.DeepseekV3ForCausalLM
    return mapping.hf_class(arch)


def to_hf_state(model: Transformer, arch: str, hf_keys: set[str]) -> dict[str, torch.Tensor]:
    """moetrain tensors under ``arch``'s names."""
    if arch in deepseek.DEEPSEEK_ARCHS:
        return deepseek.deepseek_to_hf_state(model, arch)
    return mapping.to_hf_state(model, arch, hf_keys)


def config_from_hf(hf_cfg: Any) -> TrainConfig:
    """The moetrain config of a ``transformers`` config; :class:`ExportError` (one line) for what does not map."""
    if hf_cfg.model_type in deepseek.DEEPSEEK_ARCHS:
        return deepseek.deepseek_config_from_hf(hf_cfg)
    if hf_cfg.model_type not in ARCHS:
        raise ExportError(f"model_type={hf_cfg.model_type!r}: only {', '.join(ARCHS)} import into moetrain")
    return mapping.config_from_hf(hf_cfg)


def from_hf_state(state: Mapping[str, torch.Tensor], hf_cfg: Any) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """A ``transformers`` state dict and config as a moetrain config and ``Transformer`` state (DeepSeek-V3's
    multi-token prediction layers, when ``state`` holds them, as ``model.mtp_depth`` modules)."""
    if hf_cfg.model_type in deepseek.DEEPSEEK_ARCHS:
        cfg, out = deepseek.deepseek_from_hf_state(state, hf_cfg)
        return cfg, {**out, **deepseek_mtp.mtp_from_hf_state(state, hf_cfg, cfg)}
    config_from_hf(hf_cfg)  # the one-line refusal names every architecture
    return mapping.from_hf_state(state, hf_cfg)
