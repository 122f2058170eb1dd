"""The autograd-aware op: forward and backward registered with torch.library.

`fused_attn::forward` and `fused_attn::backward` are custom ops with fake (meta) implementations,
so torch.compile traces them without graph breaks, and the backward is itself an op, so compiled
graphs keep it opaque too. The backend is chosen in Python before the op is called and travels
as a string argument; the op only runs it.
"""
from __future__ import annotations

import torch

from .backends import get_backend
from .layout import empty_like_layout
from .options import AttentionOptions

Tensor = torch.Tensor


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_empty(q: Tensor, k: Tensor) -> bool:
    return q.numel() == 0 or k.shape[2] == 0


@torch.library.custom_op("fused_attn::forward", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, bottom_right: bool, scale: float, deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention by the named backend. Shapes as in fused_attn.attention."""
    opts = AttentionOptions(causal, bottom_right, scale, deterministic)
    if _is_empty(q, k):  # no keys: every row is fully masked
        out = empty_like_layout(q, (*q.shape[:3], v.shape[3])).zero_()
        return out, q.new_full(q.shape[:3], float("-inf"), dtype=_lse_dtype(q.dtype))
    return get_backend(backend).forward(q, k, v, opts)


@attention_forward.register_fake
def _(q, k, v, causal, bottom_right, scale, deterministic, backend):
    out = empty_like_layout(q, (*q.shape[:3], v.shape[3]))
    return out, q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("fused_attn::backward", mutates_args=())
def attention_backward(
    dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, bottom_right: bool, scale: float, deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) given the gradients of out and lse."""
    opts = AttentionOptions(causal, bottom_right, scale, deterministic)
    if _is_empty(q, k):
        return tuple(empty_like_layout(t, tuple(t.shape)).zero_() for t in (q, k, v))
    return get_backend(backend).backward(dout, dlse, q, k, v, out, lse, opts)


@attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, causal, bottom_right, scale, deterministic, backend):
    return tuple(empty_like_layout(t, tuple(t.shape)) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, *flags = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.flags = flags


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, dlse, q, k, v, out, lse, *ctx.flags)
    return dq, dk, dv, *([None] * len(ctx.flags))


attention_forward.register_autograd(_backward, setup_context=_setup_context)
