"""fused_attn: fused, memory-efficient, exact scaled-dot-product attention for PyTorch."""
from .api import attention, explain
from .dispatch import BackendError, available_backends
from .dropout import dropout_keep_mask
from .kvcache import attention_with_kvcache
from .varlen import varlen_attention

__all__ = ["attention", "explain", "available_backends", "dropout_keep_mask", "varlen_attention", "attention_with_kvcache",
           "BackendError"]
__version__ = "0.1.0"
