"""The optimizer's numbers and the trainer's seed beyond their sign: the values no run means, each refused with
its reason before any work (``optim.*``, ``trainer.seed``).

Why the bounds: a finite value past them did not fail validation but the first step, with a traceback or
silently. AdamW's step size is ``lr / (1 - beta1^t)`` and its decoupled decay multiplies the weights by
``1 - lr * weight_decay`` (Loshchilov & Hutter 2019, algorithm 2; ``torch.optim.AdamW``): with ``optim.lr=1e38``
(or ``lr=1e23`` and ``beta1`` near 1) the step size overflows float32 and ``torch._foreach_addcdiv_`` raises
"value cannot be converted to type float without overflow"; ``torch.manual_seed(2**64)`` raises "Overflow when
unpacking long long" while the trainer is built.
"""

from __future__ import annotations

from moetrain.config.errors import ConfigError
from moetrain.config.run import OptimConfig

MAX_LR = 10.0
"""The largest ``optim.lr``: AdamW moves every weight by about lr per step whatever the gradient's scale (its
update m / sqrt(v) is near +-1), and the weights start near ``model.init_std`` (0.02): a rate above 10 replaces
the model with noise at the first step (and keeps lr / (1 - beta1) within float32 for any beta1 < 1)."""
MAX_DECAY_FACTOR = 1.0
"""The largest ``optim.lr x optim.weight_decay``: each step multiplies the decayed weights by 1 - lr x
weight_decay, which is 0 at 1 (every weight erased) and flips their sign beyond."""
MAX_EPS = 1.0
"""The largest ``optim.eps``: eps is added to sqrt(v), the gradients' running RMS (far below 1 in practice); a
larger eps outweighs it and AdamW becomes SGD with a rate of lr / eps."""
SEED_LIMIT = 2**63
"""``trainer.seed`` is in [0, 2**63): torch's generators take a 64-bit seed."""


def _fail(key: str, value: object, rule: str) -> None:
    raise ConfigError(f"{key}={value!r}: {rule}")


def check_optim(o: OptimConfig) -> None:
    """Every rule of ``optim.*``: signs and ranges, then the bounds above (one :class:`ConfigError` line)."""
    if o.lr is None or o.lr <= 0:
        _fail("optim.lr", o.lr, "must be > 0")
    if o.lr > MAX_LR:
        _fail("optim.lr", o.lr, f"must be <= {MAX_LR:g}: AdamW moves every weight by about lr per step whatever "
              "the gradient, and the weights start near model.init_std (0.02 by default): a larger rate replaces them with "
              "noise at the first step")  # fmt: skip
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _fail("optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    if o.warmup_steps < 0:
        _fail("optim.warmup_steps", o.warmup_steps, "must be >= 0")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", o.weight_decay, "must be >= 0")
    if o.lr * o.weight_decay > MAX_DECAY_FACTOR:
        _fail("optim.weight_decay", o.weight_decay, f"optim.lr x optim.weight_decay must be <= 1 (here "
              f"{o.lr * o.weight_decay:g}): each step multiplies the decayed weights by 1 - lr x weight_decay, "
              "which erases them at 1 and flips their sign beyond")  # fmt: skip
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            _fail(f"optim.{key}", getattr(o, key), "must be in [0, 1)")
    if o.grad_clip < 0:
        _fail("optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    if o.eps is None or o.eps <= 0:
        _fail("optim.eps", o.eps, "must be > 0")
    if o.eps > MAX_EPS:
        _fail("optim.eps", o.eps, f"must be <= {MAX_EPS:g}: eps is added to the gradients' running RMS (far "
              "below 1), so a larger one outweighs it and AdamW becomes SGD with a rate of lr / eps")  # fmt: skip


def check_seed(key: str, seed: int) -> None:
    """A seed torch's generators take: an int in [0, 2**63)."""
    if not 0 <= seed < SEED_LIMIT:
        _fail(key, seed, "must be in [0, 2**63 - 1]: torch's generators take a 64-bit seed")
