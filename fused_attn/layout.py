"""Memory layout of the tensors the op returns.

Outputs follow the layout of the input they belong to: when q is a transposed view of a
(B, L, H, D) tensor, out is allocated as (B, L, H, Dv) and returned transposed, so the caller's
``out.transpose(1, 2).reshape(B, L, H * Dv)`` stays free. The fake (meta) implementation of the
op uses the same function, so traced and real strides agree.
"""
from __future__ import annotations

import os

import torch

# Tests set this so every output starts as NaN: an element a kernel forgets to write shows up.
POISON_OUTPUTS = os.environ.get("FUSED_ATTN_POISON_OUTPUTS", "0") == "1"


def new_output(like: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor for a kernel to fill (NaN-filled when poisoning)."""
    tensor = like.new_empty(shape, dtype=dtype)
    return tensor.fill_(float("nan")) if POISON_OUTPUTS else tensor


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
        return new_output(like, (batch, length, heads, dim), dtype).transpose(1, 2)
    return new_output(like, shape, dtype)


def fill_unused_rows(t: torch.Tensor, dim: int, cu_seqlens: torch.Tensor, value: float) -> torch.Tensor:
    """Set the packed rows of `t` along `dim` from cu_seqlens[-1] on (they belong to no sequence,
    so no kernel program covers them) to `value`, in place. Runs on the device, without reading
    cu_seqlens on the host: no synchronisation."""
    rows = torch.arange(t.shape[dim], device=t.device)
    unused = (rows >= cu_seqlens[-1]).reshape((-1,) + (1,) * (t.dim() - 1 - dim))
    return t.masked_fill_(unused, value)
