"""Every value and cross-field rule of a :class:`~moetrain.config.run.TrainConfig`, section by section.

:func:`validate` raises :class:`~moetrain.config.errors.ConfigError` with one line naming the key, its
value and the rule, before any model or data is built. The registries of routing strategies
(``moe/strategies.py``), balance losses (``moe/losses.py``) and drop policies live with their math
(``moetrain.moe``); the rules here read what each entry needs from them, never its name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from moetrain.config.errors import ConfigError
from moetrain.config.limits import check_optim, check_seed
from moetrain.config.model import ModelConfig, MoEConfig, RouterConfig, resolve_num_groups
from moetrain.config.pipeline_layout import check_pipeline_layout, check_pipeline_training
from moetrain.config.run import CheckpointConfig, DataConfig, TrainConfig, TrainerConfig, config_keys
from moetrain.config.world import micro_batch_for, usable_cpus

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


def validate(cfg: TrainConfig, world_size: int = 1, for_training: bool = True) -> TrainConfig:
    """Check every value and cross-field rule; raise :class:`ConfigError` on the first break. ``for_training``
    false (``moetrain-plan``) accepts what is planned but not yet trained (``parallel.pp > 1`` with DeepSpeed or
    compilation)."""
    for key, value in float_values(cfg).items():  # NaN passes every `< 0` test below: refuse it first
        if not math.isfinite(value):
            _fail(key, value, "must be a finite number")
        if abs(value) > FLOAT32_MAX or 0 < abs(value) < FLOAT32_TINY:  # 1e39 is inf, 1e-39 is 0 in float32
            _fail(key, value, f"must be 0 or within float32's range ({FLOAT32_TINY:.1e} to {FLOAT32_MAX:.1e})")
    _model(cfg.model)
    _moe(cfg.moe)
    _parallel(cfg, world_size, for_training)
    _router(cfg)
    _balance(cfg)
    _data(cfg.data)
    check_optim(cfg.optim)
    _trainer(cfg.trainer, world_size // cfg.parallel.pp, cfg.parallel.pp)  # each stage's data-parallel ranks
    if cfg.parallel.pp > 1 and for_training:
        dp = world_size // cfg.parallel.pp
        check_pipeline_training(cfg, _microbatches(cfg.trainer, dp, cfg.parallel.pp))
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
    _attention(m)


ATTENTIONS = ("gqa", "mla")
ROPE_SCALINGS = ("none", "yarn")


def _attention(m: ModelConfig) -> None:
    """``model.attention`` and, for MLA, its widths (even RoPE width) and the YaRN keys."""
    _choice("model.attention", m.attention, ATTENTIONS)
    _choice("model.rope_scaling.type", m.rope_scaling.type, ROPE_SCALINGS)
    _choice("model.qk_norm_scope", m.qk_norm_scope, ("head", "all"))
    if m.attention == "mla":
        for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            _positive(f"model.{key}", getattr(m, key))
        if m.q_lora_rank is not None:
            _positive("model.q_lora_rank", m.q_lora_rank)
        if m.qk_rope_head_dim % 2:
            _fail("model.qk_rope_head_dim", m.qk_rope_head_dim, "must be even for RoPE")
    if m.mtp_depth < 0 or m.mtp_lambda < 0:
        key = "model.mtp_depth" if m.mtp_depth < 0 else "model.mtp_lambda"
        _fail(key, getattr(m, key.split(".")[1]), "must be >= 0")
    if m.rope_scaling.type == "yarn":
        if m.attention != "mla":
            _fail("model.rope_scaling.type", "yarn", "YaRN is implemented for model.attention=mla (DeepSeek-V2/V3)")
        if m.rope_scaling.factor < 1:
            _fail("model.rope_scaling.factor", m.rope_scaling.factor, "must be >= 1")
        _positive("model.rope_scaling.original_max_seq_len", m.rope_scaling.original_max_seq_len)


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


def _parallel(cfg: TrainConfig, world_size: int, for_training: bool = True) -> None:
    moe = cfg.moe
    p = cfg.parallel
    _positive("parallel.ep", p.ep)
    _choice("parallel.backend", p.backend, BACKENDS)
    check_pipeline_layout(p.pp, p.pp_schedule, p.pp_virtual, p.pp_layers, cfg.model.n_layers, world_size)
    layout_error = ep_layout_error(world_size // p.pp, p.ep, moe.num_experts)
    if layout_error:
        raise ConfigError(
            layout_error.replace("the world size", "the world size / parallel.pp") if p.pp > 1 else layout_error
        )


def _router(cfg: TrainConfig) -> None:
    moe, r = cfg.moe, cfg.moe.router
    from moetrain.moe.capacity import DROP_POLICIES  # registries live with the math
    from moetrain.moe.routing import ROUTER_DTYPES
    from moetrain.moe.strategies import STRATEGIES

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
    _choice("moe.router.hash_table", r.hash_table, HASH_TABLES)
    _strategy(r)


def _strategy(r: RouterConfig) -> None:
    """What the chosen strategy needs of the router's keys (its :class:`~moetrain.moe.strategies.RoutingStrategy`)."""
    from moetrain.moe.strategies import STRATEGIES, strategies_with

    strategy = STRATEGIES[r.strategy]
    if strategy.variable_k and r.topk_groups is not None:
        _fail("moe.router.topk_groups", r.topk_groups, "device-limited routing needs a token-choice strategy")
    if r.score_fn not in strategy.score_fns:
        _fail(
            "moe.router.score_fn",
            r.score_fn,
            f"strategy {r.strategy} is defined with {'|'.join(strategy.score_fns)} scores",
        )
    if r.hash_table != "random" and not strategy.token_ids:
        _fail("moe.router.hash_table", r.hash_table, f"needs router.strategy={strategies_with('token_ids')}")
    if not strategy.uses_bias and r.bias_update_rate > 0:
        _fail("moe.router.bias_update_rate", r.bias_update_rate, f"strategy {r.strategy} ignores the bias; set 0")
    if r.zero_init and not strategy.noise:
        _fail(
            "moe.router.zero_init",
            r.zero_init,
            f"needs router.strategy={strategies_with('noise')} (else every token ties)",
        )


def _balance(cfg: TrainConfig) -> None:
    from moetrain.moe.losses import BALANCE_LOSSES, coefficient_keys
    from moetrain.moe.strategies import STRATEGIES, strategies_with

    moe, r, b = cfg.moe, cfg.moe.router, cfg.moe.balance
    groups = resolve_num_groups(moe, cfg.parallel.ep)
    for key in coefficient_keys():
        if getattr(b, key) < 0:
            _fail(f"moe.balance.{key}", getattr(b, key), "must be >= 0")
    _choice("moe.balance.scope", b.scope, BALANCE_SCOPES)
    _choice("moe.balance.expert_form", b.expert_form, EXPERT_FORMS)
    if b.expert_form == "transformers" and b.scope == "global":
        _fail("moe.balance.expert_form", b.expert_form, "pools one forward's layers; use moe.balance.scope=micro_batch")
    for loss in BALANCE_LOSSES:  # what each enabled loss needs (moetrain.moe.losses)
        key, coef = f"moe.balance.{loss.coef}", getattr(b, loss.coef)
        if not coef > 0:
            continue
        if loss.needs_spare_expert and moe.top_k >= moe.num_experts:
            _fail(key, coef, "needs moe.top_k < moe.num_experts (a (k+1)-th expert)")
        if loss.needs_noise and not STRATEGIES[r.strategy].noise:
            _fail(key, coef, f"needs router.strategy={strategies_with('noise')} (the load is a noise probability)")
        if loss.needs_groups and groups < 2:
            _fail(key, coef, "needs 2+ device groups (router.num_groups or parallel.ep)")


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


def _microbatches(t: TrainerConfig, dp: int, pp: int) -> int:
    """Micro-batches per step of each of ``dp`` data-parallel ranks (or pipelines of ``pp`` stages)."""
    return t.global_batch_size // (micro_batch_for(t, dp, pp) * dp)


def _trainer(t: TrainerConfig, world_size: int, pp: int = 1) -> None:
    for key in ("max_steps", "global_batch_size", "log_every"):
        _positive(f"trainer.{key}", getattr(t, key))
    if t.micro_batch_size is not None:
        _positive("trainer.micro_batch_size", t.micro_batch_size)
    if t.eval_every < 0:
        _fail("trainer.eval_every", t.eval_every, "must be >= 0 (0 = only at the end)")
    check_seed("trainer.seed", t.seed)
    micro = micro_batch_for(t, world_size, pp)
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
