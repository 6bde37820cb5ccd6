"""DeepSeek-V3's multi-token prediction layers in ``transformers`` folders: moetrain's ``model.mtp_depth``
modules (:mod:`moetrain.model.mtp`) out (``moetrain-export --with-mtp``) and in (``--from-hf``, when present).

DeepSeek-V3's checkpoints store MTP depth k (1..D) as decoder layer ``model.layers.{n_layers + k - 1}.``
(``num_nextn_predict_layers`` = D in ``config.json``), which ``transformers``' ``DeepseekV3ForCausalLM``
ignores on load. The names are those vLLM's ``deepseek_mtp.py`` loads and MaxText's DeepSeek converter maps:

==============================  ===============================================================
moetrain (``mtp.{k-1}.``)        checkpoint (``model.layers.{n_layers + k - 1}.``)
==============================  ===============================================================
``hnorm`` / ``enorm``            ``hnorm.weight`` / ``enorm.weight``
``proj`` (input [h; e])          ``eh_proj.weight`` (input [e; h]: the two column halves swapped)
``block.*``                      the decoder layer's own names (:func:`moetrain.hf.deepseek.block_to_hf`)
``norm``                         ``shared_head.norm.weight``
the model's ``embed`` / head     ``embed_tokens.weight`` / ``shared_head.head.weight`` (copies)
==============================  ===============================================================

The concatenation order: DeepSeek-V3's eq. 21 writes ``[RMSNorm(h); RMSNorm(Emb)]``, which is moetrain's
``proj`` input; the checkpoint's ``eh_proj`` takes ``cat([enorm(emb), hnorm(h)])`` (vLLM's
``DeepSeekMultiTokenPredictorLayer.forward``), so its columns are moetrain's halves swapped. The module
shares the main model's embedding and head (sec. 2.2); the checkpoint holds copies, which the import
requires to equal the main ones (one line naming the key otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moetrain.config import TrainConfig
from moetrain.hf.deepseek import block_from_hf, block_to_hf
from moetrain.hf.mapping import ExportError
from moetrain.model.transformer import Transformer

NORMS = {"hnorm.weight": "hnorm.weight", "enorm.weight": "enorm.weight", "norm.weight": "shared_head.norm.weight"}
"""An MTP module's norms: moetrain's name -> the checkpoint's (under ``mtp.{k-1}.`` / ``model.layers.{i}.``)."""


def swap_halves(w: torch.Tensor) -> torch.Tensor:
    """The projection ``[D, 2D]`` with its two column halves swapped (moetrain's [h; e] <-> the checkpoint's [e; h])."""
    d = w.shape[1] // 2
    return torch.cat([w[:, d:], w[:, :d]], dim=1).contiguous()


def check_mtp_exportable(cfg: TrainConfig, arch: str | None = None) -> None:
    """:class:`ExportError` (one line naming the key) unless the model has MTP modules DeepSeek-V3 stores
    (``arch``: the architecture it exports as, when known)."""
    if cfg.model.mtp_depth == 0:
        raise ExportError("model.mtp_depth=0: --with-mtp exports multi-token prediction modules; this model has none")
    if arch not in (None, "deepseek_v3"):
        raise ExportError(f"--with-mtp: multi-token prediction layers are DeepSeek-V3's; this model exports as {arch}")


def mtp_to_hf_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Every MTP module's tensors under DeepSeek-V3's checkpoint names (module docstring's table)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    n = model.cfg.n_layers
    out: dict[str, torch.Tensor] = {}
    for k in range(model.cfg.mtp_depth):
        p, h = f"mtp.{k}.", f"model.layers.{n + k}."
        out.update({h + theirs: sd[p + ours] for ours, theirs in NORMS.items()})
        out[h + "eh_proj.weight"] = swap_halves(sd[p + "proj.weight"])
        out[h + "embed_tokens.weight"] = sd["embed.weight"].clone()  # a copy: safetensors stores no shared tensor
        out[h + "shared_head.head.weight"] = sd["lm_head.weight"].clone()
        out.update(block_to_hf(sd, model, n + k, "deepseek_v3"))
    return out


def mtp_depth_of(state: Mapping[str, torch.Tensor], hf_cfg: Any) -> int:
    """How many MTP layers the state holds: ``model.layers.{n_layers + k}.eh_proj.weight`` for k = 0, 1, ...
    up to ``num_nextn_predict_layers`` (0 for DeepSeek-V2, or a folder saved without them)."""
    if hf_cfg.model_type != "deepseek_v3":
        return 0
    n, depth = hf_cfg.num_hidden_layers, 0
    while depth < (getattr(hf_cfg, "num_nextn_predict_layers", 0) or 0):
        if f"model.layers.{n + depth}.eh_proj.weight" not in state:
            break
        depth += 1
    return depth


def _check_shared_copy(state: Mapping[str, torch.Tensor], key: str, main: str) -> None:
    """The checkpoint's per-layer copy of the embedding or head equals the main one (moetrain shares it)."""
    if not torch.equal(state[key], state[main]):
        raise ExportError(f"{key}: differs from {main}; moetrain's MTP modules share the main embedding and head")


class _Reads(Mapping[str, torch.Tensor]):
    """``state`` that records the names read (the tensors an MTP layer's mapping used)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state, self.read = state, set()  # type: ignore[var-annotated]

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return self.state[key]

    def __contains__(self, key: object) -> bool:
        return key in self.state

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def _mtp_layer(state: _Reads, cfg: TrainConfig, k: int) -> dict[str, torch.Tensor]:
    """MTP depth k + 1's tensors; :class:`ExportError` naming a tensor the layer lacks or has beyond the map."""
    n = cfg.model.n_layers
    p, h = f"mtp.{k}.", f"model.layers.{n + k}."
    try:
        _check_shared_copy(state, h + "embed_tokens.weight", "model.embed_tokens.weight")
        _check_shared_copy(state, h + "shared_head.head.weight", "lm_head.weight")
        out = {p + ours: state[h + theirs] for ours, theirs in NORMS.items()}
        out[p + "proj.weight"] = swap_halves(state[h + "eh_proj.weight"])
        out.update(block_from_hf(state, cfg, n + k, "deepseek_v3"))
    except KeyError as e:
        raise ExportError(f"{e.args[0]}: missing; the multi-token prediction layer {h}* is incomplete") from None
    extra = sorted(key for key in state if key.startswith(h) and key not in state.read)
    if extra:
        raise ExportError(f"{extra[0]}: not a tensor of DeepSeek-V3's multi-token prediction layer")
    return out


def mtp_from_hf_state(state: Mapping[str, torch.Tensor], hf_cfg: Any, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The MTP layers the state holds as moetrain's ``mtp.{k}.`` tensors; sets ``cfg.model.mtp_depth`` (left
    at 0, MTP off, when there are none). A layer with a tensor missing, or one the map does not know, or an
    embedding / head copy unlike the main one: :class:`ExportError` naming the tensor."""
    depth = mtp_depth_of(state, hf_cfg)
    cfg.model.mtp_depth = depth
    reads, out = _Reads(state), {}
    for k in range(depth):
        out.update(_mtp_layer(reads, cfg, k))
    return out
