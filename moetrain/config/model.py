"""The model's and the MoE layers' keys (``model.*``, ``moe.*``), and the one derivation of the routing groups."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RopeScalingConfig:
    """YaRN context extension of RoPE (Peng et al. 2023, arXiv 2309.00071) as DeepSeek-V3 configures it
    (``rope_scaling`` of its ``config.json``, transformers' ``rope_parameters``); ``model.attention=mla`` only."""

    type: str = "none"
    """``none`` (plain RoPE) or ``yarn``."""
    factor: float = 1.0
    """s, the context extension factor (DeepSeek-V3: 40)."""
    original_max_seq_len: int = 4096
    """The pretraining context the frequencies were tuned for."""
    beta_fast: float = 32.0
    """YaRN's alpha/beta boundaries of the interpolation ramp (rotations): the fast end."""
    beta_slow: float = 1.0
    """The slow end of the ramp."""
    mscale: float = 1.0
    """YaRN's attention temperature coefficient of the RoPE tables."""
    mscale_all_dim: float = 0.0
    """MLA's softmax scale is multiplied by (0.1 mscale_all_dim ln s + 1)^2 (DeepSeek-V3's mscale); 0 = off."""


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
    qk_norm_scope: str = "head"
    """With ``qk_norm``: ``head`` (each head's Dh, Qwen3) or ``all`` (the whole q and k projections at once,
    OLMoE / OLMo-2)."""
    attention_bias: bool = False
    """Biases on the q, k and v projections (Qwen2, Qwen1.5-MoE); initialised at 0."""
    init_std: float = 0.02
    """Std of the normal init; output projections are scaled by 1/sqrt(2 * n_layers) (GPT-2)."""
    attention: str = "gqa"
    """``gqa`` (grouped-query attention, ``n_kv_heads``) or ``mla`` (DeepSeek-V2's Multi-head Latent Attention,
    arXiv 2405.04434 sec. 2.1: keys and values from a cached ``kv_lora_rank`` latent, plus a RoPE key shared
    across heads; docs/deepseek.md)."""
    kv_lora_rank: int = 64
    """MLA: d_c, the width of the compressed key-value latent c_KV (sec. 2.1.2), the numbers cached per token."""
    q_lora_rank: int | None = None
    """MLA: d_c', the width of the compressed query latent c_Q (sec. 2.1.2); ``None`` = full-rank queries."""
    qk_rope_head_dim: int = 16
    """MLA: d_h^R, the width of the decoupled RoPE query per head and of the one RoPE key shared by all heads."""
    qk_nope_head_dim: int = 32
    """MLA: d_h, each head's query/key width without position (from the latents)."""
    v_head_dim: int = 32
    """MLA: each head's value width."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """Context extension of RoPE (YaRN)."""
    mtp_depth: int = 0
    """D, the multi-token prediction modules after the main model (DeepSeek-V3 sec. 2.2: 1); 0 = off."""
    mtp_lambda: float = 0.3
    """lambda, the weight of the mean MTP loss (DeepSeek-V3: 0.3, then 0.1 for the last 4.8T tokens)."""


@dataclass
class RouterConfig:
    """How tokens choose experts (scores, selection, weights)."""

    score_fn: str = "softmax"
    """``softmax`` (GShard, DeepSeek-V2) or ``sigmoid`` (DeepSeek-V3) affinities."""
    strategy: str = "topk"
    """Selection rule, a key of ``moetrain.moe.strategies.STRATEGIES``."""
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
    dtype: str = "fp32"
    """Operands of the router GEMM (x W_g, and x W_noise): ``fp32`` (exact fp32 logits, the routing of the fp32
    model; Megatron-Core's ``moe_router_dtype=fp32``) or ``bf16`` (bf16 operands and logits, upcast to fp32 for
    the scores, top-K and balance losses: cheaper, but near-tied experts may be chosen differently)."""


@dataclass
class BalanceConfig:
    """Auxiliary balance losses; each is off at coefficient 0."""

    expert_coef: float = 0.01
    """alpha_1 of the expert-level loss L_ExpBal = a1 * sum_i f_i P_i (DeepSeek-V2 eq. 23-25; Switch eq. 4-6)."""
    device_coef: float = 0.0
    """alpha_2 of the device-level loss L_DevBal (DeepSeek-V2 eq. 26-28)."""
    comm_coef: float = 0.0
    """alpha_3 of the communication balance loss L_CommBal (DeepSeek-V2 eq. 29-31)."""
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


def resolve_num_groups(moe: MoEConfig, ep: int) -> int:
    """The device groups of device-limited routing: ``moe.router.num_groups``, or the EP size when unset.

    Resolved once, when a model is built; the model carries it (``Transformer.num_groups``), so a trained model
    routes the same whatever EP size later loads it.
    """
    return moe.router.num_groups if moe.router.num_groups is not None else ep
