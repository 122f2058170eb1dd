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


def poisoned(tensor: torch.Tensor) -> torch.Tensor:
    """A new output as the kernels get it: NaN-filled when poisoning, else as it is."""
    return tensor.fill_(float("nan")) if POISON_OUTPUTS else tensor


def new_output(like: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor for a kernel to fill (NaN-filled when poisoning)."""
    return poisoned(like.new_empty(shape, dtype=dtype))


def is_sequence_major(t: torch.Tensor) -> bool:
    """True when t (B, H, L, D) is stored as (B, L, H, D), i.e. heads vary faster than positions."""
    return t.stride(1) < t.stride(2)


def empty_like_layout(like: torch.Tensor, dim: int) -> torch.Tensor:
    """An uninitialised (B, H, L, dim) tensor of like's (B, H, L, D) sizes and dtype, laid out like
    it (head-major or sequence-major)."""
    batch, heads, length, like_dim = like.shape  # plain ints: torch.Size slices cost more to allocate from
    if dim == like_dim and like.is_contiguous():  # the common case, and empty_like's quickest (~0.4 us less)
        return poisoned(torch.empty_like(like))
    if is_sequence_major(like):
        return new_output(like, (batch, length, heads, dim), like.dtype).transpose(1, 2)
    return new_output(like, (batch, heads, length, dim), like.dtype)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse and the row statistics are float32, float64 for float64 inputs (the reference backend)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_outputs(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (out, lse) of an attention call: dense q (B, Hq, Lq, D) gives out
    (B, Hq, Lq, Dv) laid out like q and lse (B, Hq, Lq); packed q (total_q, Hq, D) gives out
    (total_q, Hq, Dv) and lse (Hq, total_q)."""
    if q.dim() == 3:
        return (new_output(q, (*q.shape[:2], v.shape[2]), q.dtype),
                new_output(q, (q.shape[1], q.shape[0]), lse_dtype(q.dtype)))
    batch, heads, length, _ = q.shape
    return empty_like_layout(q, v.shape[3]), new_output(q, (batch, heads, length), lse_dtype(q.dtype))


def gradient_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient of q, k or v: laid out like a dense t, contiguous for a packed one."""
    return empty_like_layout(t, t.shape[3]) if t.dim() == 4 else new_output(t, tuple(t.shape), t.dtype)


def kvcache_outputs(q: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (out (B, Lq, Hq, Dv), lse (B, Hq, Lq)) of a KV-cache call, q (B, Lq, Hq, D)."""
    batch, length, heads, _ = q.shape
    return (new_output(q, (batch, length, heads, v_cache.shape[3]), q.dtype),
            new_output(q, (batch, heads, length), lse_dtype(q.dtype)))


def as_full_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor):
    """A dense decoding-shaped call (backends/base.py, takes_decoding_kernel) as a KV-cache one:
    (B, L, H, D) views of q, k, v and out (no copies), and each sequence's length, Lk (int32 on q's
    device)."""
    seqlens = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
    return (*(t.transpose(1, 2) for t in (q, k, v, out)), seqlens)


def fill_unused_rows(t: torch.Tensor, dim: int, cu_seqlens: torch.Tensor, value: float) -> torch.Tensor:
    """Set the packed rows of `t` along `dim` from cu_seqlens[-1] on (they belong to no sequence,
    so no kernel program covers them) to `value`, in place. Runs on the device, without reading
    cu_seqlens on the host: no synchronisation."""
    rows = torch.arange(t.shape[dim], device=t.device)
    unused = (rows >= cu_seqlens[-1]).reshape((-1,) + (1,) * (t.dim() - 1 - dim))
    return t.masked_fill_(unused, value)
