"""Routing: pure functions from router logits to chosen experts and combine weights.

Shape suffixes: T tokens, N routed experts, K experts chosen per token,
G device groups, A flat (token, expert) assignments.

A routing decision for T tokens is a :class:`Routing`: ``expert_idx_TK`` and
``weight_TK`` (K slots per token) plus ``keep_TK`` (False where capacity dropped
the assignment). Strategies where a token may take a variable number of experts
(expert choice) use K = N with ``keep_TK`` marking the chosen ones, so every
later stage (capacity, dispatch, statistics) sees one representation.

The strategies are registered by name, with what each needs, in :mod:`moetrain.moe.strategies`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from moetrain.moe.capacity import DROP_POLICIES as DROP_POLICIES  # the registry config validation reads
from moetrain.moe.capacity import capacity

ROUTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``moe.router.dtype``: the router GEMM's operand dtype."""


@dataclass
class Routing:
    """Routing of T tokens to experts."""

    expert_idx_TK: torch.Tensor
    """Chosen expert of each slot (long)."""
    weight_TK: torch.Tensor
    """Combine weight g of each slot (fp32, differentiable w.r.t. the router)."""
    keep_TK: torch.Tensor
    """False for slots dropped by capacity (or unused slots of variable-K strategies)."""
    scores_TN: torch.Tensor
    """Affinities s_{i,t} (softmax or sigmoid of the logits, without any bias), fp32."""
    logits_TN: torch.Tensor
    """Raw router logits x W_r, fp32 (for the z-loss)."""
    selected_TK: torch.Tensor | None = None
    """Slots chosen before capacity dropping (for f_i counts); ``None`` = all K slots."""
    noise_TN: torch.Tensor | None = None
    """Noisy top-K in training: the drawn noise StandardNormal() * Softplus(x W_noise) (set by the Router)."""
    noise_scale_TN: torch.Tensor | None = None
    """Noisy top-K in training: the noise's standard deviation Softplus(x W_noise) * ``noise_std``."""


def affinities(logits_TN: torch.Tensor, score_fn: str) -> torch.Tensor:
    """s = softmax(x W_r) (GShard; DeepSeek-V2 eq. 22) or sigmoid(x W_r) (DeepSeek-V3 eq. 15)."""
    if score_fn == "softmax":
        return logits_TN.softmax(dim=-1)
    if score_fn == "sigmoid":
        return logits_TN.sigmoid()
    raise ValueError(f"unknown score_fn {score_fn!r}")


def group_limited_mask(
    sel_TN: torch.Tensor, num_groups: int, topk_groups: int, group_score: str, top_k: int
) -> torch.Tensor:
    """Experts a token may use under device-limited routing, as a bool mask [T, N].

    DeepSeek-V2 (arXiv 2405.04434, sec. 2.2.2): each token first selects the M
    devices whose best expert affinity is highest (``group_score="max"``), then
    top-K among the experts on those devices. DeepSeek-V3 (arXiv 2412.19437, sec.
    2.1.2, node-limited) scores a group by the sum of its top K/M affinities
    (``group_score="topk_sum"``, computed on s + b).
    """
    T, N = sel_TN.shape
    grouped_TGE = sel_TN.view(T, num_groups, N // num_groups)
    if group_score == "max":
        group_TG = grouped_TGE.amax(dim=-1)
    elif group_score == "topk_sum":
        per_group = max(1, top_k // topk_groups)
        group_TG = grouped_TGE.topk(per_group, dim=-1).values.sum(dim=-1)
    else:
        raise ValueError(f"unknown group_score {group_score!r}")
    top_groups_TM = group_TG.topk(topk_groups, dim=-1).indices
    allowed_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, top_groups_TM, True)
    return allowed_TG.repeat_interleave(N // num_groups, dim=1)


def topk_experts(
    sel_TN: torch.Tensor,
    top_k: int,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str = "max",
) -> torch.Tensor:
    """Indices [T, K] of the K highest selection scores, optionally group-limited.

    ``sel_TN`` is what selection ranks: s (GShard, DeepSeek-V2) or s + b
    (loss-free balancing; DeepSeek-V3 eq. 16). Ties break towards the lower index.
    """
    if topk_groups is not None and num_groups is not None and topk_groups < num_groups:
        allowed = group_limited_mask(sel_TN, num_groups, topk_groups, group_score, top_k)
        sel_TN = sel_TN.masked_fill(~allowed, float("-inf"))
    return sel_TN.topk(top_k, dim=-1, sorted=True).indices


def gate_weights(scores_TN: torch.Tensor, idx_TK: torch.Tensor, normalize: bool, scaling_factor: float) -> torch.Tensor:
    """g_{i,t} = s_{i,t} for the chosen experts (DeepSeek-V2 eq. 21), optionally
    renormalised over the K chosen (Mixtral's softmax over the top-K logits is the
    same thing; DeepSeek-V3 eq. 13 for sigmoid), times the routed scaling factor."""
    w_TK = scores_TN.gather(1, idx_TK)
    if normalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return w_TK * scaling_factor


def protected_sequences(token_ids_BS: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which of B sequences are never dropped by device-level dropping: about ``fraction`` of them [B].

    DeepSeek-V2 (arXiv 2405.04434, sec. 2.2.4): "we ensure that the tokens belonging
    to approximately 10% of the training sequences will never be dropped". The choice
    is a hash of each sequence's token ids and positions, so it depends on the
    sequence alone: the same under any expert- or data-parallel layout and
    micro-batching, and different from step to step as the data changes.
    """
    if fraction <= 0:
        return torch.zeros(token_ids_BS.shape[0], dtype=torch.bool, device=token_ids_BS.device)
    ids = token_ids_BS.long() & _MASK32
    pos = torch.arange(token_ids_BS.shape[1], device=ids.device).unsqueeze(0)
    key_B = _mix32(_mix32(_mix32(ids) ^ _mix32(pos)).sum(dim=1) & _MASK32)
    return key_B < int(fraction * 2**32)


@dataclass(frozen=True)
class RouteSpec:
    """A router's resolved settings (from ``RouterConfig`` and the MoE/parallel sizes)."""

    num_experts: int
    top_k: int
    score_fn: str = "softmax"
    normalize: bool = False
    scaling_factor: float = 1.0
    num_groups: int | None = None
    topk_groups: int | None = None
    group_score: str = "max"
    capacity_factor: float | None = None
    """Expert choice: the capacity factor c (``None`` = ``top_k``, the same compute as top-K)."""
    hash_seed: int = 0
    """Hash routing: seed of the fixed token-id -> expert map."""


def select_topk(scores_TN: torch.Tensor, spec: RouteSpec, bias_N: torch.Tensor | None) -> torch.Tensor:
    """TopK of s + b (b: the loss-free bias, selection only; detached so no gradient flows
    through the choice), group-limited when ``spec.topk_groups`` is set."""
    sel_TN = scores_TN.detach()
    if bias_N is not None:
        sel_TN = sel_TN + bias_N.detach().to(sel_TN.dtype)
    return topk_experts(sel_TN, spec.top_k, spec.num_groups, spec.topk_groups, spec.group_score)


def route_topk(logits_TN: torch.Tensor, spec: RouteSpec, *, bias_N: torch.Tensor | None = None) -> Routing:
    """Token-choice top-K routing (``strategy=topk``).

    s = score_fn(logits); choose TopK(s + b) (b = loss-free bias, Wang et al. 2024,
    eq. 3; DeepSeek-V3 eq. 16), restricted to the top-M groups when
    ``spec.topk_groups`` is set (DeepSeek-V2 device-limited routing; DeepSeek-V3
    node-limited with ``group_score=topk_sum``); g = s of the chosen experts
    (GShard; DeepSeek-V2 eq. 21), optionally renormalised over the K chosen, times
    the routed scaling factor. Weights come from s only, so the bias never enters
    the weights or the gradient. Sigmoid scores are always renormalised over the
    chosen experts (DeepSeek-V3 eq. 13). Switch Transformer routing (Fedus et al.
    2021) is this rule with K = 1 plus a capacity factor (``moe=switch``).
    """
    scores_TN = affinities(logits_TN, spec.score_fn)
    idx_TK = select_topk(scores_TN, spec, bias_N)
    normalize = spec.normalize or spec.score_fn == "sigmoid"
    w_TK = gate_weights(scores_TN, idx_TK, normalize, spec.scaling_factor)
    keep_TK = torch.ones_like(idx_TK, dtype=torch.bool)
    return Routing(idx_TK, w_TK, keep_TK, scores_TN, logits_TN)


def route_topk_softmax(logits_TN: torch.Tensor, spec: RouteSpec, *, bias_N: torch.Tensor | None = None) -> Routing:
    """Mixtral routing (Jiang et al. 2024, arXiv 2401.04088, sec. 2.1, ``strategy=topk_softmax``):
    G(x) = Softmax(TopK(x W_g)), the softmax taken over the K chosen logits only.

    Mathematically identical to softmax-then-top-K with renormalisation
    (``route_topk`` with ``normalize=True``), since exp(l_i)/sum_{j in K} exp(l_j)
    = s_i / sum_{j in K} s_j; implemented literally so a test can check the
    identity. ``scores_TN`` (for P_i and the entropy) is the full softmax; the
    group limit, the loss-free bias and the scaling factor apply as in top-K.
    """
    scores_TN = logits_TN.softmax(dim=-1)
    idx_TK = select_topk(scores_TN, spec, bias_N)
    w_TK = logits_TN.gather(1, idx_TK).softmax(dim=-1) * spec.scaling_factor
    keep_TK = torch.ones_like(idx_TK, dtype=torch.bool)
    return Routing(idx_TK, w_TK, keep_TK, scores_TN, logits_TN)


def route_noisy_topk(
    logits_TN: torch.Tensor,
    spec: RouteSpec,
    *,
    bias_N: torch.Tensor | None = None,
    noise_TN: torch.Tensor | None = None,
) -> Routing:
    """Noisy top-K gating (Shazeer et al. 2017, arXiv 1701.06538, eq. 3-5, ``strategy=noisy_topk``).

    H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i)   (eq. 4)
    G(x) = Softmax(KeepTopK(H(x), k))                                  (eq. 3, 5)

    ``noise_TN`` is the already drawn noise term StandardNormal() *
    Softplus(x W_noise) (the :class:`~moetrain.moe.router.Router` draws it in
    training only; ``None`` = no noise, as at evaluation). ``scores_TN`` is
    Softmax(H) over all experts (for P_i and the entropy); ``logits_TN`` stays the
    clean x W_g (for the z-loss).
    """
    h_TN = logits_TN if noise_TN is None else logits_TN + noise_TN
    scores_TN = h_TN.softmax(dim=-1)
    idx_TK = select_topk(scores_TN, spec, bias_N)
    w_TK = h_TN.gather(1, idx_TK).softmax(dim=-1) * spec.scaling_factor
    keep_TK = torch.ones_like(idx_TK, dtype=torch.bool)
    return Routing(idx_TK, w_TK, keep_TK, scores_TN, logits_TN)


def expert_choice_capacity(num_tokens: int, num_experts: int, factor: float) -> int:
    """Tokens each expert takes under expert choice: k = ceil(T * c / N) (Zhou et al. 2022's k = n c / e), at most T."""
    return min(num_tokens, capacity(num_tokens, num_experts, 1, factor))


def route_expert_choice(logits_TN: torch.Tensor, spec: RouteSpec, *, bias_N: torch.Tensor | None = None) -> Routing:
    """Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368, ``strategy=expert_choice``).

    S = Softmax(X W_g) over experts; each expert i takes the k = ceil(T c / N)
    tokens with the highest S[:, i] (G, I = TopK(S^T, k)); the combine weight is
    S[t, i] (times the routed scaling factor). A token gets between 0 and N
    experts; one with none keeps only its residual (and shared experts).
    Returned with K = N slots (slot i = expert i) and ``keep_TK`` marking the
    chosen (token, expert) pairs, so capacity is exact by construction.

    Not causal at generation time: an expert's choice of token t depends on the
    scores of every other token of the batch, later positions of t's own
    sequence included, so autoregressive decoding cannot reproduce the routing
    seen in training (Zhou et al. 2022, their section on limitations). Use it for
    training comparisons, not for models meant to generate token by token.
    """
    T, N = logits_TN.shape
    scores_TN = logits_TN.softmax(dim=-1)
    c = spec.capacity_factor if spec.capacity_factor is not None else float(spec.top_k)
    k = expert_choice_capacity(T, N, c)
    sel_TN = scores_TN.detach()
    if bias_N is not None:
        sel_TN = sel_TN + bias_N.detach().to(sel_TN.dtype)
    keep_TN = torch.zeros(T, N, dtype=torch.bool, device=logits_TN.device)
    if k > 0:
        top_tokens_NK = sel_TN.t().topk(k, dim=-1).indices
        keep_TN.t().scatter_(1, top_tokens_NK, True)  # t() is a view: writes land in keep_TN
    idx_TN = torch.arange(N, device=logits_TN.device).expand(T, N).contiguous()
    w_TN = scores_TN * spec.scaling_factor
    return Routing(idx_TN, w_TN, keep_TN, scores_TN, logits_TN)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, constant 0x45d9f3b) on int64 holding values < 2^32.

    Every product stays below 2^59, so nothing overflows int64.
    """
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


@functools.lru_cache(maxsize=64)
def _hash_salts(seed: int) -> tuple[int, int]:
    """The two 31-bit salts of :func:`hash_experts`, drawn once per seed (a host read, cached)."""
    g = torch.Generator().manual_seed(seed)
    s1, s2 = torch.randint(0, 2**31, (2,), generator=g).tolist()
    return int(s1), int(s2)


def hash_experts(token_ids_T: torch.Tensor, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """Fixed random map token id -> K distinct experts [T, K] (Roller et al. 2021, arXiv 2106.04426, "Random Hash").

    Every (token id, expert i) pair gets a pseudo-random 32-bit key
    mix(mix(id xor s1) xor mix(i + s2)) with an integer hash ``mix`` and
    (s1, s2) drawn from ``seed``; a token id's experts are the K with the
    smallest keys. With K = 1 this is a fixed random hash of the token id onto
    the experts (the paper's "Random Hash"); it depends only on the id, never on
    the hidden state or the batch.
    """
    s1, s2 = _hash_salts(seed)
    ids_T1 = (token_ids_T.long().reshape(-1, 1) & _MASK32) ^ s1
    experts_1N = torch.arange(num_experts, device=token_ids_T.device, dtype=torch.long).unsqueeze(0) + s2
    key_TN = _mix32(_mix32(ids_T1) ^ _mix32(experts_1N & _MASK32))
    return key_TN.topk(top_k, dim=-1, largest=False, sorted=True).indices


def balanced_hash_table(token_counts_V: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """Roller et al. 2021's balanced assignment: a [V, K] token id -> experts table from corpus frequencies.

    "Balanced assignment" (arXiv 2106.04426, the hashing functions of Hash Layers): token ids are taken from the most to
    the least frequent and each goes to the expert with the least total frequency so far
    (for K > 1, to the K least-loaded experts, distinct; ties to the lower index), so every
    expert receives about the same number of the training corpus's tokens. Deterministic
    (frequency ties broken by the lower id). Ids absent from the corpus (count 0) still get
    experts, by the same rule.
    """
    counts = [int(c) for c in token_counts_V.tolist()]
    order = sorted(range(len(counts)), key=lambda v: (-counts[v], v))
    load = [0] * num_experts
    table = torch.empty(len(counts), top_k, dtype=torch.long)
    for v in order:
        chosen = sorted(range(num_experts), key=lambda e: (load[e], e))[:top_k]
        for e in chosen:
            load[e] += counts[v]
        table[v] = torch.tensor(chosen)
    return table


def route_hash(
    logits_TN: torch.Tensor,
    spec: RouteSpec,
    *,
    token_ids_T: torch.Tensor | None = None,
    hash_table_VK: torch.Tensor | None = None,
) -> Routing:
    """Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models", ``strategy=hash``).

    Experts come from :func:`hash_experts` of the input token ids (the paper's random
    hash), or from ``hash_table_VK`` (:func:`balanced_hash_table`, the paper's balanced
    assignment, looked up by token id); the loss-free
    bias and the router play no part in the choice. Weight: 1/K per chosen
    expert (1 for the paper's K = 1), times the routed scaling factor: the paper's
    hash layer outputs the hashed expert's FFN output directly (no gate), and a
    softmax score would only add a learned scale the router cannot use to route.
    ``scores_TN`` is still softmax(x W_r), for statistics only (no gradient flows
    from the routing to the router).
    """
    if token_ids_T is None:
        raise ValueError("hash routing needs the input token ids")
    T = logits_TN.shape[0]
    if token_ids_T.numel() != T:
        raise ValueError(f"hash routing got {token_ids_T.numel()} token ids for {T} tokens")
    if hash_table_VK is not None:
        idx_TK = hash_table_VK.index_select(0, token_ids_T.long())
    else:
        idx_TK = hash_experts(token_ids_T, spec.num_experts, spec.top_k, spec.hash_seed)
    w_TK = torch.full(idx_TK.shape, spec.scaling_factor / spec.top_k, device=logits_TN.device)
    keep_TK = torch.ones_like(idx_TK, dtype=torch.bool)
    return Routing(idx_TK, w_TK, keep_TK, logits_TN.softmax(dim=-1), logits_TN)
