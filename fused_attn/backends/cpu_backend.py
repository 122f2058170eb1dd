"""The `cpu` backend: the C++ kernels in csrc/cpu/, primary for CPU tensors.

Fused forward and backward (one pass or two, csrc/cpu/backward.h) with fp32 accumulation,
parallel over sequences, heads and query (or key) blocks, vectorized for the CPU it runs on,
chosen at run time: AVX-512 (bf16 products on AMX tiles or AVX512-BF16 dot products where the
CPU has them), else AVX2+FMA, else portable C++ (FUSED_ATTN_CPU_ISA=portable|avx2|avx512 forces
one). Dense, packed (varlen: tasks cover each sequence's real length, never padding) and KV-cache
decoding calls (contiguous or paged caches; the query rows of a GQA group share one task, so each
cached key is read once per key/value head; long caches of calls with few tasks are split,
split-KV, as are the keys of dense calls that no backward follows). float64 is left to the
reference backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..layout import attention_outputs, gradient_like, kvcache_outputs
from ..options import AttentionOptions, AttentionTensors
from . import native
from .base import Backend, Tensor, as_4d, needs_backward

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _ops():
    return torch.ops.fused_attn_native


class CpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self) -> Optional[str]:
        return native.load_error()

    def unsupported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors, opts: AttentionOptions, kvcache: bool = False
    ) -> list[str]:
        reasons = []
        if q.device.type != "cpu":
            reasons.append(f"tensors on {q.device.type} (needs CPU)")
        if q.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {q.dtype} (supports float16, bfloat16, float32)")
        return reasons

    def forward(self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors,
                opts: AttentionOptions) -> tuple[Tensor, Tensor]:
        out, lse = attention_outputs(q, v)
        # A backward recomputes the scores with its block products, so the forward rounds them alike
        # (csrc/cpu/params.h, ForwardArgs::for_backward); without one, the op takes decoding's
        # shortcuts (few queries' scores as dot products, split-KV: csrc/binding.cpp, cpu_forward).
        for_backward = needs_backward(q, k, v, extras.bias)
        _ops().cpu_forward(q, k, v, out, lse, *native.variant_args(q, k, extras, opts), for_backward)
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, extras, opts, bias_requires_grad):
        dq, dk, dv = (gradient_like(t) for t in (q, k, v))
        dbias = None
        if bias_requires_grad:
            # Summed over the bias's broadcast dims inside the kernels: never (B, Hq, Lq, Lk) memory.
            # Summed terms need float32; a bias that broadcasts over no dim above size 1 gets one
            # term per element, written in its own dtype (no float32 copy of an L x L gradient).
            shape, full = as_4d(extras.bias).shape, native.scores_shape(q, k)
            dbias = torch.zeros(shape, dtype=extras.bias.dtype if shape == full else torch.float32, device=q.device)
        _ops().cpu_backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, *native.variant_args(q, k, extras, opts),
                            None if dbias is None else dbias.expand(full))
        if dbias is not None:
            dbias = dbias.reshape(extras.bias.shape).to(extras.bias.dtype)
        return dq, dk, dv, dbias

    supports_kvcache = True
    decodes_few_query_rows = True

    def path(self, q, k, v, extras, opts):
        described = super().path(q, k, v, extras, opts)
        if described is None and q.dim() == 4 and not needs_backward(q, k, v, extras.bias) and (
                extras.mask is None and extras.bias is None and opts.dropout_p == 0):
            # csrc/binding.cpp, cpu_forward: whatever the shapes and alignment
            return ("with its decoding path (no backward follows; no mask, bias or dropout): keys split across "
                    "tasks where the call has too few for the cores")
        return described

    def kvcache_forward(self, q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, opts, k=None, v=None):
        # New tokens are written by the op itself: in Python (Backend.kvcache_forward) the indexed
        # writes cost more than a short cache's attention.
        out, lse = kvcache_outputs(q, v_cache)
        table = None if block_table is None else block_table.contiguous()  # the kernels read it as rows
        _ops().cpu_kvcache_forward(q, k_cache, v_cache, cache_seqlens, table, out, lse, opts.scale, opts.left,
                                   opts.right, opts.softcap, alibi_slopes, k, v)
        return out, lse


def active_isa() -> str:
    """The kernels the next call runs: "avx512", "avx2" or "portable" (FUSED_ATTN_CPU_ISA can force one)."""
    error = native.load_error()
    if error is not None:
        raise RuntimeError(f"the cpu backend is unavailable: {error}")
    return _ops().cpu_isa()


def bf16_products() -> str:
    """What the next bf16 call's matrix products run on, with bf16 operands and fp32 results:
    "amx" (AMX tiles: the avx512 kernels on a CPU with AMX-BF16), "avx512-bf16" (the avx512 kernels'
    dot products on a CPU with AVX512-BF16 and no AMX, such as AMD Zen 4) or "fp32" (the fp32
    products, bf16 converted on load). FUSED_ATTN_CPU_BF16=amx|dot|fp32 caps the choice (read at
    every call). The bf16 products take forwards with head dims D even and Dv a multiple of 16 and
    blocks of more than 16 query rows, and backwards with D and Dv multiples of 16."""
    active_isa()  # raises if the backend is unavailable
    return _ops().cpu_bf16_products()
