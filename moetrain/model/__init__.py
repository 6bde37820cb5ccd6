"""The plain (single-device) Transformer."""

from moetrain.model.transformer import ModelOutput, Transformer, build_model, is_moe_layer, vocab_for

__all__ = ["ModelOutput", "Transformer", "build_model", "is_moe_layer", "vocab_for"]
