"""nn.Module entry points: a drop-in torch.nn.MultiheadAttention and a plain attention module."""
from .attention import Attention
from .multihead import MultiheadAttention

__all__ = ["Attention", "MultiheadAttention"]
