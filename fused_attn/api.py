"""fused_attn.attention: the public entry point."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .checks import check_qkv, make_options
from .dispatch import explain_choice, select_backend
from .ops import attention_forward

Tensor = torch.Tensor


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    causal_alignment: str = "top_left",
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Exact scaled-dot-product attention, softmax(scale * q @ k^T) @ v, without the L x L matrix.

    Args:
        q: (B, Hq, Lq, D) queries.
        k: (B, Hkv, Lk, D) keys. Hq must be a multiple of Hkv: Hkv < Hq is grouped-query
            attention (GQA), Hkv = 1 multi-query attention; shared k/v are never copied.
        v: (B, Hkv, Lk, Dv) values; Dv may differ from D.
            q, k and v share one dtype (float16, bfloat16, float32; float64 in the `reference`
            backend) and one device, head dims are 1..256, and any strides work without a copy
            (a transposed view of a (B, L, H, D) tensor is the common case).
        causal: mask key j for query i when j > i + offset.
        causal_alignment: "top_left" (offset 0, as torch SDPA's is_causal) or "bottom_right"
            (offset Lk - Lq, as flash-attn and KV caches: the last query sees every key).
            The two differ only when Lq != Lk.
        scale: multiplier of q @ k^T; defaults to 1 / sqrt(D).
        return_lse: also return the row log-sum-exp of the scaled, masked scores.
        deterministic: ask for bitwise reproducible gradients. Every backend already computes
            gradients without atomics (the dq and dk/dv passes each own their outputs, and GQA
            groups are summed inside one program), so this is always honoured at no cost.
        backend: force "triton" or "reference" (or set FUSED_ATTN_BACKEND); None picks the first
            that can serve the call (see `fused_attn.explain`). A forced backend that cannot
            serve the call raises BackendError with its reasons.

    Returns:
        out: (B, Hq, Lq, Dv) in the input dtype, laid out like q (so a transposed (B, L, H, D)
            view in gives one out). With return_lse, also lse: (B, Hq, Lq) float32 (float64 for
            float64 input), natural log; differentiable.
        Rows that see no key (causal with bottom-right alignment and Lq > Lk) give out = 0,
        lse = -inf and zero gradients, never NaN. Accumulation is fp32 for every input dtype.

    Raises:
        TypeError/ValueError naming the argument for bad input, before any kernel runs.
    """
    check_qkv(q, k, v)
    opts = make_options(q, causal=causal, causal_alignment=causal_alignment, scale=scale,
                        deterministic=deterministic)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    name = select_backend(q, k, v, opts, backend)
    out, lse = attention_forward(q, k, v, opts.causal, opts.bottom_right, opts.scale, opts.deterministic, name)
    return (out, lse) if return_lse else out


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    causal_alignment: str = "top_left",
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: Optional[str] = None,
) -> str:
    """Which backend `attention(q, k, v, **same keywords)` would run, and why each other would not.

    Returns a multi-line report; nothing is computed. Invalid input raises as `attention` would.
    """
    check_qkv(q, k, v)
    opts = make_options(q, causal=causal, causal_alignment=causal_alignment, scale=scale,
                        deterministic=deterministic)
    return explain_choice(q, k, v, opts, backend)
