"""Balance-loss gradients w.r.t. the router weight against an independent re-derivation.

The value tests in ``test_balance.py`` cannot see a detached factor: ``p_N =
scores.detach().mean(0)`` leaves every value unchanged and only kills the
gradient (the bug Megatron-LM and torchtitan shipped in their aux losses). Here
each loss is rebuilt from ``F.linear(x, W)`` and the paper's formula with
per-expert / per-token loops (docs/routing.md), and its gradient
w.r.t. the router weight must equal the layer's and be non-zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import BalanceConfig, MoEConfig, RouterConfig
from moetrain.moe import MoELayer
from moetrain.moe.step_state import step_state

pytestmark = pytest.mark.unit

B, S, D, N, K, G = 3, 6, 8, 8, 3, 4  # 4 device groups of 2 experts; device-limited cases use M >= 2
COEF = 0.7
LAYER = 1  # the layer's index in a model: the key of its global counts
LOSSES = ["expert", "device", "comm", "seq", "z", "importance"]
COEF_KEY = {
    "expert": "expert_coef",
    "device": "device_coef",
    "comm": "comm_coef",
    "seq": "seq_coef",
    "z": "z_loss_coef",
    "importance": "importance_coef",
}


def make_layer(loss: str, score_fn: str, topk_groups: int | None) -> MoELayer:
    balance = BalanceConfig(**{"expert_coef": 0.0, COEF_KEY[loss]: COEF})
    router = RouterConfig(score_fn=score_fn, num_groups=G, topk_groups=topk_groups)
    cfg = MoEConfig(num_experts=N, top_k=K, expert_hidden_size=4, router=router, balance=balance)
    layer = MoELayer(D, cfg, num_groups=G, layer_idx=LAYER)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


def reference_choice(s_TN: torch.Tensor, topk_groups: int | None) -> list[list[int]]:
    """Per token: the K experts of highest s, within the M groups of highest best-expert s if limited."""
    out = []
    for s in s_TN.detach().tolist():
        allowed = list(range(N))
        if topk_groups is not None:
            per = N // G
            best = sorted(range(G), key=lambda d: -max(s[d * per : (d + 1) * per]))[:topk_groups]
            allowed = [i for i in range(N) if i // per in best]
        out.append(sorted(allowed, key=lambda i: -s[i])[:K])
    return out


def reference_loss(
    loss: str,
    x_TD: torch.Tensor,
    W: torch.Tensor,
    score_fn: str,
    topk_groups: int | None,
    counts: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The weighted loss from the paper's formula; ``counts`` = global f statistics (Qiu et al. 2025)."""
    logits = F.linear(x_TD, W)
    s = logits.softmax(-1) if score_fn == "softmax" else logits.sigmoid()
    T = s.shape[0]
    chosen = reference_choice(s, topk_groups)
    # P_i = (1/T) sum_t s'_{i,t}, s' normalised per token (identity for softmax; DeepSeek-V3 eq. 19 for sigmoid)
    s_norm = s / s.sum(-1, keepdim=True)
    P = [sum(s_norm[t, i] for t in range(T)) / T for i in range(N)]
    cnt = [float(sum(i in c for c in chosen)) for i in range(N)]
    sent = [float(sum(any(i // (N // G) == d for i in c) for c in chosen)) for d in range(G)]
    n_tok = float(T)
    if counts is not None:
        cnt, n_tok = counts["expert"].tolist(), float(counts["tokens"].item())
        sent = counts["sent"].tolist()
    f = [N / (K * n_tok) * cnt[i] for i in range(N)]
    E = [list(range(d * (N // G), (d + 1) * (N // G))) for d in range(G)]
    if loss == "expert":  # DeepSeek-V2 eq. 23-25
        value = sum(f[i] * P[i] for i in range(N))
    elif loss == "device":  # eq. 26-28
        value = sum((sum(f[j] for j in E[d]) / len(E[d])) * sum(P[j] for j in E[d]) for d in range(G))
    elif loss == "comm":  # eq. 29-31, M = the device limit (min(K, D) without one)
        M = topk_groups or min(K, G)
        value = sum(G / (M * n_tok) * sent[d] * sum(P[j] for j in E[d]) for d in range(G))
    elif loss == "seq":  # DeepSeek-V3 eq. 17-20: the expert-level formula per sequence, averaged
        per_seq = []
        for b in range(B):
            toks = range(b * S, (b + 1) * S)
            fs = [N / (K * S) * sum(i in chosen[t] for t in toks) for i in range(N)]
            ps = [sum(s_norm[t, i] for t in toks) / S for i in range(N)]
            per_seq.append(sum(fs[i] * ps[i] for i in range(N)))
        value = sum(per_seq) / B
    elif loss == "z":  # ST-MoE eq. 5
        value = sum(torch.log(torch.exp(logits[t]).sum()) ** 2 for t in range(T)) / T
    elif loss == "importance":  # Shazeer et al. 2017 eq. 6-7: CV(sum_t g_t)^2, population variance
        imp = []
        for i in range(N):
            terms = []
            for t in range(T):
                if i in chosen[t]:
                    g = s[t, i]
                    if score_fn == "sigmoid":  # sigmoid weights are renormalised over the K chosen
                        g = g / sum(s[t, j] for j in chosen[t])
                    terms.append(g)
            imp.append(sum(terms) if terms else torch.zeros(()))
        imp_N = torch.stack([torch.as_tensor(v) for v in imp])
        mean = imp_N.mean()
        value = ((imp_N - mean) ** 2).mean() / mean**2
    else:
        raise AssertionError(loss)
    return COEF * value


CASES = [(loss, fn, None) for loss in LOSSES for fn in ("softmax", "sigmoid")]
CASES += [("comm", "softmax", 2), ("comm", "sigmoid", 2), ("device", "sigmoid", 2), ("expert", "softmax", 3)]


@pytest.mark.parametrize(("loss", "score_fn", "topk_groups"), CASES)
def test_balance_loss_gradient_wrt_router_equals_the_paper_formula(loss, score_fn, topk_groups):
    layer = make_layer(loss, score_fn, topk_groups)
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(7))
    _, stats = layer(x)
    assert set(stats.losses) == {loss}
    W = layer.router.weight
    (got,) = torch.autograd.grad(stats.aux_loss, W)
    ref_value = reference_loss(loss, x.view(-1, D), W, score_fn, topk_groups)
    (want,) = torch.autograd.grad(ref_value, W)
    torch.testing.assert_close(stats.aux_loss, ref_value.reshape(()), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    assert want.abs().max() > 1e-4 * COEF  # the loss really pushes the router


@pytest.mark.parametrize("loss", ["expert", "device", "comm"])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_global_scope_gradient_uses_global_f_and_local_p(loss, score_fn):
    """balance.scope=global: the layer fed the step's counts (as the trainer's pre-pass sets them) has the
    gradient of sum f_global * P_local; the counts differ from the micro-batch's, so a layer that ignores
    them fails."""
    layer = make_layer(loss, score_fn, None)
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(8))
    other = torch.randn(2 * B, S, D, generator=torch.Generator().manual_seed(9)) * 2.0
    with torch.no_grad():  # the step's global counts: this micro-batch plus another one (another rank's)
        counts = None
        for xb in (x, other):
            _, st = layer(xb)
            c = {"expert": st.sel_counts_N, "tokens": torch.tensor([float(st.num_tokens)]), "sent": st.sent_G}
            counts = c if counts is None else {k: counts[k] + v for k, v in c.items()}
    assert counts is not None
    with step_state(global_counts={LAYER: counts}):  # as the trainer installs the pre-pass's counts
        _, stats = layer(x)
    W = layer.router.weight
    (got,) = torch.autograd.grad(stats.aux_loss, W)
    ref_value = reference_loss(loss, x.view(-1, D), W, score_fn, None, counts)
    (want,) = torch.autograd.grad(ref_value, W)
    torch.testing.assert_close(stats.aux_loss, ref_value.reshape(()), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    (local,) = torch.autograd.grad(reference_loss(loss, x.view(-1, D), W, score_fn, None), W)
    assert not torch.allclose(want, local, rtol=1e-3, atol=1e-7)  # global f really differs from local f
    assert want.abs().max() > 1e-4 * COEF
