"""The plain (single-device) Transformer.

Attributes are imported lazily so that ``moetrain.moe`` can use the building
blocks in ``moetrain.model.layers`` without importing the whole model (which
itself uses the MoE layer).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ModelOutput", "Transformer", "build_model", "is_moe_layer", "vocab_for"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moetrain.model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'moetrain.model' has no attribute {name!r}")
