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
        dbias = None
        if bias_requires_grad:
            # Summed over the bias's broadcast dims inside the kernels: never (B, Hq, Lq, Lk) memory.
            dbias = torch.zeros(_as_4d(extras.bias).shape, dtype=torch.float32, device=q.device)
        _ops().cpu_backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, *_variant_args(q, k, extras, opts),
                            None if dbias is None else dbias.expand(_scores_shape(q, k)))
        if dbias is not None:
            dbias = dbias.reshape(extras.bias.shape).to(extras.bias.dtype)
        return dq, dk, dv, dbias


def _variant_args(q: Tensor, k: Tensor, extras: AttentionTensors, opts: AttentionOptions) -> tuple:
    """The ops' arguments after their tensors (csrc/binding.cpp, FUSED_ATTN_VARIANT_SCHEMA)."""
    shift = opts.causal_offset(q.shape[2], k.shape[2])
    full = _scores_shape(q, k)
    mask = None if extras.mask is None else _as_4d(extras.mask).expand(full)
    # The kernels read float32 biases; a 16-bit one is converted in its own (broadcast) shape.
    bias = None if extras.bias is None else _as_4d(extras.bias).to(torch.float32).expand(full)
    return (opts.scale, opts.left, opts.right, shift, opts.softcap, extras.alibi_slopes, mask, bias,
            extras.dropout_seed, opts.dropout_p)


def _scores_shape(q: Tensor, k: Tensor) -> tuple[int, int, int, int]:
    return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _as_4d(t: Tensor) -> Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def active_isa() -> str:
    """The kernels the next call runs: "avx2" or "portable" (FUSED_ATTN_CPU_ISA can force one)."""
    error = native.load_error()
    if error is not None:
        raise RuntimeError(f"the cpu backend is unavailable: {error}")
    return _ops().cpu_isa()
