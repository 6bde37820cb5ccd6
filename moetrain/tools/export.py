"""``moetrain-export``: a checkpoint to a consolidated safetensors file, and to/from ``transformers``.

``moetrain-export CHECKPOINT OUT_DIR`` loads a checkpoint saved at any
expert-parallel size into one full model and writes

* ``OUT_DIR/model.safetensors``: every tensor of the full model (routed experts
  stacked ``[N, ...]`` in global order; a tied LM head stored once, as
  ``embed.weight``), and ``OUT_DIR/config.json``: the moetrain config
  (``{"moetrain": {...}, "vocab_size": V, "step": s}``);
* ``OUT_DIR/hf/``: a folder ``transformers.AutoModelForCausalLM.from_pretrained``
  loads with the same logits, when the architecture maps exactly onto Mixtral,
  Qwen2-MoE or Qwen3-MoE (:mod:`moetrain.hf.mapping`) or, with ``model.attention=mla``
  and DeepSeek routing, DeepSeek-V2 / V3 (:mod:`moetrain.hf.deepseek`; ``--hf auto``, the
  default; ``--hf none`` skips it), with the run's tokenizer files and its
  bos / eos / pad ids (:mod:`moetrain.hf.tokenizer`). Anything else (sigmoid
  scores, a loss-free bias that is not zero, routed scaling, device-limited
  routing, capacity at evaluation, other strategies) changes which experts a
  token uses or their weights, so no ``hf/`` is written and the reason is said
  in one line;
* ``OUT_DIR/hf_routing/``: for DeepSeek-V2/V3-style routing in a model without MLA, the
  ``transformers`` DeepSeek config and router tensors that reproduce the routing
  (:mod:`moetrain.hf.routing`).

``moetrain-export --from-hf HF_DIR OUT_DIR`` goes the other way for Mixtral, DeepSeek-V2 / V3,
Qwen2-MoE (its shared-expert gate becomes ``moe.shared_expert_gate=true``) and
Qwen3-MoE (``model.qk_norm=true``): it writes a weights-only moetrain checkpoint
``OUT_DIR/step_000000`` and ``OUT_DIR/config.yaml``, a whole config that
``moetrain-train --config-path OUT_DIR --config-name config`` trains from
(``trainer.resume`` names the checkpoint; the HF folder's tokenizer, when it has
one, is ``data.tokenizer``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

from moetrain.config import TrainConfig, from_dict, to_dict
from moetrain.errors import guarded_main
from moetrain.extras import install_hint, require
from moetrain.hf.convert import from_hf_state, hf_architecture, hf_class, hf_config, to_hf_state
from moetrain.hf.mapping import (
    ExportError,
    permute_heads,  # noqa: F401  (re-exported: moetrain.tools.export.permute_heads)
)
from moetrain.model.transformer import Transformer, build_model
from moetrain.threads import add_threads_flag, set_threads
from moetrain.train.checkpoint import CheckpointError, read_meta, resolve_checkpoint
from moetrain.train.checkpoint.native import publish_weights
from moetrain.train.weights import load_model_weights


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
    require("safetensors", "moetrain-export writes model.safetensors")
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(full_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {"format": "moetrain", "moetrain": to_dict(cfg), "vocab_size": model.vocab_size, "step": step}
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))


def export_hf(
    model: Transformer, cfg: TrainConfig, out_dir: Path, arch: str | None = None, with_mtp: bool = False
) -> str:
    """Write a ``transformers`` folder for ``model`` (weights, config, tokenizer); returns the architecture.
    ``with_mtp``: DeepSeek-V3's multi-token prediction layers too (:mod:`moetrain.hf.deepseek_mtp`)."""
    import transformers

    from moetrain.hf.deepseek_mtp import check_mtp_exportable, mtp_to_hf_state
    from moetrain.hf.tokenizer import save_tokenizer

    arch = arch or hf_architecture(cfg, model)
    if with_mtp:
        check_mtp_exportable(cfg, arch)
    out_dir.mkdir(parents=True, exist_ok=True)
    special = save_tokenizer(cfg.data.tokenizer, out_dir)
    config = hf_config(cfg, model.vocab_size, arch, special)
    cls = hf_class(arch)
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
    if not with_mtp:
        hf_model.save_pretrained(str(out_dir))
        return arch
    hf_model.config.num_nextn_predict_layers = cfg.model.mtp_depth
    hf_model.save_pretrained(str(out_dir), state_dict={**hf_model.state_dict(), **mtp_to_hf_state(model)})
    return arch


# ------------------------------------------------------------------- importing
IMPORT_HEADER = """# moetrain config of an imported transformers model. Train from it with
#   moetrain-train --config-path {out} --config-name config [key=value ...]
# (trainer.resume names the imported weights; set trainer.resume=auto to continue a run dir instead).
# The model and moe sections below are the import's; every config group composes as with moetrain-train
# (logger=none, data=files, experiment=..., parallel=...), a group's values under the import's.
"""


def write_import_config(cfg: TrainConfig, out: Path) -> Path:
    """``out/config.yaml``: ``configs/train.yaml``'s defaults list (its groups found through Hydra's search path)
    with the import's own keys on top (the architecture, the context, the tokenizer, the weights to start
    from), so that every group composes with it (before, ``logger=none`` was refused: no group was known)."""
    from omegaconf import OmegaConf

    from moetrain.config.compose import config_dir

    train = OmegaConf.load(Path(config_dir()) / "train.yaml")
    full = to_dict(cfg)
    own = {"model": full["model"], "moe": full["moe"], "trainer": {"resume": cfg.trainer.resume}}
    own["data"] = {"seq_len": cfg.data.seq_len, "tokenizer": cfg.data.tokenizer}
    hydra = OmegaConf.to_container(train.hydra)
    assert isinstance(hydra, dict)
    hydra["searchpath"] = [f"file://{config_dir()}"]
    body = {"defaults": OmegaConf.to_container(train.defaults), **own, "hydra": hydra}
    path = out / "config.yaml"
    path.write_text(IMPORT_HEADER.format(out=out) + OmegaConf.to_yaml(OmegaConf.create(body)))
    return path


def check_import_target(out: Path) -> None:
    """An import writes a new directory: one that holds anything (a run's ``config.yaml``, checkpoints, metrics,
    an earlier import) is refused, so nothing there is replaced."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ExportError(f"{out}: exists and holds {shown}; import into a new directory (nothing was written)")


def check_loading_info(hf_path: Path, info: dict[str, Any]) -> None:
    """Every tensor of the folder's checkpoint is one the model has, and every tensor the model has (tied ones
    aside) is in the checkpoint: ``from_pretrained``'s ``output_loading_info`` lists the others, which it would
    leave randomly initialised or drop without a word."""
    for kind, what in (
        ("missing_keys", "lacks tensors the model needs"),
        ("unexpected_keys", "holds tensors the model has no place for"),
        ("mismatched_keys", "holds tensors of the wrong shape"),
    ):
        keys = sorted(k if isinstance(k, str) else str(k[0]) for k in info.get(kind) or [])
        if keys:
            shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            raise ExportError(f"{hf_path}: its checkpoint {what}: {shown}")


def import_hf(hf_dir: str | Path, out_dir: str | Path, seq_len: int | None = None) -> Path:
    """Write a weights-only moetrain checkpoint of a ``transformers`` Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE /
    DeepSeek-V2 / DeepSeek-V3 folder (its safetensors read tensor by tensor, :mod:`moetrain.hf.lazy`, when they
    are exactly the model's; through ``from_pretrained`` otherwise).

    The checkpoint ``OUT_DIR/step_000000`` starts a run at step 0 with these
    weights (``trainer.resume=OUT_DIR/step_000000``); ``OUT_DIR/config.yaml`` holds
    the whole matching config (see :func:`write_import_config`). ``OUT_DIR`` must be new (or empty), and the
    folder's weights must be exactly the model's (:func:`check_loading_info`).
    """
    import transformers

    from moetrain.hf.lazy import assigned_model, read_lazily
    from moetrain.hf.tokenizer import has_tokenizer

    hf_path, out = Path(hf_dir).resolve(), Path(out_dir).resolve()
    check_import_target(out)
    lazy = read_lazily(hf_path)  # safetensors (sharded or not) exactly the model's: read tensor by tensor
    if lazy is not None:
        hf_config, cfg, state = lazy
    else:
        # its load report (many lines) is kept off the terminal by the CLI (import_hf_reported), which reads the
        # mismatch table from it when the load fails; check_loading_info says what does not map in one line
        hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(hf_path), dtype=torch.float32, output_loading_info=True
        )
        check_loading_info(hf_path, info)
        hf_config = hf_model.config
        cfg, state = from_hf_state(hf_model.state_dict(), hf_config)
    cfg.data.seq_len = seq_len or min(int(hf_config.max_position_embeddings), 4096)
    if has_tokenizer(hf_path):
        cfg.data.tokenizer = str(hf_path)
    model = assigned_model(cfg, state)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = publish_weights(model, cfg, out, {"source": str(hf_path)})
    cfg.trainer.resume = str(ckpt)
    write_import_config(cfg, out)
    return ckpt


# ------------------------------------------------------------------------ CLI
def import_hf_reported(hf_dir: str, out_dir: str, seq_len: int | None) -> Path:
    """:func:`import_hf` with a folder transformers cannot load (no weights file, a garbled ``config.json``,
    tensors whose shapes differ from it) as one :class:`ExportError` line (:mod:`moetrain.hf.load_errors`)."""
    require("transformers", "--from-hf reads a transformers folder")
    from moetrain.hf.load_errors import hf_load_error, quiet_transformers

    with quiet_transformers() as messages:
        try:
            return import_hf(hf_dir, out_dir, seq_len)
        except Exception as e:
            error = hf_load_error(hf_dir, e, messages)
            if error is None:
                raise
            raise error from None


ARCH_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}


def arch_fixes(cfg: TrainConfig, arch: str) -> list[str]:
    """The overrides a run needs (set at training: they change the model) to map onto ``arch``: Mixtral has MoE
    in every layer, no shared expert, no q/k norms and renormalised top-K; Qwen2-MoE no q/k norms; Qwen3-MoE
    q/k norms and no shared expert (:func:`moetrain.hf.mapping.hf_architecture`)."""
    m, moe = cfg.model, cfg.moe
    want: dict[str, Any] = {"model.qk_norm": arch == "qwen3_moe"}
    if arch in ("mixtral", "qwen3_moe"):
        want["moe.num_shared_experts"] = 0
    if arch == "mixtral":
        want |= {"model.first_k_dense": 0, "model.moe_every": 1}
        if moe.router.strategy != "topk_softmax":
            want["moe.router.norm_topk_prob"] = True
    have = {"model.qk_norm": m.qk_norm, "moe.num_shared_experts": moe.num_shared_experts,
            "model.first_k_dense": m.first_k_dense, "model.moe_every": m.moe_every,
            "moe.router.norm_topk_prob": moe.router.norm_topk_prob}  # fmt: skip
    return [f"{k}={str(v).lower()}" for k, v in want.items() if have[k] != v]


def closest_arch(cfg: TrainConfig) -> str:
    """The architecture a refused model is nearest to: Qwen3-MoE with q/k norms, Mixtral without shared experts."""
    if cfg.model.qk_norm:
        return "qwen3_moe"
    return "mixtral" if cfg.moe.num_shared_experts == 0 else "qwen2_moe"


def checked_arch(cfg: TrainConfig, model: Transformer | None, hf: str) -> str:
    """The transformers architecture to write (``hf``: ``auto`` or the one asked), or :class:`ExportError` naming
    what does not map and the overrides that would have made it map, for the architecture asked."""
    asked = closest_arch(cfg) if hf == "auto" else hf
    fixes = arch_fixes(cfg, asked)
    if hf != "auto" and fixes:
        raise ExportError(f"--hf {hf}: this model does not map to {ARCH_NAMES[hf]}: train with {' '.join(fixes)}")
    try:
        arch = hf_architecture(cfg, model)
    except ExportError as e:
        if not fixes:
            raise
        raise ExportError(f"{e}; to export as {ARCH_NAMES[asked]}, train with {' '.join(fixes)}") from None
    if hf not in ("auto", arch):  # pragma: no cover - arch_fixes names what differs first
        raise ExportError(f"--hf {hf}: this model maps to {ARCH_NAMES[arch]}, not {ARCH_NAMES[hf]}")
    return arch


def export(checkpoint: str | Path, out_dir: str | Path, hf: str = "auto", with_mtp: bool = False) -> dict[str, Any]:
    """Export a checkpoint (see the module docstring; ``with_mtp``: ``hf/`` holds the MTP layers); returns what
    was written."""
    model, cfg, meta = load_checkpoint_model(checkpoint)
    if with_mtp:  # the hf/ folder's MTP layers: refused (one line) before anything is written
        from moetrain.hf.deepseek_mtp import check_mtp_exportable

        check_mtp_exportable(cfg)
        if hf == "none":
            raise ExportError("--with-mtp writes the MTP layers into hf/, which --hf none leaves out")
        check_mtp_exportable(cfg, checked_arch(cfg, model, hf))
    out = Path(out_dir)
    export_safetensors(model, cfg, out, int(meta.get("step", 0)))
    written: dict[str, Any] = {"safetensors": str(out / "model.safetensors"), "hf": None}
    if hf == "none":
        return written
    if hf == "auto" and importlib.util.find_spec("transformers") is None:
        written["hf_skipped"] = f"transformers is missing (the hf/ folder needs it): {install_hint('transformers')}"
        return written
    try:
        arch = checked_arch(cfg, model, hf)
    except ExportError as e:
        if hf != "auto":
            raise
        written["hf_skipped"] = str(e)
        return {**written, **export_deepseek_routing(model, cfg, out)}
    require("transformers", f"--hf {hf} writes a transformers folder")
    export_hf(model, cfg, out / "hf", arch, with_mtp)
    return {**written, "hf": str(out / "hf"), "arch": arch}


def export_deepseek_routing(model: Transformer, cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """``out/hf_routing`` when the routing is DeepSeek-V2/V3's (``{}`` when it is not)."""
    from moetrain.hf.routing import export_routing

    try:
        arch = export_routing(model, cfg, out / "hf_routing")
    except ExportError:
        return {}
    return {"hf_routing": str(out / "hf_routing"), "routing_arch": arch}


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
        choices=("auto", "mixtral", "qwen2_moe", "qwen3_moe", "none"),
        default="auto",
        help="write OUT_DIR/hf for transformers: auto (when the model maps exactly), a required arch, or none",
    )
    parser.add_argument(
        "--from-hf", action="store_true", help="import a transformers Mixtral / Qwen2-MoE / Qwen3-MoE folder"
    )
    parser.add_argument("--seq-len", type=int, default=None, help="with --from-hf: the run's data.seq_len")
    parser.add_argument(
        "--with-mtp", action="store_true", help="hf/ keeps the multi-token prediction modules (DeepSeek-V3's layout)"
    )
    add_threads_flag(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    try:
        if args.from_hf:
            ckpt = import_hf_reported(args.source, args.out_dir, args.seq_len)
            print(f"moetrain-export: wrote {ckpt} and {ckpt.parent / 'config.yaml'}")
            print(
                f"moetrain-export: train from it with: moetrain-train --config-path {ckpt.parent} --config-name config"
            )
            return 0
        written = export(args.source, args.out_dir, args.hf, args.with_mtp)
    except (CheckpointError, ExportError) as e:
        print(f"moetrain-export: {e}", file=sys.stderr)
        return 2
    print(f"moetrain-export: wrote {written['safetensors']}")
    if written.get("hf"):
        print(f"moetrain-export: wrote {written['hf']} ({written['arch']})")
    elif written.get("hf_skipped"):
        print(f"moetrain-export: no transformers folder: {written['hf_skipped']}")
    if written.get("hf_routing"):
        print(f"moetrain-export: wrote {written['hf_routing']} ({written['routing_arch']} routing)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``moetrain-export``: a user's mistake (bad path, unreadable checkpoint, full disk) is one line and exit 2."""
    return guarded_main("moetrain-export", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
