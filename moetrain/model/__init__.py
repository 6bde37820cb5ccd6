"""The plain (single-device) Transformer and the functions applied to it."""

from moetrain.model.transformer import ModelOutput, Transformer, build_model, is_moe_layer, vocab_for

__all__ = ["ModelOutput", "Transformer", "build_model", "is_moe_layer", "vocab_for"]
