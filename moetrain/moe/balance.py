"""Auxiliary load-balancing losses as pure functions (coefficients applied by the caller).

Shape suffixes: T tokens, N routed experts, K experts chosen per token, G device
groups (D in the DeepSeek-V2 paper), B sequences.

The f-type factors (selection counts, tokens sent per device, token counts) are
arguments rather than computed from a routing here, so the caller can pass
counts summed over micro-batches and data-parallel ranks: the global-batch
variant of every f*P loss (Qiu et al. 2025, arXiv 2501.11873) is the same
function fed global counts, with P still from the local micro-batch.
"""

from __future__ import annotations

import math

import torch


def expert_balance_loss(
    counts_N: torch.Tensor, mean_scores_N: torch.Tensor, num_tokens: int | torch.Tensor, top_k: int
) -> torch.Tensor:
    """sum_i f_i P_i, the expert-level balance loss without its coefficient.

    DeepSeek-V2 (arXiv 2405.04434) eq. 23-25: f_i = N / (K T) sum_t 1(token t
    selects expert i), P_i = (1/T) sum_t s_{i,t}. With K = 1, alpha times this is
    the Switch Transformer loss alpha * N * sum_i frac_i P_i (Fedus et al. 2021,
    eq. 4-6): f_i here already carries the factor N. Its minimum, at uniform
    routing, is 1 (so the weighted loss equals its coefficient).

    ``counts_N`` are selection counts (not differentiable); ``mean_scores_N`` is
    P (differentiable). Pass counts summed over a larger batch to get the
    global-batch variant (Qiu et al. 2025).
    """
    n = counts_N.numel()
    f_N = counts_N.detach().float() * n / (top_k * num_tokens)
    return (f_N * mean_scores_N).sum()


def device_balance_loss(
    counts_N: torch.Tensor, mean_scores_N: torch.Tensor, num_tokens: int | torch.Tensor, top_k: int, num_groups: int
) -> torch.Tensor:
    """sum_d f'_d P'_d, the device-level balance loss L_DevBal without alpha_2.

    DeepSeek-V2 (arXiv 2405.04434) eq. 26-28: f'_d = (1/|E_d|) sum_{j in E_d} f_j,
    P'_d = sum_{j in E_d} P_j, with f_j, P_j of :func:`expert_balance_loss` and
    E_d the ``N / D`` consecutive experts of device group d. Minimum 1 at
    uniform routing (f'_d = 1, P'_d = 1/D).
    """
    n = counts_N.numel()
    f_N = counts_N.detach().float() * n / (top_k * num_tokens)
    f_G = f_N.view(num_groups, -1).mean(dim=-1)
    p_G = mean_scores_N.view(num_groups, -1).sum(dim=-1)
    return (f_G * p_G).sum()


def comm_balance_loss(
    sent_G: torch.Tensor, mean_scores_N: torch.Tensor, num_tokens: int | torch.Tensor, topk_groups: int
) -> torch.Tensor:
    """sum_d f''_d P''_d, the communication balance loss L_CommBal without alpha_3.

    DeepSeek-V2 (arXiv 2405.04434) eq. 29-31: f''_d = D / (M T) sum_t 1(token t
    is sent to device d), P''_d = sum_{j in E_d} P_j. ``sent_G[d]`` counts the
    tokens with at least one selected expert on device d; M is the device limit
    (``topk_groups``; callers without a limit pass min(K, D)). Minimum 1 when
    every token reaches exactly M devices, spread evenly, at uniform scores.
    """
    d = sent_G.numel()
    f_G = sent_G.detach().float() * d / (topk_groups * num_tokens)
    p_G = mean_scores_N.view(d, -1).sum(dim=-1)
    return (f_G * p_G).sum()


def sequence_balance_loss(counts_BN: torch.Tensor, norm_scores_BSN: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss without alpha (arXiv 2412.19437, eq. 17-20).

    For each sequence of S tokens: f_i = N / (K S) sum_t 1(s_{i,t} in TopK),
    s'_{i,t} = s_{i,t} / sum_j s_{j,t}, P_i = (1/S) sum_t s'_{i,t}, L = sum_i f_i P_i;
    the result is the mean of L over the B sequences. ``counts_BN`` are each
    sequence's selection counts; ``norm_scores_BSN`` the normalised s'. Defined
    per sequence, it needs no global statistics. Minimum 1 at uniform routing.
    """
    _, S, N = norm_scores_BSN.shape
    f_BN = counts_BN.detach().float() * N / (top_k * S)
    return (f_BN * norm_scores_BSN.mean(dim=1)).sum(dim=-1).mean()


def router_z_loss(logits_TN: torch.Tensor) -> torch.Tensor:
    """(1/T) sum_t (logsumexp_j x_{t,j})^2 (ST-MoE, Zoph et al. 2022, eq. 5)."""
    return torch.logsumexp(logits_TN.float(), dim=-1).square().mean()


def importance_loss(gates_TN: torch.Tensor) -> torch.Tensor:
    """CV(Importance)^2 without w_importance (Shazeer et al. 2017, arXiv 1701.06538, eq. 6-7; :func:`cv_squared`).

    Importance(X)_i = sum_{x in X} G(x)_i, the gate values (zero for unselected
    experts) summed over the batch; CV^2 = Var / Mean^2 with the population
    variance, as in the authors' ``cv_squared`` (tensor2tensor). Minimum 0 when
    every expert has the same importance. Computed over one micro-batch (its
    definition is a batch statistic, not a sum of per-token terms).
    """
    return cv_squared(gates_TN.float().sum(dim=0))


def pooled_expert_balance_loss(
    counts_LN: torch.Tensor, mean_scores_LN: torch.Tensor, tokens_per_layer: int | torch.Tensor, top_k: int
) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (the Mixtral / Qwen-MoE auxiliary loss) without its coefficient.

    All L layers' tokens are pooled first: with c_i the selections of expert i summed
    over the layers and P_i the router probability averaged over all L T rows,
    ``N sum_i (c_i / (L T)) P_i`` — transformers' "Switch Transformer eq. 4-6" with K
    choices counted per token. That is K times :func:`expert_balance_loss` of the
    pooled counts over L T tokens (its minimum at uniform routing is K, not 1), and
    not the sum of the per-layer losses: the cross terms between layers stay.
    ``counts_LN`` are per-layer selection counts (not differentiable); ``mean_scores_LN``
    each layer's P (differentiable); every layer sees ``tokens_per_layer`` tokens.
    """
    num_layers = counts_LN.shape[0]
    pooled_p_N = mean_scores_LN.mean(dim=0)
    return top_k * expert_balance_loss(counts_LN.sum(dim=0), pooled_p_N, num_layers * tokens_per_layer, top_k)


def cv_squared(v_N: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation Var / Mean^2 (population variance, + 1e-10 in the denominator), as in
    the authors' ``cv_squared`` (tensor2tensor); 0 for a constant vector."""
    v = v_N.float()
    mean = v.mean()
    return ((v - mean).square().mean() / (mean.square() + 1e-10)).reshape(())


def prob_in_top_k(
    clean_TN: torch.Tensor, noisy_TN: torch.Tensor, noise_scale_TN: torch.Tensor, top_k: int
) -> torch.Tensor:
    """P(x, i): the probability that expert i is among the top K under a new draw of its noise alone.

    Shazeer et al. 2017 (arXiv 1701.06538), appendix A, eq. 8-9:
    P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i)), where
    kth_excluding(H, k, i) is the k-th highest of H's components other than i: the (k+1)-th
    highest of H when H_i is in its top k, the k-th otherwise. ``noise_scale_TN`` is the noise's
    standard deviation (Softplus(x W_noise), times ``router.noise_std``). As the authors'
    ``_prob_in_top_k`` (tensor2tensor), H_i counts as in the top k when it exceeds the (k+1)-th
    value, and the thresholds are not detached. Needs K < N.
    """
    top_TM = noisy_TN.topk(top_k + 1, dim=-1).values
    kth_TN = top_TM[:, top_k - 1 : top_k]  # the k-th highest
    next_TN = top_TM[:, top_k : top_k + 1]  # the (k+1)-th highest
    threshold_TN = torch.where(noisy_TN > next_TN, next_TN, kth_TN)
    z_TN = (clean_TN - threshold_TN) / noise_scale_TN
    return 0.5 * (1.0 + torch.erf(z_TN / math.sqrt(2.0)))


def smooth_load_loss(
    clean_TN: torch.Tensor, noisy_TN: torch.Tensor, noise_scale_TN: torch.Tensor, top_k: int
) -> torch.Tensor:
    """CV(Load(X))^2 without w_load, Load(X)_i = sum_x P(x, i) (Shazeer et al. 2017, appendix A, eq. 10-11).

    A smooth estimator of the number of tokens each expert receives (:func:`prob_in_top_k`),
    differentiable w.r.t. W_g and W_noise; 0 when every expert has the same expected load.
    Computed over one micro-batch, like the importance loss.
    """
    return cv_squared(prob_in_top_k(clean_TN.float(), noisy_TN.float(), noise_scale_TN.float(), top_k).sum(dim=0))
