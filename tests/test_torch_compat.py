"""What differs between the torch versions moetrain supports (``pyproject.toml``'s floor to the newest).

The GPU machine runs torch 2.11 while the CPU test bed runs 2.13; ``scripts/compat_check.sh`` runs the fast suite
on the declared floor. These tests pin the version-dependent spots that have broken before.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.unit

triton = pytest.importorskip("triton", reason="triton is a dev dependency on Linux x86-64 only")


@pytest.fixture
def matmul_precision():
    """Restore every fp32 matmul precision setting the test changes (global and per backend)."""
    matmul = torch.backends.cuda.matmul
    saved = (torch.backends.fp32_precision, matmul.fp32_precision) if hasattr(matmul, "fp32_precision") else None
    legacy = None if saved else matmul.allow_tf32
    yield matmul
    if saved is not None:
        torch.backends.fp32_precision, matmul.fp32_precision = saved
    else:
        matmul.allow_tf32 = legacy


def test_triton_precision_follows_every_way_of_allowing_tf32(matmul_precision):
    """The Triton segment GEMMs take fp32 operands exactly ("ieee") unless TF32 is allowed, whichever API allowed
    it, and reading the setting never raises after legacy and new API calls were mixed (bug caught: reading
    ``torch.backends.cuda.matmul.allow_tf32`` or ``torch.get_float32_matmul_precision()``, which raise on torch
    2.9+ once ``fp32_precision`` was set next to the legacy flag)."""
    from moetrain.moe.triton_gemm import _precision

    assert _precision(torch.float32) == "ieee"
    assert _precision(torch.bfloat16) == "tf32"  # 16-bit operands: the matrix units take them as they are
    torch.set_float32_matmul_precision("high")
    assert _precision(torch.float32) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert _precision(torch.float32) == "ieee"
    if not hasattr(matmul_precision, "fp32_precision"):
        return  # torch without the new API: the legacy flag is the only setting
    matmul_precision.allow_tf32 = True  # legacy ...
    matmul_precision.fp32_precision = "ieee"  # ... then new: the getters of both raise on torch 2.9+
    assert _precision(torch.float32) == "ieee"
    matmul_precision.fp32_precision = "tf32"
    assert _precision(torch.float32) == "tf32"
