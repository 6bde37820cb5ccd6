"""The DeepSpeed JSON of a run: generated from the Hydra config, optionally merged with the user's file.

Pure functions (no ``deepspeed`` import), so :func:`validate_deepspeed` builds and checks the
final DeepSpeed config before any work starts.

What moetrain owns and DeepSpeed must agree with:

- the batch: ``train_batch_size`` = ``trainer.global_batch_size``,
  ``train_micro_batch_size_per_gpu`` = ``trainer.micro_batch_size`` and
  ``gradient_accumulation_steps`` = global / (micro x world size), because the
  data loader hands each rank its slice of the global batch;
- the optimizer and LR schedule: moetrain's AdamW (decay on matrices only) and
  warmup + cosine are passed to ``deepspeed.initialize`` as client objects, so
  the JSON's ``optimizer`` and ``scheduler`` sections are refused.

Everything else (ZeRO stage and buckets, bf16 / fp16 and loss scaling,
``gradient_clipping``, logging) comes from ``engine.*``, ``trainer.precision``
and ``optim.grad_clip``, and a key in ``engine.config_json`` overrides it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moetrain.config import TrainConfig

OWNED_SECTIONS = ("optimizer", "scheduler")
"""JSON sections moetrain builds itself (``optim.*``)."""


DEEPSPEED_ONLY = ("zero_stage", "loss_scale", "initial_scale_power", "loss_scale_window", "min_loss_scale")
"""The ``engine.*`` keys only DeepSpeed reads (besides ``engine.config_json``)."""


def inactive_engine_options(cfg: TrainConfig) -> list[str]:
    """The DeepSpeed-only ``engine.*`` options set in a run of another engine, each with the reason (for
    :func:`moetrain.train.cli.inactive_options`)."""
    if cfg.engine.name == "deepspeed":
        return []
    defaults = type(cfg.engine)()
    out = [f"engine.{key} only acts with engine=deepspeed" for key in DEEPSPEED_ONLY
           if getattr(cfg.engine, key) != getattr(defaults, key)]  # fmt: skip
    if cfg.engine.config_json:
        out.append("engine.config_json only acts with engine=deepspeed")
    return out


def _error(message: str) -> Exception:
    from moetrain.config import ConfigError

    return ConfigError(message)


def resolve_precision(precision: str, device_type: str | None) -> str:
    """``trainer.precision`` for DeepSpeed: ``auto`` is bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def generated_ds_config(cfg: TrainConfig, world_size: int, device_type: str | None = None) -> dict[str, Any]:
    """The DeepSpeed config that the Hydra keys describe (before ``engine.config_json``)."""
    t, e = cfg.trainer, cfg.engine
    precision = resolve_precision(t.precision, device_type)
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": e.zero_stage,
            # DeepSpeed's MoE support in ZeRO-1/2 requires both (stage_1_and_2._configure_moe_settings).
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "overlap_comm": e.overlap_comm,
            "reduce_bucket_size": e.reduce_bucket_size,
            "allgather_bucket_size": e.reduce_bucket_size,
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": e.loss_scale,
            "initial_scale_power": e.initial_scale_power,
            "loss_scale_window": e.loss_scale_window,
            "hysteresis": 2,
            "min_loss_scale": e.min_loss_scale,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # moetrain logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over``'s keys win; nested dicts merge key by key (a new dict; inputs untouched)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_user_json(path: str) -> dict[str, Any]:
    """``engine.config_json``: a JSON object, or one :class:`ConfigError` line naming the file."""
    key = f"engine.config_json={path!r}"
    p = Path(path)
    if not p.is_file():
        raise _error(f"{key}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise _error(f"{key}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise _error(f"{key}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise _error(f"{key}: must hold a JSON object, not {type(data).__name__}")
    return data


def ds_precision(ds: dict[str, Any]) -> str:
    """``fp16``, ``bf16`` or ``fp32``: what a (merged) DeepSpeed config trains in."""
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    if fp16 and bf16:
        raise _error("deepspeed config: fp16.enabled and bf16.enabled are both true; pick one")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def check_ds_config(ds: dict[str, Any], generated: dict[str, Any], source: str) -> None:
    """Refuse what contradicts moetrain: owned sections, another batch, unsupported ZeRO settings."""
    for section in OWNED_SECTIONS:
        if section in ds:
            raise _error(
                f"{source}: '{section}' is not allowed; moetrain builds AdamW and the warmup+cosine schedule "
                "from optim.* (set optim.lr, optim.weight_decay, ... instead)"
            )
    hydra_key = {
        "train_batch_size": "trainer.global_batch_size",
        "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
        "gradient_accumulation_steps": "trainer.global_batch_size / (trainer.micro_batch_size x world size)",
    }
    for key, owner in hydra_key.items():
        if ds.get(key) != generated[key]:
            raise _error(f"{source}: {key}={ds.get(key)!r} disagrees with {owner} = {generated[key]}; set {owner}")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        raise _error(f"{source}: zero_optimization.stage={stage!r}: must be 0, 1 or 2 (ZeRO-3 refuses MoE layers)")
    if stage >= 1 and not zero.get("reduce_scatter", True):
        raise _error(f"{source}: zero_optimization.reduce_scatter=false: DeepSpeed's MoE path needs true")
    if stage == 2 and not zero.get("contiguous_gradients", True):
        raise _error(f"{source}: zero_optimization.contiguous_gradients=false: ZeRO-2 with MoE needs true")
    ds_precision(ds)


def build_ds_config(cfg: TrainConfig, world_size: int, device_type: str | None = None) -> dict[str, Any]:
    """The generated config with ``engine.config_json`` merged over it, checked."""
    generated = generated_ds_config(cfg, world_size, device_type)
    if not cfg.engine.config_json:
        check_ds_config(generated, generated, "deepspeed config")
        return generated
    merged = deep_merge(generated, read_user_json(cfg.engine.config_json))
    check_ds_config(merged, generated, f"engine.config_json={cfg.engine.config_json!r}")
    return merged


def validate_deepspeed(cfg: TrainConfig, world_size: int) -> None:
    """The generated-and-merged DeepSpeed JSON of an ``engine=deepspeed`` run, checked before any work
    (one :class:`~moetrain.config.ConfigError` line naming the file or key)."""
    if cfg.engine.name != "deepspeed":
        return
    ds = build_ds_config(cfg, world_size)  # reads and checks engine.config_json
    if ds_precision(ds) == "fp16":
        import torch

        if cfg.trainer.device == "cpu" or not torch.cuda.is_available():
            raise _error("trainer.precision='fp16': DeepSpeed has no fp16 on CPU; use bf16 or fp32 (fp16 needs a GPU)")
