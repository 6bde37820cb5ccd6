"""Every value and cross-field rule of a :class:`~moetrain.config.run.TrainConfig`, section by section.

:func:`validate` raises :class:`~moetrain.config.errors.ConfigError` with one line naming the key, its
value and the rule, before any model or data is built. The registries of routing strategies and drop
policies live with their math (``moetrain.moe``) and are read from there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from moetrain.config.errors import ConfigError
from moetrain.config.model import ModelConfig, MoEConfig, resolve_num_groups
from moetrain.config.run import CheckpointConfig, DataConfig, OptimConfig, TrainConfig, TrainerConfig, config_keys

SCORE_FNS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "topk_sum")
EXPERT_FORMS = ("per_layer", "transformers")
HASH_TABLES = ("random", "balanced")
BALANCE_SCOPES = ("micro_batch", "global")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENGINES = ("native", "deepspeed")
ZERO_STAGES = (0, 1, 2)
BACKENDS = ("auto", "nccl", "gloo")
RECV_OVERFLOWS = ("drop", "error")
NONFINITE_POLICIES = ("stop", "skip")
FLOAT32_MAX = 3.4028234663852886e38
"""``torch.finfo(torch.float32).max``: the trainer holds learning rates, coefficients and losses in float32."""
FLOAT32_TINY = 1.1754943508222875e-38
"""``torch.finfo(torch.float32).tiny``, the smallest normal float32: a non-zero value below it underflows."""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as ``taskset`` / SLURM's cgroup set it)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS has no affinity masks
        return os.cpu_count() or 1


def default_threads(local_world_size: int = 1) -> int:
    """Threads for torch when ``trainer.num_threads`` is unset: the CPUs this process may use, shared by the
    ranks on this node, at least 1. torch's own default counts the machine's cores, not the ones the process
    may use: on a shared 2-core slice of a large machine it oversubscribes them (issue 31: 34 s instead of 7 s)."""
    return max(1, usable_cpus() // max(local_world_size, 1))


def micro_batch_for(t: TrainerConfig, world_size: int) -> int:
    """``trainer.micro_batch_size``, or when unset the rank's share of the global batch (global / world size);
    raises :class:`ConfigError` naming the keys when the global batch does not split over the ranks."""
    if t.micro_batch_size is not None:
        return t.micro_batch_size
    if t.global_batch_size > 0 and t.global_batch_size % world_size:
        _fail(
            "trainer.global_batch_size",
            t.global_batch_size,
            f"must be divisible by the world size={world_size} (each rank takes an equal share); "
            f"use a multiple of {world_size}",
        )
    return max(t.global_batch_size // world_size, 1)


def with_micro_batch(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """``cfg`` with ``trainer.micro_batch_size`` resolved (:func:`micro_batch_for`); ``cfg`` itself when set."""
    if cfg.trainer.micro_batch_size is not None:
        return cfg
    trainer = dataclasses.replace(cfg.trainer, micro_batch_size=micro_batch_for(cfg.trainer, world_size))
    return dataclasses.replace(cfg, trainer=trainer)


def ep_layout_error(world_size: int, ep: int, num_experts: int | None = None) -> str | None:
    """The one check that W ranks split into EP groups of ``ep`` and the experts over each group (a
    :class:`ConfigError` line, or ``None``)."""
    if ep <= 0:
        return f"parallel.ep={ep}: must be > 0"
    if world_size % ep:
        return f"parallel.ep={ep}: must divide the world size ({world_size} rank{'s' if world_size != 1 else ''})"
    if num_experts is not None and num_experts % ep:
        return f"parallel.ep={ep}: must divide moe.num_experts={num_experts}"
    return None


def _fail(key: str, value: Any, rule: str) -> None:
    raise ConfigError(f"{key}={value!r}: {rule}")


def _positive(key: str, value: Any) -> None:
    if value is None or value <= 0:
        _fail(key, value, "must be > 0")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, f"must be one of {', '.join(choices)}")


def float_values(obj: Any, prefix: str = "") -> dict[str, float]:
    """Every float value of a (nested) config dataclass by dotted key (``optim.lr``); ints and bools excluded."""
    out: dict[str, float] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(float_values(value, key + "."))
        elif isinstance(value, float):
            out[key] = value
    return out


def validate(cfg: TrainConfig, world_size: int = 1) -> TrainConfig:
    """Check every value and cross-field rule; raise :class:`ConfigError` on the first break."""
    for key, value in float_values(cfg).items():  # NaN passes every `< 0` test below: refuse it first
        if not math.isfinite(value):
            _fail(key, value, "must be a finite number")
        if abs(value) > FLOAT32_MAX or 0 < abs(value) < FLOAT32_TINY:  # 1e39 is inf, 1e-39 is 0 in float32
            _fail(key, value, f"must be 0 or within float32's range ({FLOAT32_TINY:.1e} to {FLOAT32_MAX:.1e})")
    _model(cfg.model)
    _moe(cfg.moe)
    _parallel(cfg, world_size)
    _router(cfg)
    _balance(cfg)
    _data(cfg.data)
    _optim(cfg.optim)
    _trainer(cfg.trainer, world_size)
    _checkpoint(cfg.checkpoint)
    _choice("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)
    validate_engine(cfg, world_size)
    return cfg


def _model(m: ModelConfig) -> None:
    for key in ("dim", "n_layers", "n_heads", "ffn_hidden_size", "vocab_multiple"):
        _positive(f"model.{key}", getattr(m, key))
    if m.vocab_size is not None:
        _positive("model.vocab_size", m.vocab_size)
    if m.dim % m.n_heads:
        _fail("model.dim", m.dim, f"must be divisible by model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        _fail("model.dim", m.dim, "head dim (dim / n_heads) must be even for RoPE")
    n_kv = m.n_kv_heads or m.n_heads
    _positive("model.n_kv_heads", n_kv)
    if m.n_heads % n_kv:
        _fail("model.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads={m.n_heads}")
    if not 0 <= m.first_k_dense <= m.n_layers:
        _fail("model.first_k_dense", m.first_k_dense, f"must be in [0, model.n_layers={m.n_layers}]")
    _positive("model.moe_every", m.moe_every)
    _positive("model.init_std", m.init_std)
    _positive("model.rope_theta", m.rope_theta)
    _positive("model.norm_eps", m.norm_eps)


def _moe(moe: MoEConfig) -> None:
    for key in ("num_experts", "top_k", "expert_hidden_size"):
        _positive(f"moe.{key}", getattr(moe, key))
    if moe.top_k > moe.num_experts:
        _fail("moe.top_k", moe.top_k, f"must be <= moe.num_experts={moe.num_experts}")
    if moe.num_shared_experts < 0:
        _fail("moe.num_shared_experts", moe.num_shared_experts, "must be >= 0")
    if moe.shared_hidden_size is not None:
        _positive("moe.shared_hidden_size", moe.shared_hidden_size)
    if moe.max_recv_factor is not None and moe.max_recv_factor < 1.0:
        _fail("moe.max_recv_factor", moe.max_recv_factor, "must be >= 1 (1 = the balanced share)")
    _choice("moe.recv_overflow", moe.recv_overflow, RECV_OVERFLOWS)


def _parallel(cfg: TrainConfig, world_size: int) -> None:
    moe = cfg.moe
    p = cfg.parallel
    _positive("parallel.ep", p.ep)
    _choice("parallel.backend", p.backend, BACKENDS)
    if not (p.bucket_mb > 0 and math.isfinite(p.bucket_mb)):  # nan and inf pass a plain "> 0"
        _fail("parallel.bucket_mb", p.bucket_mb, "must be a finite size in MiB > 0 (PyTorch DDP's default is 25)")
    layout_error = ep_layout_error(world_size, p.ep, moe.num_experts)
    if layout_error:
        raise ConfigError(layout_error)


def _router(cfg: TrainConfig) -> None:
    moe, r = cfg.moe, cfg.moe.router
    from moetrain.moe.capacity import DROP_POLICIES  # registries live with the math
    from moetrain.moe.router import ROUTER_DTYPES
    from moetrain.moe.routing import STRATEGIES

    _choice("moe.router.strategy", r.strategy, tuple(STRATEGIES))
    _choice("moe.router.score_fn", r.score_fn, SCORE_FNS)
    _choice("moe.router.group_score", r.group_score, GROUP_SCORES)
    _choice("moe.router.drop_policy", r.drop_policy, DROP_POLICIES)
    _choice("moe.router.dtype", r.dtype, tuple(ROUTER_DTYPES))
    _positive("moe.router.scaling_factor", r.scaling_factor)
    if r.bias_update_rate < 0:
        _fail("moe.router.bias_update_rate", r.bias_update_rate, "must be >= 0")
    for key in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(r, key)
        if value is not None and value <= 0:
            _fail(f"moe.router.{key}", value, "must be > 0 or null (dropless)")
    groups = resolve_num_groups(moe, cfg.parallel.ep)
    if r.num_groups is not None:
        _positive("moe.router.num_groups", r.num_groups)
    if moe.num_experts % groups:
        _fail("moe.router.num_groups", groups, f"must divide moe.num_experts={moe.num_experts}")
    if r.topk_groups is not None:
        _positive("moe.router.topk_groups", r.topk_groups)
        if r.topk_groups > groups:
            _fail("moe.router.topk_groups", r.topk_groups, f"must be <= the number of groups ({groups})")
        if r.topk_groups * (moe.num_experts // groups) < moe.top_k:
            _fail(
                "moe.router.topk_groups",
                r.topk_groups,
                f"M groups of {moe.num_experts // groups} experts cannot hold moe.top_k={moe.top_k}",
            )
    if r.group_score == "topk_sum" and r.topk_groups and moe.top_k % r.topk_groups:
        _fail("moe.router.group_score", r.group_score, "topk_sum needs moe.top_k divisible by topk_groups")
    _positive("moe.router.noise_std", r.noise_std)
    if not 0.0 <= r.device_protect_fraction <= 1.0:
        _fail("moe.router.device_protect_fraction", r.device_protect_fraction, "must be in [0, 1]")
    if r.device_capacity_factor is not None:
        _positive("moe.router.device_capacity_factor", r.device_capacity_factor)
        if groups < 2:
            _fail("moe.router.device_capacity_factor", r.device_capacity_factor, "needs 2+ device groups")
    if r.strategy == "expert_choice" and r.topk_groups is not None:
        _fail("moe.router.topk_groups", r.topk_groups, "device-limited routing needs a token-choice strategy")
    if r.strategy in ("topk_softmax", "noisy_topk", "expert_choice") and r.score_fn != "softmax":
        _fail("moe.router.score_fn", r.score_fn, f"strategy {r.strategy} is defined with softmax scores")
    _choice("moe.router.hash_table", r.hash_table, HASH_TABLES)
    if r.hash_table != "random" and r.strategy != "hash":
        _fail("moe.router.hash_table", r.hash_table, "needs router.strategy=hash")
    if r.strategy == "hash" and r.bias_update_rate > 0:
        _fail("moe.router.bias_update_rate", r.bias_update_rate, "hash routing ignores the bias; set 0")


def _balance(cfg: TrainConfig) -> None:
    moe, r, b = cfg.moe, cfg.moe.router, cfg.moe.balance
    groups = resolve_num_groups(moe, cfg.parallel.ep)
    for key in ("expert_coef", "device_coef", "comm_coef", "seq_coef", "z_loss_coef", "importance_coef", "load_coef"):
        if getattr(b, key) < 0:
            _fail(f"moe.balance.{key}", getattr(b, key), "must be >= 0")
    _choice("moe.balance.scope", b.scope, BALANCE_SCOPES)
    _choice("moe.balance.expert_form", b.expert_form, EXPERT_FORMS)
    if b.expert_form == "transformers" and b.scope == "global":
        _fail("moe.balance.expert_form", b.expert_form, "pools one forward's layers; use moe.balance.scope=micro_batch")
    if r.zero_init and r.strategy != "noisy_topk":
        _fail("moe.router.zero_init", r.zero_init, "needs router.strategy=noisy_topk (else every token ties)")
    if b.load_coef > 0 and moe.top_k >= moe.num_experts:
        _fail("moe.balance.load_coef", b.load_coef, "needs moe.top_k < moe.num_experts (a (k+1)-th expert)")
    if b.load_coef > 0 and r.strategy != "noisy_topk":
        _fail(
            "moe.balance.load_coef", b.load_coef, "needs router.strategy=noisy_topk (the load is a noise probability)"
        )
    for key in ("device_coef", "comm_coef"):
        if getattr(b, key) > 0 and groups < 2:
            _fail(f"moe.balance.{key}", getattr(b, key), "needs 2+ device groups (router.num_groups or parallel.ep)")


def _data(d: DataConfig) -> None:
    _positive("data.seq_len", d.seq_len)
    if not 0.0 < d.val_fraction < 1.0:
        _fail("data.val_fraction", d.val_fraction, "must be in (0, 1)")
    if d.max_val_sequences is not None:
        _positive("data.max_val_sequences", d.max_val_sequences)
    if d.source == "files" and not d.paths:
        _fail("data.paths", d.paths, "must list at least one file when data.source=files")
    _positive("data.shard_tokens", d.shard_tokens)
    if d.streaming and (d.source in ("stdlib", "files") or d.sources):
        _fail(
            "data.streaming", d.streaming, "is for one hub dataset (data.source=<name>), not stdlib, files or sources"
        )
    if d.num_proc < 0:
        _fail("data.num_proc", d.num_proc, "must be >= 0 (0 = automatic)")
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        if not s.name or s.name in names[:i]:
            _fail(f"data.sources[{i}].name", s.name, "every source needs a unique, non-empty name")
        if not (math.isfinite(s.weight) and s.weight > 0):
            _fail(f"data.sources[{i}].weight", s.weight, "must be a finite number > 0")
        if s.source == "files" and not s.paths:
            _fail(f"data.sources[{i}].paths", s.paths, "must list at least one file when source=files")


def _optim(o: OptimConfig) -> None:
    _positive("optim.lr", o.lr)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _fail("optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    if o.warmup_steps < 0:
        _fail("optim.warmup_steps", o.warmup_steps, "must be >= 0")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", o.weight_decay, "must be >= 0")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            _fail(f"optim.{key}", getattr(o, key), "must be in [0, 1)")
    if o.grad_clip < 0:
        _fail("optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    _positive("optim.eps", o.eps)


def _trainer(t: TrainerConfig, world_size: int) -> None:
    for key in ("max_steps", "global_batch_size", "log_every"):
        _positive(f"trainer.{key}", getattr(t, key))
    if t.micro_batch_size is not None:
        _positive("trainer.micro_batch_size", t.micro_batch_size)
    if t.eval_every < 0:
        _fail("trainer.eval_every", t.eval_every, "must be >= 0 (0 = only at the end)")
    micro = micro_batch_for(t, world_size)
    if t.global_batch_size % (micro * world_size):
        share, fix = t.global_batch_size // world_size, f"use a global batch that is a multiple of {world_size}"
        if share and t.global_batch_size % world_size == 0:
            fix = f"set trainer.micro_batch_size to a divisor of {share} (each rank's share) or unset it (null)"
        _fail(
            "trainer.global_batch_size",
            t.global_batch_size,
            f"must be divisible by trainer.micro_batch_size={micro} x world size={world_size}: {fix}",
        )
    _choice("trainer.device", t.device, DEVICES)
    _choice("trainer.precision", t.precision, PRECISIONS)
    if t.peak_tflops is not None:
        _positive("trainer.peak_tflops", t.peak_tflops)
    if t.num_threads is not None:
        _positive("trainer.num_threads", t.num_threads)
        if t.num_threads > usable_cpus():  # 100000 threads exhaust memory and crash the process
            _fail("trainer.num_threads", t.num_threads, f"must be <= the {usable_cpus()} CPUs this process may use")

    if not t.resume:
        _fail("trainer.resume", t.resume, "must be auto, latest, none or a checkpoint path")
    known = config_keys(TrainConfig())
    for key in t.resume_allow_changes:
        if key not in known and not any(k.startswith(f"{key}.") for k in known):
            _fail("trainer.resume_allow_changes", key, "is not a config key or section (e.g. optim.lr, optim)")
    _choice("trainer.nonfinite", t.nonfinite, NONFINITE_POLICIES)
    if t.nonfinite_max_skips < 0:
        _fail("trainer.nonfinite_max_skips", t.nonfinite_max_skips, "must be >= 0")


def _checkpoint(ck: CheckpointConfig) -> None:
    if ck.every < 0:
        _fail("checkpoint.every", ck.every, "must be >= 0 (0 = only at the last step)")
    if ck.keep_last < 0:
        _fail("checkpoint.keep_last", ck.keep_last, "must be >= 0 (0 = keep all)")
    if ck.dir is not None and not ck.dir:
        _fail("checkpoint.dir", ck.dir, "must be a path or null (RUN_DIR/checkpoints)")


def validate_engine(cfg: TrainConfig, world_size: int = 1) -> None:
    """The ``engine.*`` rules (and, for DeepSpeed, its generated-and-merged JSON)."""
    e = cfg.engine
    _choice("engine.name", e.name, ENGINES)
    if cfg.parallel.fsdp and e.name != "native":
        _fail("parallel.fsdp", True, f"needs engine=native (engine={e.name} shards by its own ZeRO stages)")
    if e.name == "native":
        if cfg.trainer.precision == "fp16":
            _fail("trainer.precision", "fp16", "needs engine=deepspeed (its loss scaling); use bf16 or fp32")
        return
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        _fail("engine.name", e.name, "needs the deepspeed package: pip install 'moetrain[deepspeed]'")
    if e.zero_stage not in ZERO_STAGES:
        _fail("engine.zero_stage", e.zero_stage, "must be 0, 1 or 2 (DeepSpeed refuses ZeRO-3 with MoE layers)")
    if e.loss_scale < 0:
        _fail("engine.loss_scale", e.loss_scale, "must be >= 0 (0 = dynamic)")
    if e.min_loss_scale <= 0:
        _fail("engine.min_loss_scale", e.min_loss_scale, "must be > 0")
    for key in ("loss_scale_window", "reduce_bucket_size"):
        _positive(f"engine.{key}", getattr(e, key))
    if cfg.checkpoint.async_save:
        _fail("checkpoint.async_save", True, "is not supported with engine=deepspeed (DeepSpeed writes its own files)")
    if cfg.trainer.nonfinite == "skip":
        _fail(
            "trainer.nonfinite",
            "skip",
            "needs engine=native (DeepSpeed's own fp16 loss scaling skips overflowing steps); use stop",
        )
    # The merged DeepSpeed JSON (engine.config_json) is checked by moetrain.train.deepspeed.config.
