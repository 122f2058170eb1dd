"""The `cpu` backend: the C++ kernels in csrc/cpu/, primary for CPU tensors.

Fused forward and two-pass backward with fp32 accumulation, parallel over batch, heads and
query (or key) blocks, vectorized with AVX2+FMA where the CPU has it (chosen at run time;
FUSED_ATTN_CPU_ISA=portable forces the portable build). float64 is left to the reference backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..layout import empty_like_layout, new_output
from ..options import AttentionOptions, AttentionTensors
from . import native
from .base import Backend, Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _ops():
    return torch.ops.fused_attn_native


class CpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self) -> Optional[str]:
        return native.load_error()

    def unsupported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors, opts: AttentionOptions
    ) -> list[str]:
        reasons = []
        if q.device.type != "cpu":
            reasons.append(f"tensors on {q.device.type} (needs CPU)")
        if q.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {q.dtype} (supports float16, bfloat16, float32)")
        unsupported = {
            "attn_mask": extras.mask is not None or extras.bias is not None,
            "dropout": opts.dropout_p > 0,
            "varlen": q.dim() == 3,
        }
        reasons += [f"no {name} in the C++ kernels yet" for name, used in unsupported.items() if used]
        return reasons

    def forward(self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors,
                opts: AttentionOptions) -> tuple[Tensor, Tensor]:
        out = empty_like_layout(q, (*q.shape[:3], v.shape[3]))
        lse = new_output(q, q.shape[:3], torch.float32)
        _ops().cpu_forward(q, k, v, out, lse, *_variant_args(q, k, extras, opts))
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, extras, opts, bias_requires_grad):
        dq, dk, dv = (empty_like_layout(t, tuple(t.shape)) for t in (q, k, v))
        _ops().cpu_backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, *_variant_args(q, k, extras, opts))
        return dq, dk, dv, None


def _variant_args(q: Tensor, k: Tensor, extras: AttentionTensors, opts: AttentionOptions) -> tuple:
    """The ops' arguments after their tensors (csrc/binding.cpp, FUSED_ATTN_VARIANT_SCHEMA)."""
    shift = opts.causal_offset(q.shape[2], k.shape[2])
    return (opts.scale, opts.left, opts.right, shift, opts.softcap, extras.alibi_slopes)


def active_isa() -> str:
    """The kernels the next call runs: "avx2" or "portable" (FUSED_ATTN_CPU_ISA can force one)."""
    error = native.load_error()
    if error is not None:
        raise RuntimeError(f"the cpu backend is unavailable: {error}")
    return _ops().cpu_isa()
