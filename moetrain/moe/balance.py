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

import torch


def expert_balance_loss(
    counts_N: torch.Tensor, mean_scores_N: torch.Tensor, num_tokens: int | torch.Tensor, top_k: int
) -> torch.Tensor:
    """sum_i f_i P_i, the expert-level balance loss without its coefficient.

    DeepSeek-V2 (arXiv 2405.04434) eq. 12-14: f_i = N / (K T) sum_t 1(token t
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

    DeepSeek-V2 (arXiv 2405.04434) eq. 15-17: f'_d = (1/|E_d|) sum_{j in E_d} f_j,
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

    DeepSeek-V2 (arXiv 2405.04434) eq. 18-20: f''_d = D / (M T) sum_t 1(token t
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
    """CV(Importance)^2 without w_importance (Shazeer et al. 2017, arXiv 1701.06538, eq. 6-7).

    Importance(X)_i = sum_{x in X} G(x)_i, the gate values (zero for unselected
    experts) summed over the batch; CV^2 = Var / Mean^2 with the population
    variance, as in the authors' ``cv_squared`` (tensor2tensor). Minimum 0 when
    every expert has the same importance. Computed over one micro-batch (its
    definition is a batch statistic, not a sum of per-token terms).
    """
    imp_N = gates_TN.float().sum(dim=0)
    mean = imp_N.mean()
    return ((imp_N - mean).square().mean() / (mean.square() + 1e-10)).reshape(())
