"""The gradients each optimizer step applies, for multi-rank parity tests that train several steps.

AdamW normalises each update by the gradient's own magnitude (m / sqrt(v)), so a gradient off by a constant
factor (a wrong reduction divisor: sum instead of mean, 1/EDP instead of 1/W) trains almost the same
parameters and the same losses. A parity test that compares only those after a few steps can be fooled; one
that also compares the gradients each step applied cannot.
"""

from __future__ import annotations

from typing import Any

import torch


def record_step_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    """A list that receives, at each ``optimizer.step()``, every gradient about to be applied (synced and
    clipped; a DTensor's whole tensor, gathered: every rank must step, as in training)."""
    from torch.distributed.tensor import DTensor

    out: list[dict[str, torch.Tensor]] = []

    def record(*_: Any) -> None:
        out.append(
            {
                n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        )

    optimizer.register_step_pre_hook(record)
    return out


def assert_gradients_close(
    got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]], what: str, exact: bool = False
) -> None:
    """Every step's every gradient equal: bitwise (``exact``) or each to 1e-4 of its own scale (fp32, another
    reduction order)."""
    assert len(got) == len(want) > 0, what
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), f"{what}: step {step + 1}: {sorted(g.keys() ^ w.keys())[:4]}"
        for name, ref in w.items():
            tol = 0.0 if exact else 1e-4
            atol = tol * float(ref.abs().max()) if ref.numel() else 0.0
            torch.testing.assert_close(g[name], ref, rtol=tol, atol=atol, msg=f"{what}: step {step + 1}: {name}")


def linear_adamw_step(cfg: Any) -> Any:
    """A copy of ``cfg`` for one step of AdamW made linear in the gradient, for engines whose reduced gradients
    a test cannot reach (DeepSpeed's ZeRO partitions): eps = 1 dwarfs sqrt(v) = |g| (gradients ~1e-3), so the
    update is lr * g / (|g| + 1) ~ g, with no warmup, decay or clipping to rescale it. The parameters' change
    then shows a gradient off by a constant factor, which AdamW's normalisation hides after a normal step."""
    import copy

    c = copy.deepcopy(cfg)
    c.trainer.max_steps, c.optim.lr, c.optim.eps = 1, 1.0, 1.0
    c.optim.warmup_steps, c.optim.weight_decay, c.optim.grad_clip, c.optim.min_lr_ratio = 0, 0.0, 0.0, 1.0
    return c


def assert_updates_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """Two runs' parameter changes of a :func:`linear_adamw_step` equal, each to 1e-3 of its own scale (so
    to 1e-3 of the gradient); every parameter moved."""
    assert got.keys() == want.keys(), what
    for name, d in want.items():
        assert d.abs().max() > 0, f"{what}: {name} did not move"
        torch.testing.assert_close(got[name], d, rtol=1e-3, atol=1e-3 * float(d.abs().max()), msg=f"{what}: {name}")
