"""The `triton` backend: the fused kernels in fused_attn/triton/, primary on CUDA GPUs.

CPU tensors are served only under Triton's interpreter (TRITON_INTERPRET=1 set before fused_attn
is imported), which is how CI runs these kernels without a GPU.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..options import AttentionOptions, AttentionTensors
from .base import Backend, Tensor, takes_decoding_kernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_ROWS = 65535


def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the installation
        return f"triton is not installed ({error})"
    return None


def _interpreting() -> bool:
    if IMPORT_ERROR is not None:
        return False
    from ..triton.common import INTERPRETING

    return INTERPRETING


def _interpreter_problem() -> Optional[str]:
    """Why the interpreter cannot run the kernels (probed with a tiny kernel when it is on)."""
    if not INTERPRETING:
        return None
    from ..triton.common import interpreter_problem

    return interpreter_problem()


# Checked once at import: dispatch runs on every call, also while torch.compile traces it.
IMPORT_ERROR = _import_error()
INTERPRETING = _interpreting()
INTERPRETER_PROBLEM = _interpreter_problem()


@functools.cache
def _kernels():
    """fused_attn.triton's launchers, imported on the first call (importing them compiles nothing,
    but a per-call import statement costs microseconds that a decoding step notices)."""
    from ..triton import backward, decode, forward

    return forward, backward, decode


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        if IMPORT_ERROR is not None:
            return IMPORT_ERROR
        if not torch.cuda.is_available() and not INTERPRETING:
            return "no CUDA GPU, and Triton's interpreter is off (set TRITON_INTERPRET=1 before import)"
        return INTERPRETER_PROBLEM

    def unsupported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors, opts: AttentionOptions, kvcache: bool = False
    ) -> list[str]:
        reasons = []
        if q.device.type == "cpu":
            if not INTERPRETING:
                reasons.append("CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before import)")
        elif q.device.type != "cuda":
            reasons.append(f"tensors on {q.device.type} (needs CUDA)")
        elif INTERPRETING:
            reasons.append("Triton's interpreter is on, and it runs CPU tensors only")
        if q.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {q.dtype} (supports float16, bfloat16, float32)")
        # The kernels launch a grid row per (sequence, head): query heads, or key/value heads when
        # decoding from a cache (the grid's widest dimension, bias_grad's included, never has more).
        sequences = q.shape[0] if extras.cu_seqlens_q is None else extras.cu_seqlens_q.shape[0] - 1
        rows = sequences * (k.shape[2] if kvcache else q.shape[1])
        if rows > MAX_GRID_ROWS:
            reasons.append(f"{rows} (sequence, head) pairs: its grids hold at most {MAX_GRID_ROWS} (CUDA's limit on "
                           "a grid's second dimension)")
        return reasons

    def forward(self, q, k, v, extras, opts):
        forward, _, decode = _kernels()
        if takes_decoding_kernel(q, k, v, extras, opts):  # few query rows: split-KV, GQA rows packed
            return decode.decoding_forward(q, k, v, extras.alibi_slopes, opts)
        return forward.attention_forward(q, k, v, extras, opts)

    def backward(self, dout, dlse, q, k, v, out, lse, extras, opts, bias_requires_grad):
        return _kernels()[1].attention_backward(dout, dlse, q, k, v, out, lse, extras, opts, bias_requires_grad)

    supports_kvcache = True
    decodes_few_query_rows = True

    judges_cache_values = True

    def kvcache_forward(self, q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, opts, k=None, v=None):
        # Two launches: one writes the new tokens, the next counts them (no seqlens + Lnew tensor).
        decode = _kernels()[2]
        if k is not None:
            decode.append_to_cache(k_cache, v_cache, block_table, cache_seqlens, k, v)
        return decode.decode_forward(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, opts,
                                     new_tokens=0 if k is None else k.shape[1])

    def decode(self, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, opts):
        return self.kvcache_forward(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, opts)
