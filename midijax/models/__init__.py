"""Sequence models for midijax."""
from midijax.models.transformer import (
    MASKED_LOGIT,
    Transformer,
    TransformerConfig,
    count_params,
    flops_per_token,
    matmul_params,
)

__all__ = [
    "MASKED_LOGIT",
    "Transformer",
    "TransformerConfig",
    "count_params",
    "flops_per_token",
    "matmul_params",
]
