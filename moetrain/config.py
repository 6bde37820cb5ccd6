"""Structured configuration: the one source of truth for every key.

Hydra only composes YAML values on top of these dataclasses (registered as the
schema of ``configs/train.yaml``); the entry point converts the composed config
once with ``OmegaConf.to_object`` and calls :func:`validate`, so nothing below
the entry point ever sees a ``DictConfig``.

Every field has its documentation next to its default. Cross-field rules live in
:func:`validate`, which raises :class:`ConfigError` with one line naming the key,
its value and the rule, before any model or data is built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the key."""


@dataclass
class ModelConfig:
    """The decoder-only Transformer (everything except the MoE FFNs)."""

    vocab_size: int | None = None
    """Vocabulary size; ``None`` takes the tokenizer's size (rounded up to ``vocab_multiple``)."""
    vocab_multiple: int = 64
    """Round the tokenizer's vocabulary up to a multiple of this (GEMM-friendly shapes)."""
    dim: int = 256
    """Hidden size D of the residual stream."""
    n_layers: int = 4
    """Number of Transformer blocks."""
    n_heads: int = 8
    """Attention query heads; ``dim`` must be divisible by it."""
    n_kv_heads: int | None = 4
    """Key/value heads for grouped-query attention (``None`` = ``n_heads``, i.e. MHA)."""
    ffn_hidden_size: int = 768
    """Hidden size of the dense SwiGLU MLP used in the first ``first_k_dense`` layers."""
    first_k_dense: int = 1
    """The first k layers use a dense FFN (DeepSeek-V2 keeps layer 0 dense)."""
    moe_every: int = 1
    """After the first k dense layers, every ``moe_every``-th layer is MoE, the others dense."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding and LM head weights."""
    qk_norm: bool = False
    """RMSNorm over each head's query and key before RoPE (Qwen3, OLMo-2); off = plain attention."""
    init_std: float = 0.02
    """Std of the normal init; output projections are scaled by 1/sqrt(2 * n_layers) (GPT-2)."""


@dataclass
class RouterConfig:
    """How tokens choose experts (scores, selection, weights)."""

    score_fn: str = "softmax"
    """``softmax`` (GShard, DeepSeek-V2) or ``sigmoid`` (DeepSeek-V3) affinities."""
    strategy: str = "topk"
    """Selection rule, a key of ``moetrain.moe.routing.STRATEGIES``."""
    norm_topk_prob: bool = False
    """Renormalise the K chosen weights to sum to 1 (Mixtral; always on for sigmoid)."""
    scaling_factor: float = 1.0
    """Routed scaling factor multiplying the combine weights (DeepSeek-V2/V3)."""
    num_groups: int | None = None
    """Device groups for device-limited routing; ``None`` = the EP ranks."""
    topk_groups: int | None = None
    """M, the number of groups a token may use (device-limited routing); ``None`` = no limit."""
    group_score: str = "max"
    """How a group is scored: ``max`` (DeepSeek-V2) or ``topk_sum`` (DeepSeek-V3, sum of its top K/M)."""
    bias_update_rate: float = 0.0
    """Loss-free balancing update speed u (Wang et al. 2024); 0 disables the bias."""
    noise_std: float = 1.0
    """Noisy top-K: scale of the N(0, 1) * softplus(x W_noise) noise (Shazeer et al. 2017)."""
    capacity_factor: float | None = None
    """Per-expert capacity factor in training; ``None`` = dropless. Expert choice uses it as c."""
    eval_capacity_factor: float | None = None
    """Capacity factor at evaluation; ``None`` = dropless."""
    hash_seed: int = 0
    """Seed of the fixed random token-id -> expert map of hash routing (Roller et al. 2021)."""
    hash_table: str = "random"
    """Hash routing's map: ``random`` (a fixed random hash of the token id) or ``balanced`` (Roller et al. 2021's
    balanced assignment: built from the training corpus's token frequencies, the most frequent ids first, each
    to the least-loaded expert; saved with the model)."""
    device_capacity_factor: float | None = None
    """DeepSeek-V2 device-level dropping in training: per-group budget = factor x the mean share (paper: 1.0)."""
    zero_init: bool = False
    """Initialise the router weights W_g (and W_noise) to zero (Shazeer et al. 2017, appendix A: routing starts
    from the noise alone); ``strategy=noisy_topk`` only."""
    device_protect_fraction: float = 0.0
    """Device-level dropping never drops the tokens of about this fraction of the training sequences (chosen by
    a hash of each sequence; DeepSeek-V2 sec. 2.2.4: about 10%)."""
    drop_policy: str = "score"
    """Which assignments an over-capacity expert drops: ``score`` (lowest affinity first, Megatron-Core's
    ``probs``) or ``position`` (GShard / Switch: first choices before second choices, then token order)."""


@dataclass
class BalanceConfig:
    """Auxiliary balance losses; each is off at coefficient 0."""

    expert_coef: float = 0.01
    """alpha_1 of the expert-level loss L_ExpBal = a1 * sum_i f_i P_i (DeepSeek-V2 eq. 12; Switch)."""
    device_coef: float = 0.0
    """alpha_2 of the device-level loss L_DevBal (DeepSeek-V2 eq. 14)."""
    comm_coef: float = 0.0
    """alpha_3 of the communication balance loss L_CommBal (DeepSeek-V2 eq. 16)."""
    seq_coef: float = 0.0
    """alpha of the DeepSeek-V3 sequence-wise balance loss (eq. 17-20)."""
    z_loss_coef: float = 0.0
    """Router z-loss coefficient (ST-MoE, Zoph et al. 2022, eq. 5)."""
    importance_coef: float = 0.0
    """Importance loss w * CV(importance)^2 (Shazeer et al. 2017, eq. 6-7)."""
    load_coef: float = 0.0
    """Smooth load loss w_load * CV(Load)^2, Load_i = sum_x P(x, i) via the normal CDF (Shazeer et al. 2017,
    appendix A, eq. 8-11); ``router.strategy=noisy_topk`` only (it needs the noise)."""
    expert_form: str = "per_layer"
    """Form of the expert-level loss: ``per_layer`` (each MoE layer's sum_i f_i P_i, f_i = N c_i / (K T): the
    DeepSeek-V2 / Switch normalisation, minimum 1 per layer) or ``transformers`` (transformers'
    ``load_balancing_loss_func``, what a Mixtral run optimises: all layers' tokens pooled, N sum_i
    (c_i / (L T)) P_i, i.e. K times the pooled per_layer formula, minimum K). Equal gradients per layer, when
    the layers route alike: ``expert_coef`` (per_layer) = coefficient (transformers) x K / L."""
    scope: str = "micro_batch"
    """f-type statistics over the ``micro_batch`` (per rank) or ``global``: summed over all micro-batches and DP
    ranks of the step (Qiu et al. 2025), at the cost of one extra no-grad forward per micro-batch. The
    sequence-wise and z losses are per sequence / token and importance CV^2 per micro-batch in either scope."""


@dataclass
class MoEConfig:
    """The routed-expert FFN."""

    num_experts: int = 8
    """N, routed experts per MoE layer."""
    top_k: int = 2
    """K, experts chosen per token (token-choice routing)."""
    expert_hidden_size: int = 256
    """Hidden size of one routed expert's SwiGLU (fine-grained experts are small)."""
    num_shared_experts: int = 1
    """Shared experts every token goes through (DeepSeekMoE); one fused SwiGLU of this many widths."""
    shared_hidden_size: int | None = None
    """Hidden size of one shared expert; ``None`` = ``expert_hidden_size``."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(x w_g), one learned gate per token (Qwen2-MoE); off = ungated."""
    max_recv_factor: float | None = None
    """Rows a rank may receive per layer, relative to the balanced share (EP guardrail); ``None`` = off."""
    recv_overflow: str = "drop"
    """Over the ``max_recv_factor`` budget: ``drop`` (lowest-weight assignments first) or ``error`` (stop, one line)."""
    router: RouterConfig = field(default_factory=RouterConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)


@dataclass
class DataConfig:
    """Corpus, tokenizer, packing."""

    source: str = "stdlib"
    """``stdlib`` (the running Python's standard library source), ``files`` (``paths``), or a hub dataset name."""
    paths: list[str] = field(default_factory=list)
    """Local text / .jsonl / .parquet files or globs when ``source=files``."""
    hub_config: str | None = None
    """Hub dataset configuration name (e.g. ``wikitext-2-raw-v1``)."""
    text_field: str = "text"
    """Column holding the text in JSONL / Parquet / hub datasets."""
    tokenizer: str = "byte"
    """``byte`` (256 bytes + specials) or a Hugging Face tokenizer name or path."""
    seq_len: int = 256
    """Tokens per training sequence."""
    val_fraction: float = 0.02
    """Fraction of documents (files, for the stdlib corpus) held out for validation."""
    max_val_sequences: int | None = 256
    """Cap on validation sequences (the first ones of the fixed val order); ``None`` = all."""
    seed: int = 1234
    """Seed of the split and of the per-epoch shuffle."""
    cache_dir: str | None = None
    """Where tokenised data is cached; ``None`` = ``$MOETRAIN_CACHE`` or ``~/.cache/moetrain``."""


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay (never on norms, biases and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1 (first-moment decay)."""
    beta2: float = 0.95
    """AdamW beta2 (second-moment decay)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class TrainerConfig:
    """The training loop."""

    max_steps: int = 300
    """Optimizer steps."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all ranks and micro-batches."""
    micro_batch_size: int = 16
    """Sequences per forward/backward on one rank; accumulation = global / (micro * world)."""
    log_every: int = 10
    """Log train metrics every n steps (and at the last step)."""
    eval_every: int = 100
    """Evaluate on the validation split every n steps (and at the end); 0 = only at the end."""
    eval_at_start: bool = True
    """Also evaluate before the first step (the starting validation loss, logged at step 0)."""
    seed: int = 0
    """Seed of the model init and of every random draw in training."""
    deterministic: bool = False
    """Use deterministic algorithms (bitwise-repeatable runs on the same topology)."""
    device: str = "auto"
    """``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``."""
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16`` (autocast: fp32 weights and residual stream,
    bf16 GEMMs; the MoE router stays fp32 while dispatch and experts run in bf16; DeepSpeed: bf16 weights,
    fp32 master copy) or ``fp16`` (``engine=deepspeed`` only: fp16 weights with loss scaling)."""
    peak_tflops: float | None = None
    """Peak device TFLOP/s for MFU; ``None`` = a table for known GPUs, else a measured GEMM rate."""
    progress: bool = True
    """Show a console progress bar."""
    num_threads: int | None = None
    """CPU threads for torch (``None`` = torch's default)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward (less memory, about one more forward)."""
    compile: bool = False
    """``torch.compile`` region by region (inductor): dense blocks whole; in MoE blocks the norms, attention,
    router and shared experts (dispatch, experts and combine stay eager)."""
    resume: str = "auto"
    """``auto`` (continue from the newest complete checkpoint in ``checkpoint.dir``, if any), ``none``, or a path."""
    resume_allow_changes: list[str] = field(default_factory=list)
    """Config keys (``optim.lr``) or whole sections (``optim``) a resume may change; any other change of a
    key that shapes the run (model, routing, data, batch, optimizer, seed) is refused. See the README."""
    nonfinite: str = "stop"
    """A non-finite loss or gradient norm: ``stop`` (the update is not applied; the run ends with one line)
    or ``skip`` (the update is not applied; training goes on, at most ``nonfinite_max_skips`` times)."""
    nonfinite_max_skips: int = 10
    """``nonfinite=skip``: steps that may be skipped over the whole run before it stops."""


@dataclass
class WandbConfig:
    """Weights & Biases (offline unless a key is set)."""

    mode: str = "auto"
    """``auto`` (online if ``WANDB_API_KEY`` is set, else offline), ``online``, ``offline``, ``disabled``."""
    project: str = "moetrain"
    """W&B project."""
    entity: str | None = None
    """W&B entity (user or team); ``None`` = the account's default."""
    group: str | None = None
    """W&B run group; ``None`` = none (a torchrun sweep sets the sweep's name)."""
    tags: list[str] = field(default_factory=list)
    """W&B run tags."""
    name: str | None = None
    """Run name; ``None`` = the run directory's name."""
    load_charts: bool = True
    """Log pictures of the load too: at every log step one heatmap of all MoE layers' per-expert load
    (``moe/load_by_layer``), at every evaluation the run's load heatmap so far (``moe/load_heatmap``)."""


@dataclass
class LoggerConfig:
    """Metric sinks beyond ``metrics.jsonl`` and the console."""

    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ParallelConfig:
    """Process layout (world size comes from torchrun / SLURM)."""

    ep: int = 1
    """Expert-parallel size: experts are split over this many ranks."""
    backend: str = "auto"
    """``auto`` (nccl on GPU, gloo on CPU), ``nccl`` or ``gloo``."""
    fsdp: bool = False
    """Shard the non-expert parameters, gradients and AdamW states over the data-parallel ranks (FSDP2,
    ``torch.distributed.fsdp.fully_shard`` per block and over the embedding and head); the routed experts stay
    EP-sharded and synced over their EDP group. Native engine only; no checkpoints yet."""


@dataclass
class CheckpointConfig:
    """Sharded, atomic checkpoints (``moetrain.train.checkpoint``)."""

    enabled: bool = True
    """Write checkpoints at all."""
    every: int = 100
    """Save every n optimizer steps and at the last step; 0 = only at the last step."""
    keep_last: int = 2
    """Keep the newest n complete checkpoints; 0 = keep all."""
    async_save: bool = False
    """Write in a background thread (``torch.distributed.checkpoint.async_save``) while training goes on."""
    dir: str | None = None
    """Where checkpoints go; ``None`` = ``RUN_DIR/checkpoints``."""


@dataclass
class EngineConfig:
    """Which training engine runs the step (``configs/engine/``).

    ``native``: moetrain's own loop (gradient sync, clipping, AdamW, DCP
    checkpoints). ``deepspeed``: the same model, data, routing and metrics
    through ``deepspeed.initialize`` (``moetrain.train.deepspeed.module``): ZeRO for the
    non-expert parameters, experts in DeepSpeed's expert-data-parallel groups,
    DeepSpeed's precision, accumulation, clipping and checkpoints.
    """

    name: str = "native"
    """``native`` or ``deepspeed``."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage for the non-expert parameters: 0, 1 or 2 (3 is refused by DeepSpeed for MoE layers)."""
    loss_scale: float = 0.0
    """fp16 only: a static loss scale, or 0 for dynamic loss scaling."""
    initial_scale_power: int = 16
    """fp16 dynamic loss scaling starts at 2**this."""
    loss_scale_window: int = 1000
    """fp16: steps without overflow before the dynamic scale doubles."""
    min_loss_scale: float = 1.0
    """fp16: the dynamic scale never drops below this."""
    reduce_bucket_size: int = 500_000_000
    """ZeRO: elements per gradient reduction bucket."""
    overlap_comm: bool = False
    """ZeRO: overlap the gradient reduction with the backward."""
    config_json: str | None = None
    """A DeepSpeed JSON file merged over the generated config (its keys win); see the README "Engines" section."""


@dataclass
class TrainConfig:
    """The root config of ``moetrain-train``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run_dir: str | None = None
    """Where the run writes; ``None`` = Hydra's output directory (or ``runs/<time>`` without Hydra)."""


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


def resolve_num_groups(moe: MoEConfig, ep: int) -> int:
    """The device groups of device-limited routing: ``moe.router.num_groups``, or the EP size when unset.

    Resolved once, when a model is built; the model carries it (``Transformer.num_groups``), so a trained model
    routes the same whatever EP size later loads it.
    """
    return moe.router.num_groups if moe.router.num_groups is not None else ep


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
    m, moe, r, b = cfg.model, cfg.moe, cfg.moe.router, cfg.moe.balance
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

    p = cfg.parallel
    _positive("parallel.ep", p.ep)
    _choice("parallel.backend", p.backend, BACKENDS)
    layout_error = ep_layout_error(world_size, p.ep, moe.num_experts)
    if layout_error:
        raise ConfigError(layout_error)

    from moetrain.moe.capacity import DROP_POLICIES  # registries live with the math
    from moetrain.moe.routing import STRATEGIES

    _choice("moe.router.strategy", r.strategy, tuple(STRATEGIES))
    _choice("moe.router.score_fn", r.score_fn, SCORE_FNS)
    _choice("moe.router.group_score", r.group_score, GROUP_SCORES)
    _choice("moe.router.drop_policy", r.drop_policy, DROP_POLICIES)
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

    d = cfg.data
    _positive("data.seq_len", d.seq_len)
    if not 0.0 < d.val_fraction < 1.0:
        _fail("data.val_fraction", d.val_fraction, "must be in (0, 1)")
    if d.max_val_sequences is not None:
        _positive("data.max_val_sequences", d.max_val_sequences)
    if d.source == "files" and not d.paths:
        _fail("data.paths", d.paths, "must list at least one file when data.source=files")

    o = cfg.optim
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

    t = cfg.trainer
    for key in ("max_steps", "global_batch_size", "micro_batch_size", "log_every"):
        _positive(f"trainer.{key}", getattr(t, key))
    if t.eval_every < 0:
        _fail("trainer.eval_every", t.eval_every, "must be >= 0 (0 = only at the end)")
    if t.global_batch_size % (t.micro_batch_size * world_size):
        _fail(
            "trainer.global_batch_size",
            t.global_batch_size,
            f"must be divisible by trainer.micro_batch_size={t.micro_batch_size} x world size={world_size}",
        )
    _choice("trainer.device", t.device, DEVICES)
    _choice("trainer.precision", t.precision, PRECISIONS)
    if t.peak_tflops is not None:
        _positive("trainer.peak_tflops", t.peak_tflops)
    if t.num_threads is not None:
        _positive("trainer.num_threads", t.num_threads)

    if not t.resume:
        _fail("trainer.resume", t.resume, "must be auto, none or a checkpoint path")
    known = config_keys(TrainConfig())
    for key in t.resume_allow_changes:
        if key not in known and not any(k.startswith(f"{key}.") for k in known):
            _fail("trainer.resume_allow_changes", key, "is not a config key or section (e.g. optim.lr, optim)")
    _choice("trainer.nonfinite", t.nonfinite, NONFINITE_POLICIES)
    if t.nonfinite_max_skips < 0:
        _fail("trainer.nonfinite_max_skips", t.nonfinite_max_skips, "must be >= 0")
    ck = cfg.checkpoint
    if ck.every < 0:
        _fail("checkpoint.every", ck.every, "must be >= 0 (0 = only at the last step)")
    if ck.keep_last < 0:
        _fail("checkpoint.keep_last", ck.keep_last, "must be >= 0 (0 = keep all)")
    if ck.dir is not None and not ck.dir:
        _fail("checkpoint.dir", ck.dir, "must be a path or null (RUN_DIR/checkpoints)")

    _choice("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)
    validate_engine(cfg, world_size)
    return cfg


def validate_engine(cfg: TrainConfig, world_size: int = 1) -> None:
    """The ``engine.*`` rules (and, for DeepSpeed, its generated-and-merged JSON)."""
    e = cfg.engine
    _choice("engine.name", e.name, ENGINES)
    if cfg.parallel.fsdp:
        if e.name != "native":
            _fail("parallel.fsdp", True, f"needs engine=native (engine={e.name} shards by its own ZeRO stages)")
        if cfg.checkpoint.enabled or cfg.trainer.resume != "none":
            _fail(
                "parallel.fsdp",
                True,
                "does not checkpoint or resume yet; set checkpoint.enabled=false trainer.resume=none",
            )
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


def config_keys(cfg: Any, prefix: str = "") -> set[str]:
    """Every leaf key of a config dataclass, dotted (``model.dim``, ``moe.router.strategy``)."""
    out: set[str] = set()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out |= config_keys(value, f"{prefix}{f.name}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (for saving and logging)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], cls: type = TrainConfig) -> Any:
    """Rebuild a (nested) config dataclass from :func:`to_dict` output; unknown keys fail."""
    kwargs = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{cls.__name__}.{key}: unknown key")
        sub = names[key].default_factory if names[key].default_factory is not dataclasses.MISSING else None
        if isinstance(value, dict) and sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = from_dict(value, sub)
        else:
            kwargs[key] = value
    return cls(**kwargs)
