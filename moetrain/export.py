"""``moetrain-export``: a checkpoint to a consolidated safetensors file, and to/from ``transformers``.

``moetrain-export CHECKPOINT OUT_DIR`` loads a checkpoint saved at any
expert-parallel size into one full model and writes

* ``OUT_DIR/model.safetensors``: every tensor of the full model (routed experts
  stacked ``[N, ...]`` in global order; a tied LM head stored once, as
  ``embed.weight``), and ``OUT_DIR/config.json``: the moetrain config
  (``{"moetrain": {...}, "vocab_size": V, "step": s}``);
* ``OUT_DIR/hf/``: a folder ``transformers.AutoModelForCausalLM.from_pretrained``
  loads with the same logits, when the architecture maps exactly onto one that
  ``transformers`` has (``--hf auto``, the default; ``--hf none`` skips it):

  - **Mixtral** (``MixtralForCausalLM``; Jiang et al. 2024): every layer MoE
    (``first_k_dense=0, moe_every=1``), no shared experts, softmax top-K with the
    K weights renormalised (``strategy=topk`` with ``norm_topk_prob=true``, or
    ``strategy=topk_softmax``), no scaling, no group limit.
  - **Qwen2-MoE** (``Qwen2MoeForCausalLM``): the same routing (renormalised or
    not), shared experts, dense layers anywhere (``mlp_only_layers``). Qwen2-MoE
    multiplies the shared expert by ``sigmoid(x w_g)``, which moetrain does not;
    the export sets ``w_g = 0`` (gate = 1/2 for every token) and doubles the
    shared down-projection, which is exact in floating point.

  Anything else (sigmoid scores, a loss-free bias that is not zero, routed
  scaling, device-limited routing, capacity at evaluation, other strategies)
  changes which experts a token uses or their weights, so the export refuses
  with one line saying why instead of writing a model that computes something
  else.

RoPE: moetrain rotates interleaved pairs ``(x[2j], x[2j+1])`` (Su et al. 2021,
eq. 34), ``transformers`` rotates halves ``(x[j], x[j + Dh/2])``
(``rotate_half``). Both use frequency ``theta^(-2j/Dh)`` for pair j, so
permuting each head's rows of ``W_q`` and ``W_k`` by ``[0, 2, 4, ..., 1, 3, ...]``
gives the same attention scores (q.k is invariant to a common permutation).

``moetrain-export --from-hf HF_DIR OUT_DIR`` goes the other way for Mixtral
(and Qwen2-MoE with shared-expert gates that are all zero): it writes a
weights-only moetrain checkpoint ``OUT_DIR/step_000000`` that
``trainer.resume=OUT_DIR/step_000000`` starts pretraining from, plus
``OUT_DIR/config.yaml`` with the matching ``model`` / ``moe`` keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from moetrain.config import ModelConfig, MoEConfig, TrainConfig, from_dict, resolve_num_groups, to_dict
from moetrain.errors import guarded_main
from moetrain.model.transformer import Transformer, build_model, is_moe_layer
from moetrain.train.checkpoint import (
    CheckpointError,
    read_meta,
    resolve_checkpoint,
)
from moetrain.train.weights import load_model_weights


class ExportError(ValueError):
    """The model cannot be exported in the requested form (one line: what and why)."""


# ----------------------------------------------------------------- moetrain side
def load_checkpoint_model(ckpt: str | Path) -> tuple[Transformer, TrainConfig, dict[str, Any]]:
    """The full (unsharded) model of a checkpoint saved at any EP size, on CPU in fp32, in eval mode."""
    path = resolve_checkpoint(ckpt)
    meta = read_meta(path)
    cfg = from_dict(meta["config"])
    vocab = int(meta["arch"]["vocab_size"])
    num_groups = meta["arch"].get("num_groups")  # carried by the checkpoint: no EP size needed
    model = build_model(cfg.model, cfg.moe, vocab, cfg.data.seq_len, ep=int(meta.get("ep", 1)), num_groups=num_groups)
    load_model_weights(model, path)
    return model.eval(), cfg, meta


def full_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of every tensor; a tied LM head is kept once (as ``embed.weight``)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def export_safetensors(model: Transformer, cfg: TrainConfig, out_dir: Path, step: int = 0) -> None:
    """``model.safetensors`` and ``config.json`` (the moetrain config) in ``out_dir``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(full_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {"format": "moetrain", "moetrain": to_dict(cfg), "vocab_size": model.vocab_size, "step": step}
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))


# ------------------------------------------------------------------ HF mapping
def rope_permutation(head_dim: int) -> torch.Tensor:
    """Row order taking interleaved RoPE pairs to rotate-half layout: ``[0, 2, ..., Dh-2, 1, 3, ..., Dh-1]``."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def permute_heads(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Permute each head's rows of a q/k projection ``[n_heads * Dh, D]`` (or undo it)."""
    head_dim = w.shape[0] // n_heads
    perm = rope_permutation(head_dim)
    if inverse:
        perm = torch.argsort(perm)
    return w.view(n_heads, head_dim, -1)[:, perm].reshape_as(w)


def hf_architecture(cfg: TrainConfig, model: Transformer | None = None) -> str:
    """``mixtral`` or ``qwen2_moe``; :class:`ExportError` naming the first key that does not map."""
    m, moe, r = cfg.model, cfg.moe, cfg.moe.router

    def refuse(key: str, value: Any, why: str) -> ExportError:
        return ExportError(f"{key}={value!r}: {why}; transformers has no architecture that computes this")

    if r.strategy not in ("topk", "topk_softmax"):
        raise refuse("moe.router.strategy", r.strategy, "only plain token-choice top-K maps")
    renormalised = r.norm_topk_prob or r.strategy == "topk_softmax"  # softmax over the K logits = renormalised
    if r.score_fn != "softmax":
        raise refuse("moe.router.score_fn", r.score_fn, "Mixtral / Qwen2-MoE route with softmax scores")
    if r.scaling_factor != 1.0:
        raise refuse("moe.router.scaling_factor", r.scaling_factor, "routed scaling is not in Mixtral / Qwen2-MoE")
    groups = model.num_groups if model is not None else resolve_num_groups(moe, cfg.parallel.ep)
    if r.topk_groups is not None and r.topk_groups < groups:
        raise refuse("moe.router.topk_groups", r.topk_groups, "device-limited routing is not in Mixtral / Qwen2-MoE")
    if r.eval_capacity_factor is not None:
        raise refuse("moe.router.eval_capacity_factor", r.eval_capacity_factor, "capacity drops tokens at inference")
    if model is not None and r.bias_update_rate > 0:
        biases = [layer.router.expert_bias for layer in model.moe_layers().values()]
        if any(b.abs().max() > 0 for b in biases):
            raise refuse("moe.router.bias_update_rate", r.bias_update_rate, "the loss-free bias changes expert choice")
    if moe.num_shared_experts == 0:
        if m.first_k_dense != 0 or m.moe_every != 1:
            raise refuse(
                "model.first_k_dense", m.first_k_dense, "Mixtral has MoE in every layer (and no shared experts)"
            )
        if not renormalised:
            raise refuse("moe.router.norm_topk_prob", r.norm_topk_prob, "Mixtral renormalises the top-K weights")
        return "mixtral"
    return "qwen2_moe"


def hf_config(cfg: TrainConfig, vocab_size: int, arch: str) -> Any:
    """The ``transformers`` config of ``arch`` with moetrain's sizes."""
    import transformers

    m, moe = cfg.model, cfg.moe
    common = {
        "vocab_size": vocab_size,
        "hidden_size": m.dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads or m.n_heads,
        "head_dim": m.dim // m.n_heads,
        "max_position_embeddings": cfg.data.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings,
        "num_experts_per_tok": moe.top_k,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    if arch == "mixtral":
        return transformers.MixtralConfig(
            **common,
            intermediate_size=moe.expert_hidden_size,
            num_local_experts=moe.num_experts,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    shared = (moe.shared_hidden_size or moe.expert_hidden_size) * moe.num_shared_experts
    return transformers.Qwen2MoeConfig(
        **common,
        intermediate_size=m.ffn_hidden_size,
        moe_intermediate_size=moe.expert_hidden_size,
        shared_expert_intermediate_size=shared,
        num_experts=moe.num_experts,
        norm_topk_prob=moe.router.norm_topk_prob or moe.router.strategy == "topk_softmax",
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(m.n_layers) if not is_moe_layer(m, i)],
        use_sliding_window=False,
        qkv_bias=False,
    )


def _expert_names(arch: str) -> tuple[str, str, str]:
    """(gate, up, down) names of one expert's linears in the per-expert (transformers 4) layout."""
    return ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def to_hf_state(model: Transformer, arch: str, hf_keys: set[str]) -> dict[str, torch.Tensor]:
    """moetrain tensors under ``transformers`` names; fused (transformers 5) or per-expert experts by ``hf_keys``."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    m = model.cfg
    n_kv = m.n_kv_heads or m.n_heads
    mlp = "block_sparse_moe" if arch == "mixtral" and any(".block_sparse_moe." in k for k in hf_keys) else "mlp"
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if "lm_head.weight" in hf_keys:
        out["lm_head.weight"] = sd["lm_head.weight"]
    g_name, u_name, d_name = _expert_names(arch)
    for i in range(m.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
        out[h + "self_attn.q_proj.weight"] = permute_heads(sd[p + "attn.wq.weight"], m.n_heads)
        out[h + "self_attn.k_proj.weight"] = permute_heads(sd[p + "attn.wk.weight"], n_kv)
        out[h + "self_attn.v_proj.weight"] = sd[p + "attn.wv.weight"]
        out[h + "self_attn.o_proj.weight"] = sd[p + "attn.wo.weight"]
        if not is_moe_layer(m, i):
            out[h + "mlp.gate_proj.weight"] = sd[p + "ffn.w1.weight"]
            out[h + "mlp.up_proj.weight"] = sd[p + "ffn.w3.weight"]
            out[h + "mlp.down_proj.weight"] = sd[p + "ffn.w2.weight"]
            continue
        e = f"{h}{mlp}."
        out[e + "gate.weight"] = sd[p + "ffn.router.weight"]
        w13, w2 = sd[p + "ffn.experts.w13"], sd[p + "ffn.experts.w2"]  # [N, D, 2F], [N, F, D]
        if e + "experts.gate_up_proj" in hf_keys:
            out[e + "experts.gate_up_proj"] = w13.transpose(1, 2).contiguous()  # [N, 2F, D]: gate rows, then up
            out[e + "experts.down_proj"] = w2.transpose(1, 2).contiguous()  # [N, D, F]
        else:
            F_ = w2.shape[1]
            for j in range(w13.shape[0]):
                out[f"{e}experts.{j}.{g_name}.weight"] = w13[j, :, :F_].T.contiguous()
                out[f"{e}experts.{j}.{u_name}.weight"] = w13[j, :, F_:].T.contiguous()
                out[f"{e}experts.{j}.{d_name}.weight"] = w2[j].T.contiguous()
        if arch == "qwen2_moe":
            out[e + "shared_expert.gate_proj.weight"] = sd[p + "ffn.shared.w1.weight"]
            out[e + "shared_expert.up_proj.weight"] = sd[p + "ffn.shared.w3.weight"]
            # sigmoid(0) = 1/2 exactly; twice the down-projection cancels it exactly.
            out[e + "shared_expert.down_proj.weight"] = sd[p + "ffn.shared.w2.weight"] * 2.0
            out[e + "shared_expert_gate.weight"] = torch.zeros(1, m.dim)
    return out


def export_hf(model: Transformer, cfg: TrainConfig, out_dir: Path, arch: str | None = None) -> str:
    """Write a ``transformers`` folder for ``model``; returns the architecture used."""
    import transformers

    arch = arch or hf_architecture(cfg, model)
    config = hf_config(cfg, model.vocab_size, arch)
    cls = transformers.MixtralForCausalLM if arch == "mixtral" else transformers.Qwen2MoeForCausalLM
    with torch.device("meta"):
        skeleton = cls(config)
    hf_keys = set(skeleton.state_dict())
    state = to_hf_state(model, arch, hf_keys)
    missing = sorted(hf_keys - set(state) - {"lm_head.weight"})
    extra = sorted(set(state) - hf_keys)
    if missing or extra:
        raise ExportError(
            f"transformers {transformers.__version__} {cls.__name__}: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    hf_model = cls(config).to(torch.float32)
    hf_model.load_state_dict(state, strict=False, assign=False)
    if cfg.model.tie_embeddings:
        hf_model.tie_weights()
    hf_model.save_pretrained(str(out_dir))
    return arch


# ------------------------------------------------------------------- importing
def from_hf_state(state: dict[str, torch.Tensor], hf_cfg: Any) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """A Mixtral / Qwen2-MoE state dict and config as a moetrain config and ``Transformer`` state dict."""
    mtype = hf_cfg.model_type
    if mtype not in ("mixtral", "qwen2_moe"):
        raise ExportError(f"model_type={mtype!r}: only mixtral and qwen2_moe import into moetrain")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act={hf_cfg.hidden_act!r}: moetrain's experts are SwiGLU (silu)")
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    if head_dim * hf_cfg.num_attention_heads != hf_cfg.hidden_size:
        raise ExportError(f"head_dim={head_dim}: moetrain needs head_dim * num_attention_heads == hidden_size")
    if mtype == "qwen2_moe" and (getattr(hf_cfg, "qkv_bias", True) or getattr(hf_cfg, "use_sliding_window", False)):
        raise ExportError("qwen2_moe: attention biases / sliding windows are not in moetrain")
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"rope_type={rope.get('rope_type')!r}: moetrain has plain RoPE only")
    n_layers = hf_cfg.num_hidden_layers
    if mtype == "mixtral":
        dense: list[int] = []
        num_experts, expert_hidden, shared, norm = hf_cfg.num_local_experts, hf_cfg.intermediate_size, 0, True
        ffn_hidden = hf_cfg.intermediate_size
    else:
        dense = [
            i
            for i in range(n_layers)
            if i in hf_cfg.mlp_only_layers or not (hf_cfg.num_experts > 0 and (i + 1) % hf_cfg.decoder_sparse_step == 0)
        ]
        num_experts, expert_hidden, norm = hf_cfg.num_experts, hf_cfg.moe_intermediate_size, hf_cfg.norm_topk_prob
        shared, ffn_hidden = hf_cfg.shared_expert_intermediate_size, hf_cfg.intermediate_size
    k = len(dense) if dense == list(range(len(dense))) else -1
    if k < 0 or (mtype == "qwen2_moe" and k == n_layers):
        raise ExportError(f"mlp_only_layers={dense}: moetrain's dense layers are the first k (model.first_k_dense)")
    cfg = TrainConfig()
    cfg.model = ModelConfig(
        vocab_size=hf_cfg.vocab_size,
        dim=hf_cfg.hidden_size,
        n_layers=n_layers,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=hf_cfg.num_key_value_heads,
        ffn_hidden_size=ffn_hidden,
        first_k_dense=k,
        moe_every=1,
        rope_theta=theta,
        norm_eps=hf_cfg.rms_norm_eps,
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
    )
    cfg.moe = MoEConfig(
        num_experts=num_experts,
        top_k=hf_cfg.num_experts_per_tok,
        expert_hidden_size=expert_hidden,
        num_shared_experts=1 if shared else 0,
        shared_hidden_size=shared or None,
    )
    cfg.moe.router.norm_topk_prob = bool(norm)
    cfg.moe.balance.expert_coef = float(getattr(hf_cfg, "router_aux_loss_coef", 0.01) or 0.0)

    n_kv = cfg.model.n_kv_heads
    mlp = "block_sparse_moe" if any(".block_sparse_moe." in key for key in state) else "mlp"
    g_name, u_name, d_name = _expert_names(mtype)
    out = {"embed.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    out["lm_head.weight"] = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    for i in range(n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out[p + "attn_norm.weight"] = state[h + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = state[h + "post_attention_layernorm.weight"]
        out[p + "attn.wq.weight"] = permute_heads(state[h + "self_attn.q_proj.weight"], cfg.model.n_heads, inverse=True)
        out[p + "attn.wk.weight"] = permute_heads(state[h + "self_attn.k_proj.weight"], n_kv, inverse=True)
        out[p + "attn.wv.weight"] = state[h + "self_attn.v_proj.weight"]
        out[p + "attn.wo.weight"] = state[h + "self_attn.o_proj.weight"]
        if i in dense:
            out[p + "ffn.w1.weight"] = state[h + "mlp.gate_proj.weight"]
            out[p + "ffn.w3.weight"] = state[h + "mlp.up_proj.weight"]
            out[p + "ffn.w2.weight"] = state[h + "mlp.down_proj.weight"]
            continue
        e = f"{h}{mlp}."
        out[p + "ffn.router.weight"] = state[e + "gate.weight"]
        out[p + "ffn.router.expert_bias"] = torch.zeros(num_experts)
        if e + "experts.gate_up_proj" in state:
            out[p + "ffn.experts.w13"] = state[e + "experts.gate_up_proj"].transpose(1, 2).contiguous()
            out[p + "ffn.experts.w2"] = state[e + "experts.down_proj"].transpose(1, 2).contiguous()
        else:
            w13 = [
                torch.cat([state[f"{e}experts.{j}.{g_name}.weight"], state[f"{e}experts.{j}.{u_name}.weight"]]).T
                for j in range(num_experts)
            ]
            out[p + "ffn.experts.w13"] = torch.stack(w13).contiguous()
            out[p + "ffn.experts.w2"] = torch.stack(
                [state[f"{e}experts.{j}.{d_name}.weight"].T for j in range(num_experts)]
            ).contiguous()
        if mtype == "qwen2_moe":
            gate = state[e + "shared_expert_gate.weight"]
            if gate.abs().max() > 0:
                raise ExportError(
                    f"{e}shared_expert_gate.weight: not zero; moetrain's shared expert has no sigmoid gate"
                )
            out[p + "ffn.shared.w1.weight"] = state[e + "shared_expert.gate_proj.weight"]
            out[p + "ffn.shared.w3.weight"] = state[e + "shared_expert.up_proj.weight"]
            out[p + "ffn.shared.w2.weight"] = state[e + "shared_expert.down_proj.weight"] * 0.5
    return cfg, out


def import_hf(hf_dir: str | Path, out_dir: str | Path, seq_len: int | None = None) -> Path:
    """Write a weights-only moetrain checkpoint of a ``transformers`` Mixtral / Qwen2-MoE folder.

    The checkpoint ``OUT_DIR/step_000000`` starts a run at step 0 with these
    weights (``trainer.resume=OUT_DIR/step_000000``); ``OUT_DIR/config.yaml`` holds
    the matching config (use its ``model`` and ``moe`` keys).
    """
    import transformers
    from omegaconf import OmegaConf

    from moetrain.train.checkpoint.native import publish_weights

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    cfg, state = from_hf_state(hf_model.state_dict(), hf_model.config)
    cfg.data.seq_len = seq_len or min(int(hf_model.config.max_position_embeddings), 4096)
    model = build_model(cfg.model, cfg.moe, cfg.model.vocab_size or 0, cfg.data.seq_len)
    model.load_state_dict(state, strict=True)
    out = Path(out_dir)
    ckpt = publish_weights(model, cfg, out, {"source": str(hf_dir)})
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    return ckpt


# ------------------------------------------------------------------------ CLI
def export(checkpoint: str | Path, out_dir: str | Path, hf: str = "auto") -> dict[str, Any]:
    """Export a checkpoint (see the module docstring); returns what was written."""
    model, cfg, meta = load_checkpoint_model(checkpoint)
    out = Path(out_dir)
    export_safetensors(model, cfg, out, int(meta.get("step", 0)))
    written: dict[str, Any] = {"safetensors": str(out / "model.safetensors"), "hf": None}
    if hf != "none":
        try:
            arch = hf_architecture(cfg, model)
        except ExportError as e:
            if hf == "auto":
                written["hf_skipped"] = str(e)
                return written
            raise
        if hf not in ("auto", arch):
            raise ExportError(f"--hf {hf}: this model maps to {arch}")
        export_hf(model, cfg, out / "hf", arch)
        written["hf"] = str(out / "hf")
        written["arch"] = arch
    return written


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moetrain-export",
        description="Export a moetrain checkpoint to safetensors (+ a transformers folder), or import one.",
    )
    parser.add_argument(
        "source", help="checkpoint dir (or run dir: its newest checkpoint); with --from-hf an HF folder"
    )
    parser.add_argument("out_dir")
    parser.add_argument(
        "--hf",
        choices=("auto", "mixtral", "qwen2_moe", "none"),
        default="auto",
        help="write OUT_DIR/hf for transformers: auto (when the model maps exactly), a required arch, or none",
    )
    parser.add_argument("--from-hf", action="store_true", help="import a transformers Mixtral / Qwen2-MoE folder")
    parser.add_argument("--seq-len", type=int, default=None, help="with --from-hf: the run's data.seq_len")
    args = parser.parse_args(argv)
    try:
        if args.from_hf:
            ckpt = import_hf(args.source, args.out_dir, args.seq_len)
            print(f"moetrain-export: wrote {ckpt} (resume with trainer.resume={ckpt})")
            return 0
        written = export(args.source, args.out_dir, args.hf)
    except (CheckpointError, ExportError) as e:
        print(f"moetrain-export: {e}", file=sys.stderr)
        return 2
    print(f"moetrain-export: wrote {written['safetensors']}")
    if written.get("hf"):
        print(f"moetrain-export: wrote {written['hf']} ({written['arch']})")
    elif written.get("hf_skipped"):
        print(f"moetrain-export: no transformers folder: {written['hf_skipped']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``moetrain-export``: a user's mistake (bad path, unreadable checkpoint, full disk) is one line and exit 2."""
    return guarded_main("moetrain-export", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
