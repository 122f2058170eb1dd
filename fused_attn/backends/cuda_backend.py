"""The `cuda` backend: the CUDA C++ kernels in csrc/cuda/, a fallback for CUDA tensors.

Used when Triton is missing or cannot serve a call, or when forced (`backend="cuda"`). sm_80 and
newer: tensor cores (mma.sync, fp32 accumulation) for float16/bfloat16, exact fp32 FMA for float32;
every score variant; forward and backward (deterministic, no atomics; a bias's gradient summed
into its own shape in the kernels) of dense and packed (varlen) inputs, and KV-cache decoding
(contiguous or paged caches; the query heads of a GQA group share blocks, so each cached key is
read once per group, and long caches are split across blocks and merged by lse: split-KV).
Packed calls run one grid over (query blocks of max_seqlen_q, heads, sequences), the kernels
reading cu_seqlens on the device (no host sync).

The class is parameterised by the ops namespace and device type its kernels run on, so the test
suite also instantiates it on the emulated build of the same kernels (tests/cuda_emulator/:
`torch.ops.fused_attn_emulated`, CPU tensors) and runs the comparisons it would run on a GPU.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ..layout import as_full_cache, attention_outputs, fill_unused_rows, gradient_like, kvcache_outputs, new_output
from ..options import AttentionOptions, AttentionTensors
from . import native
from .base import Backend, Tensor, as_4d, takes_decoding_kernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # csrc/cuda/launch.h, kMaxHeadDim


@functools.lru_cache(maxsize=None)
def cuda_build_error() -> Optional[str]:
    """None when fused_attn._native has the CUDA kernels, else why it has not (found once: dispatch
    asks on every call)."""
    error = native.load_error()
    if error is not None:
        return error
    note = native.setup_note("_native_cuda.txt")
    if note is None:
        return "fused_attn._native was built without the CUDA kernels (no fused_attn/_native_cuda.txt)"
    if note:
        return f"fused_attn._native was built without the CUDA kernels: {note}"
    if not hasattr(torch.ops.fused_attn_native, "cuda_forward"):
        return "fused_attn._native has no cuda_forward op (rebuild it)"
    return None


def _native_ops():
    return torch.ops.fused_attn_native


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class CudaBackend(Backend):
    """The CUDA kernels behind the ops `ops().cuda_forward` and `ops().cuda_backward` (csrc/binding.cpp,
    CUDA section) on tensors of `device_type`. `availability()` says why the ops cannot run (None
    when they can); `stream(device)` is the stream handle the op launches on."""

    def __init__(self, name: str = "cuda", ops: Callable = _native_ops, device_type: str = "cuda",
                 availability: Optional[Callable[[], Optional[str]]] = None,
                 stream: Callable[[torch.device], int] = _current_stream):
        self.name = name
        self._ops = ops
        self._device_type = device_type
        self._availability = availability or self._native_availability
        self._stream = stream

    @staticmethod
    def _native_availability() -> Optional[str]:
        if not torch.cuda.is_available():
            return "no CUDA GPU"
        return cuda_build_error()

    def unavailable_reason(self) -> Optional[str]:
        return self._availability()

    def unsupported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors, opts: AttentionOptions, kvcache: bool = False
    ) -> list[str]:
        reasons = []
        if q.device.type != self._device_type:
            reasons.append(f"tensors on {q.device.type} (needs {self._device_type})")
        if q.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {q.dtype} (supports float16, bfloat16, float32)")
        if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
            reasons.append(f"head dim {max(q.shape[-1], v.shape[-1])} (supports up to {MAX_HEAD_DIM})")
        return reasons

    def forward(self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors,
                opts: AttentionOptions) -> tuple[Tensor, Tensor]:
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = attention_outputs(q, v)
        if takes_decoding_kernel(q, k, v, extras, opts):  # few query rows: split-KV, GQA rows packed
            q_, k_, v_, out_, seqlens = as_full_cache(q, k, v, out)
            self._launch_kvcache(q_, k_, v_, out_, lse, seqlens, None, extras.alibi_slopes, opts)
            return out, lse
        self._ops().cuda_forward(q, k, v, out, lse, *native.variant_args(q, k, extras, opts),
                                 *opts.longest(q.shape[0], k.shape[0]), self._stream(q.device))
        if q.dim() == 3:  # packed rows after the last sequence: an empty sequence's out and lse
            fill_unused_rows(out, 0, extras.cu_seqlens_q, 0.0)
            fill_unused_rows(lse, 1, extras.cu_seqlens_q, float("-inf"))
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, extras, opts, bias_requires_grad):
        q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
        dq, dk, dv = (gradient_like(t) for t in (q, k, v))
        dbias = None
        if bias_requires_grad:
            # Each element written once, its broadcast terms summed in the kernel: never (B, Hq, Lq, Lk) memory.
            dbias = new_output(q, as_4d(extras.bias).shape, torch.float32)
        self._ops().cuda_backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, *native.variant_args(q, k, extras, opts),
                                  None if dbias is None else dbias.expand(native.scores_shape(q, k)),
                                  *opts.longest(q.shape[0], k.shape[0]), self._stream(q.device))
        if q.dim() == 3:  # packed rows after the last sequence take no part: zero gradients
            fill_unused_rows(dq, 0, extras.cu_seqlens_q, 0.0)
            for grad in (dk, dv):
                fill_unused_rows(grad, 0, extras.cu_seqlens_k, 0.0)
        if dbias is not None:
            dbias = dbias.reshape(extras.bias.shape).to(extras.bias.dtype)
        return dq, dk, dv, dbias

    supports_kvcache = True
    decodes_few_query_rows = True
    # Key splits of a KV-cache call: 0 lets the op choose by shape and GPU size (split-KV for long
    # caches and few query rows); tests set a count to exercise the split path on small caches.
    decode_splits = 0

    judges_cache_values = True

    def kvcache_forward(self, q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, opts, k=None, v=None):
        # The op's first kernel (append.cu) writes the new tokens, skipping any outside the cache.
        # The kernels read rows of the head dim as contiguous vectors, so a cache laid out otherwise
        # is read through a copy, which takes the new tokens and then goes back whole into the
        # caller's cache: two copies of a rare layout's cache, and no write the kernels did not judge.
        q = _last_dim_contiguous(q)
        k_read, v_read = _last_dim_contiguous(k_cache), _last_dim_contiguous(v_cache)
        out, lse = kvcache_outputs(q, v_cache)
        self._launch_kvcache(q, k_read, v_read, out, lse, cache_seqlens, block_table, alibi_slopes, opts, k, v)
        if k is not None:
            for cache, read in ((k_cache, k_read), (v_cache, v_read)):
                if read is not cache:
                    cache.copy_(read)
        return out, lse

    def decode(self, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, opts):
        return self.kvcache_forward(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, opts)

    def _launch_kvcache(self, q, k_cache, v_cache, out, lse, seqlens_k, block_table, alibi_slopes, opts, k=None,
                        v=None):
        table = None if block_table is None else block_table.contiguous()  # the kernels read it as rows
        self._ops().cuda_kvcache_forward(q, k_cache, v_cache, seqlens_k, table, out, lse, opts.scale,
                                         opts.left, opts.right, opts.softcap, alibi_slopes, k, v, self.decode_splits,
                                         self._stream(q.device))


def _last_dim_contiguous(t: Tensor) -> Tensor:
    """The kernels read rows of the head dim as contiguous vectors; other layouts are copied."""
    return t if t.stride(-1) == 1 else t.contiguous()

