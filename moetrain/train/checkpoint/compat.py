"""Whether a checkpoint fits this run: its engine, architecture and config (the resume rules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moetrain.config import TrainConfig, to_dict
from moetrain.train.checkpoint.layout import (
    META_FILE,
    CheckpointError,
    latest_checkpoint,
    read_meta,
    resolve_checkpoint,
)

ARCH_KEYS = (
    ("model", "dim"),
    ("model", "n_layers"),
    ("model", "n_heads"),
    ("model", "n_kv_heads"),
    ("model", "ffn_hidden_size"),
    ("model", "first_k_dense"),
    ("model", "moe_every"),
    ("model", "tie_embeddings"),
    ("model", "qk_norm"),
    ("model", "qk_norm_scope"),
    ("model", "attention_bias"),
    ("model", "attention"),
    ("model", "kv_lora_rank"),
    ("model", "q_lora_rank"),
    ("model", "qk_rope_head_dim"),
    ("model", "qk_nope_head_dim"),
    ("model", "v_head_dim"),
    ("model", "mtp_depth"),
    ("moe", "num_experts"),
    ("moe", "expert_hidden_size"),
    ("moe", "num_shared_experts"),
    ("moe", "shared_hidden_size"),
    ("moe", "shared_expert_gate"),
)
"""Config keys that fix the model's tensors: a checkpoint must agree on all of them."""


def arch_of(cfg: TrainConfig, model: Any) -> dict[str, Any]:
    """The keys that fix the model's tensors, and its vocabulary size (a checkpoint must agree on all)."""
    arch = {f"{sec}.{key}": getattr(getattr(cfg, sec), key) for sec, key in ARCH_KEYS}
    arch["vocab_size"] = int(model.vocab_size)
    arch["num_groups"] = int(model.num_groups)
    return effective_arch(arch)


def effective_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """``arch`` with ``moe.shared_hidden_size`` as the width it builds: ``None`` means ``expert_hidden_size``
    (and nothing without shared experts), so equal models never differ on how the width was written; MLA's
    widths are ``None`` in a GQA model."""
    out = dict(arch)
    if "moe.shared_hidden_size" in out:
        shared = out.get("moe.num_shared_experts", 1)
        out["moe.shared_hidden_size"] = (
            (out["moe.shared_hidden_size"] or out.get("moe.expert_hidden_size")) if shared else None
        )
    if out.get("model.attention", "gqa") != "mla":  # MLA's widths build nothing in a GQA model
        for key in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            if f"model.{key}" in out:
                out[f"model.{key}"] = None
    return out


ROUTING_ARCH_KEYS = ("num_groups",)
"""Recorded with the architecture (so inference and export need no EP size) but fixing no tensor: a resume on
another EP size with ``moe.router.num_groups`` unset regroups the experts, as that size's fresh run would."""


def check_arch(ckpt: Path, meta: dict[str, Any], arch: dict[str, Any]) -> None:
    """Raise on the first architecture key where the checkpoint and this run differ."""
    saved, arch = effective_arch(meta.get("arch", {})), effective_arch(arch)
    for key, value in arch.items():
        if key in saved and key not in ROUTING_ARCH_KEYS and saved[key] != value:
            raise CheckpointError(
                f"{ckpt / META_FILE}: {key}={saved[key]!r} in the checkpoint but {value!r} in this run"
            )


def check_engine(ckpt: Path, meta: dict[str, Any], engine: str) -> None:
    """A checkpoint is resumed by the engine that wrote it (their files differ)."""
    saved = meta.get("engine", "native")
    if saved != engine:
        raise CheckpointError(
            f"{ckpt}: written by engine={saved}; resume it with engine={saved} (this run has engine={engine})"
        )


RESUME_FREE_KEYS = (
    "run_dir",
    "run_name",
    "trainer.max_steps",
    "trainer.micro_batch_size",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.eval_at_start",
    "trainer.device",
    "trainer.peak_tflops",
    "trainer.progress",
    "trainer.num_threads",
    "trainer.activation_checkpointing",
    "trainer.compile",
    "trainer.resume",
    "trainer.resume_allow_changes",
    "trainer.nonfinite",
    "trainer.nonfinite_max_skips",
    "data.cache_dir",
    "data.num_proc",
    "data.shard_tokens",
    "engine.zero_stage",
    "engine.reduce_bucket_size",
    "engine.overlap_comm",
    "logger",
    "parallel",
    "checkpoint",
)
"""Keys (or sections) a resume may change freely: length, cadence, memory, speed and logging, not what is
trained (``trainer.micro_batch_size`` splits the same global batch; ``parallel`` reshards)."""


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{dotted key: value}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _covered(key: str, names: tuple[str, ...] | list[str]) -> bool:
    return any(key == n or key.startswith(f"{n}.") for n in names)


def config_changes(saved: dict[str, Any], new: dict[str, Any], allowed: list[str]) -> list[str]:
    """``key: saved -> new`` for each key that differs, except the free and the ``allowed`` ones
    (keys only one side knows, from another moetrain version, are not compared)."""
    a, b = flat_config(saved), flat_config(new)
    return [
        f"{key}: {a[key]!r} -> {b[key]!r}"
        for key in sorted(a.keys() & b.keys())
        if a[key] != b[key] and not _covered(key, RESUME_FREE_KEYS) and not _covered(key, allowed)
    ]


def check_resume_config(ckpt: Path, meta: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume with a config that differs from the checkpoint's beyond the free and allowed keys."""
    if meta.get("kind") == "weights":  # an import: its config only fixes the architecture (checked on load)
        return
    changes = config_changes(meta["config"], to_dict(cfg), cfg.trainer.resume_allow_changes)
    if changes:
        keys = ",".join(c.split(":")[0] for c in changes)
        raise CheckpointError(
            f"{ckpt}: this run's config differs from the checkpoint's ({'; '.join(changes)}); "
            f"to resume with it anyway set trainer.resume_allow_changes=[{keys}], or use another run_dir"
        )


def resume_target(cfg: TrainConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` names (``None``: start afresh), its ``meta.json``, engine and config
    checked against this run's; raises :class:`CheckpointError` with one line."""
    choice = cfg.trainer.resume
    if choice == "none":
        return None
    path = latest_checkpoint(ckpt_dir) if choice == "auto" else resolve_checkpoint(choice)
    if path is None:
        return None
    meta = read_meta(path)
    check_engine(path, meta, cfg.engine.name)
    check_resume_config(path, meta, cfg)
    return path
