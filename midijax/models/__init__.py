"""Sequence models for midijax: the Transformer, its attention backends and decode cache."""
from midijax.models.attention import ATTENTION_IMPLS
from midijax.models.kv_cache import KV_CACHE_KINDS, LayerCache, quantize_kv
from midijax.models.transformer import (
    MASKED_LOGIT,
    REMAT_POLICIES,
    Transformer,
    TransformerConfig,
    count_params,
    flops_per_token,
    is_lora_path,
    matmul_params,
    merge_lora,
    params_scanned,
    resolve_attention_impl,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "ATTENTION_IMPLS",
    "KV_CACHE_KINDS",
    "LayerCache",
    "MASKED_LOGIT",
    "REMAT_POLICIES",
    "Transformer",
    "TransformerConfig",
    "count_params",
    "flops_per_token",
    "is_lora_path",
    "matmul_params",
    "merge_lora",
    "params_scanned",
    "quantize_kv",
    "resolve_attention_impl",
    "stack_layers",
    "unstack_layers",
]
