"""fused_attn: fused, memory-efficient, exact scaled-dot-product attention for PyTorch."""
from . import integrations, nn
from .api import attention, explain
from .dispatch import BackendError, available_backends
from .dropout import dropout_keep_mask
from .kvcache import attention_with_kvcache
from .sdpa import disable, enable, is_enabled, patch_sdpa, scaled_dot_product_attention
from .varlen import varlen_attention

__all__ = [
    "attention", "varlen_attention", "attention_with_kvcache", "explain", "available_backends",
    "dropout_keep_mask", "BackendError",
    "scaled_dot_product_attention", "patch_sdpa", "enable", "disable", "is_enabled", "nn", "integrations",
]
__version__ = "0.1.0"
