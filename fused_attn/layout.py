"""Memory layout of the tensors the op returns.

Outputs follow the layout of the input they belong to: when q is a transposed view of a
(B, L, H, D) tensor, out is allocated as (B, L, H, Dv) and returned transposed, so the caller's
``out.transpose(1, 2).reshape(B, L, H * Dv)`` stays free. The fake (meta) implementation of the
op uses the same function, so traced and real strides agree.
"""
from __future__ import annotations

import torch


def is_sequence_major(t: torch.Tensor) -> bool:
    """True when t (B, H, L, D) is stored as (B, L, H, D), i.e. heads vary faster than positions."""
    return t.stride(1) < t.stride(2)


def empty_like_layout(
    like: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """An uninitialised (B, H, L, D) tensor laid out like `like` (head-major or sequence-major)."""
    batch, heads, length, dim = shape
    dtype = like.dtype if dtype is None else dtype
    if is_sequence_major(like):
        return like.new_empty((batch, length, heads, dim), dtype=dtype).transpose(1, 2)
    return like.new_empty(shape, dtype=dtype)
