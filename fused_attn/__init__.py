"""fused_attn: fused, memory-efficient, exact scaled-dot-product attention for PyTorch."""
from . import integrations, nn
from .api import attention, explain
from .dispatch import BackendError, available_backends
from .dropout import dropout_keep_mask
from .sdpa import disable, enable, is_enabled, patch_sdpa, scaled_dot_product_attention

__all__ = [
    "attention", "explain", "available_backends", "dropout_keep_mask", "BackendError",
    "scaled_dot_product_attention", "patch_sdpa", "enable", "disable", "is_enabled", "nn",
]
__version__ = "0.1.0"
