"""The run's keys: data, optimizer, trainer, logging, parallel layout, checkpoints, engine, and the root
:class:`TrainConfig`; conversion to and from plain dicts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moetrain.config.errors import ConfigError
from moetrain.config.model import ModelConfig, MoEConfig


@dataclass
class SourceConfig:
    """One source of a mixture (``data.sources``): a corpus like ``data.source`` and its sampling weight."""

    name: str = ""
    """Name in metrics (``data/source/<name>``); unique within the mixture."""
    source: str = "stdlib"
    """``stdlib``, ``files`` (``paths``) or a hub dataset name, as ``data.source``."""
    paths: list[str] = field(default_factory=list)
    """Files or globs when ``source=files``."""
    hub_config: str | None = None
    """Hub dataset configuration name."""
    text_field: str = "text"
    """Column holding the text."""
    weight: float = 1.0
    """Sampling weight (normalised over the mixture): the share of training sequences drawn from this source."""


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
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture (each entry a :class:`SourceConfig`); empty = the single corpus of ``source``."""
    doc_mask: bool = False
    """Mask attention across document boundaries (the token after each EOS starts a document) inside a
    packed sequence, and restart RoPE positions per document."""
    shard_tokens: int = 2**26
    """Tokens per token-file shard (also the bound on tokenisation memory, about 2-4 bytes per token)."""
    num_proc: int = 0
    """Tokenisation worker processes; 0 = one per CPU core for corpora over 64 MB of text, else in-process."""
    streaming: bool = False
    """Hub datasets only: read the dataset as a stream (``load_dataset(..., streaming=True)``) while tokenising,
    instead of downloading and converting it whole first."""

    def __post_init__(self) -> None:
        self.sources = [SourceConfig(**s) if isinstance(s, dict) else s for s in self.sources]


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 2e-3
    """Peak learning rate, in (0, 10]: AdamW moves every weight by about lr per step whatever the gradient, so a
    larger rate replaces weights of order ``model.init_std`` with noise at once (``moetrain.config.limits``)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    warmup_steps: int = 20
    """Linear warmup steps; more than ``trainer.max_steps`` is allowed (short test runs): the rate then climbs
    for the whole run and never decays."""
    weight_decay: float = 0.1
    """Decoupled weight decay (never on norms, biases and embeddings); ``lr x weight_decay`` at most 1 (each step
    multiplies the decayed weights by 1 - lr x weight_decay)."""
    beta1: float = 0.9
    """AdamW beta1 (first-moment decay)."""
    beta2: float = 0.95
    """AdamW beta2 (second-moment decay)."""
    eps: float = 1e-8
    """AdamW epsilon, in (0, 1] (a larger one outweighs sqrt(v) and AdamW becomes SGD with rate lr / eps)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class TrainerConfig:
    """The training loop."""

    max_steps: int = 300
    """Optimizer steps."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all ranks and micro-batches."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward on one rank; accumulation = global / (micro * world / parallel.pp).
    ``None`` = this rank's whole share of the global batch (global / world size), so one config runs on any
    number of ranks; under ``parallel.pp > 1`` the largest micro-batch giving the pipeline a multiple of pp
    micro-batches, at least 4 per stage (docs/pipeline.md)."""
    log_every: int = 10
    """Log train metrics every n steps (and at the last step)."""
    eval_every: int = 100
    """Evaluate on the validation split every n steps (and at the end); 0 = only at the end."""
    eval_at_start: bool = True
    """Also evaluate before the first step (the starting validation loss, logged at step 0)."""
    seed: int = 0
    """Seed of the model init and of every random draw in training, in [0, 2**63) (torch's 64-bit seeds)."""
    deterministic: bool = False
    """Use deterministic algorithms (bitwise-repeatable runs on the same topology)."""
    device: str = "auto"
    """``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``."""
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16`` (autocast: fp32 weights and residual stream,
    bf16 GEMMs; the MoE router stays fp32 while dispatch and experts run in bf16; DeepSpeed: bf16 weights,
    fp32 master copy) or ``fp16`` (``engine=deepspeed`` only: fp16 weights with loss scaling)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one rank's device for MFU (the job's peak is world size x this); ``None`` = a table for
    known GPUs, else a measured GEMM rate."""
    progress: bool = True
    """Show a console progress bar."""
    num_threads: int | None = None
    """CPU threads for torch; ``None`` = the CPUs this process may use (its affinity mask) split over the
    ranks on this node (1 per rank under ``torchrun`` on a small machine); at most the CPUs it may use."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward (less memory, about one more forward)."""
    compile: bool = False
    """``torch.compile`` region by region (inductor): dense blocks whole; in MoE blocks the norms, attention,
    router and shared experts (dispatch, experts and combine stay eager)."""
    resume: str = "auto"
    """``auto`` (continue from the newest complete checkpoint in ``checkpoint.dir``, if any), ``latest`` (continue
    the newest unfinished run under ``runs/``, of ``run_name`` if set), ``none``, or a path."""
    resume_allow_changes: list[str] = field(default_factory=list)
    """Config keys (``optim.lr``) or whole sections (``optim``) a resume may change; any other change of a
    key that shapes the run (model, routing, data, batch, optimizer, seed) is refused. See docs/checkpoints.md."""
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
    ``torch.distributed.fsdp.fully_shard`` per block and over the embedding and head); the routed experts, split
    over EP, are sharded over their EDP ranks. ``false``: the same units replicated (FSDP2's ``replicate``: the
    gradients all-reduced, overlapped with the backward). Native engine only. Its checkpoints are a run's without
    FSDP: they resume with or without it, on any world and EP size, and export alike."""
    fsdp_keep_gathered: bool = True
    """With ``parallel.fsdp`` and gradient accumulation: keep the gathered weights and the unsharded gradients
    between a step's micro-batches (one all-gather per unit and one reduce-scatter per step, while the
    non-expert part is held whole for the step, as under ZeRO-2); ``false`` reshards after every micro-batch's
    forward and backward (the least memory, an all-gather pair and a reduce-scatter per micro-batch). Without
    FSDP the gradients are reduced once per step, in the last micro-batch's backward, always."""
    overlap_shared_experts: bool = True
    """Under expert parallelism, run the shared experts while the dispatch and combine all-to-alls are in
    flight, forward and backward (Megatron-Core's ``moe_shared_expert_overlap``); bitwise the results of
    ``false``, which runs them after the combine (``moetrain.parallel.all_to_all``)."""
    pp: int = 1
    """Pipeline-parallel size: the blocks split into this many stages (docs/pipeline.md); EP and data
    parallelism run inside each stage's ``world / pp`` ranks, the trainer's micro-batches are the pipeline's
    (``moetrain.train.pipeline``); native engine only, without ``trainer.compile``."""
    pp_layers: str | None = None
    """Blocks per stage, e.g. ``"embedding+3,4,4,3+head"`` (one count per stage, ``pp x stages per rank`` of
    them); ``null``: as even as possible, the stages nearest the middle taking the remainder."""
    pp_schedule: str = "1f1b"
    """``gpipe``, ``1f1b``, ``interleaved_1f1b``, ``interleaved_zero_bubble`` or ``zbv`` (torch's
    ``torch.distributed.pipelining`` schedules; the bubble of each in docs/pipeline.md)."""
    pp_virtual: int = 2
    """Stages per rank of ``interleaved_1f1b`` and ``interleaved_zero_bubble`` (``zbv`` always has 2)."""


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
    """A DeepSpeed JSON file merged over the generated config (its keys win); see the docs/engines.md."""


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
    """Where the run writes; ``None`` = ``runs/<run_name>`` with a name, else Hydra's output directory
    (``runs/<time>``)."""
    run_name: str | None = None
    """A name for a single run: it writes to ``runs/<run_name>``, so the same command run again continues it
    (``trainer.resume=auto``); ``trainer.resume=latest`` continues the newest unfinished run of that name."""


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


RETIRED_KEYS = {("ParallelConfig", "bucket_mb")}
"""Keys an older moetrain wrote into checkpoints that no longer act (``parallel.bucket_mb``: the hand-written
gradient buckets gave way to FSDP2's units); :func:`from_dict` drops them."""


def from_dict(data: dict[str, Any], cls: type = TrainConfig) -> Any:
    """Rebuild a (nested) config dataclass from :func:`to_dict` output; unknown keys fail, retired ones
    (:data:`RETIRED_KEYS`) are dropped."""
    kwargs = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if (cls.__name__, key) in RETIRED_KEYS:
            continue
        if key not in names:
            raise ConfigError(f"{cls.__name__}.{key}: unknown key")
        sub = names[key].default_factory if names[key].default_factory is not dataclasses.MISSING else None
        if isinstance(value, dict) and sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = from_dict(value, sub)
        else:
            kwargs[key] = value
    return cls(**kwargs)
