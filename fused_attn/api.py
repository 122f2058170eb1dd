"""fused_attn.attention: the public entry point."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import plans
from .autocast import autocast_inputs
from .checks import check_alibi_slopes, check_attn_mask, check_dense, check_qkv, make_options
from .dispatch import explain_choice, select_backend
from .dropout import draw_seed
from .ops import attention_op, split_mask
from .options import AttentionOptions, AttentionTensors

Tensor = torch.Tensor


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    causal_alignment: str = "top_left",
    scale: Optional[float] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Exact scaled-dot-product attention, softmax(scale * q @ k^T + bias) @ v, without the L x L matrix.

    Args:
        q: (B, Hq, Lq, D) queries.
        k: (B, Hkv, Lk, D) keys. Hq must be a multiple of Hkv: Hkv < Hq is grouped-query
            attention (GQA), Hkv = 1 multi-query attention; shared k/v are never copied.
        v: (B, Hkv, Lk, Dv) values; Dv may differ from D.
            q, k and v share one dtype (float16, bfloat16, float32; float64 in the `reference`
            backend) and one device, head dims are 1..256, and any strides work without a copy
            (a transposed view of a (B, L, H, D) tensor is the common case; the cuda backend
            copies a tensor whose last dim is not contiguous).
        causal: query i sees key j only when j <= i + shift.
        causal_alignment: the shift: "top_left" 0 (torch SDPA's is_causal), "bottom_right"
            Lk - Lq (flash-attn, KV caches: the last query sees every key). The two differ only
            when Lq != Lk. Windows and ALiBi use the same shift.
        scale: multiplier of q @ k^T; defaults to 1 / sqrt(D).
        attn_mask: broadcastable to (B, Hq, Lq, Lk) (size-1 dims are read with stride 0, never
            expanded). bool: True = attend (SDPA's convention). float (q's dtype or float32):
            added to the scores; -inf masks. If it requires grad, its gradient is returned with
            its own shape, summed over its broadcast dims.
        dropout_p: probability in [0, 1) of dropping an attention probability (the kept ones are
            scaled by 1 / (1 - p)). Random bits come from a Philox stream keyed by torch's
            generator for q's device: torch.manual_seed reproduces a call, the backward pass
            regenerates the same mask, and `fused_attn.dropout_keep_mask` materializes it.
        window: (left, right): query i sees keys i + shift - left .. i + shift + right; -1 means
            unbounded on that side (as does any bound >= Lq + Lk). Combines with causal (which
            sets right to 0).
        alibi_slopes: float32 (Hq,) or (B, Hq): adds -slope * |i + shift - j| to the scores.
            Not differentiated.
        softcap: if > 0, scores become softcap * tanh(scores / softcap) before bias and masks.
        return_lse: also return the row log-sum-exp of the final scores (before dropout).
        deterministic: ask for the same bits in every run and process. Every backend computes
            gradients without atomics (the dq and dk/dv passes each own their outputs, and GQA
            groups are summed inside one program), so one process repeats its bits anyway; the
            triton backend may also run tiles tuned by timing in this process, which can differ
            between runs, and with deterministic=True takes only fixed or shipped tiles.
        backend: force "triton", "cuda", "cpu" or "reference" (or set FUSED_ATTN_BACKEND); None
            picks the first that can serve the call (see `fused_attn.explain`). A forced backend that cannot
            serve the call raises BackendError with its reasons.

    Returns:
        out: (B, Hq, Lq, Dv) in the input dtype, laid out like q (so a transposed (B, L, H, D)
            view in gives one out). With return_lse, also lse: (B, Hq, Lq) float32 (float64 for
            float64 input), natural log; differentiable.
        Inside torch.autocast, float32 q, k, v and float mask are cast to its dtype first, as
        torch does for its SDPA. Rows that see no key, whatever masked them, give out = 0,
        lse = -inf and zero gradients, never NaN. Accumulation is fp32 for every input dtype.
        Second derivatives (differentiating the gradients, create_graph=True) come from the
        reference backend; differentiating another backend's gradients raises RuntimeError.

    Raises:
        TypeError/ValueError naming the argument for bad input, before any kernel runs.
    """
    q, k, v, attn_mask = autocast_inputs(q, k, v, attn_mask)
    key = plans.signature("attention", (q, k, v, attn_mask, alibi_slopes),
                          (causal, causal_alignment, scale, dropout_p, window, softcap, return_lse, deterministic,
                           backend))
    opts, name = plans.recall(key) or plans.remember(key, plan_attention(
        q, k, v, causal, causal_alignment, scale, attn_mask, dropout_p, window, alibi_slopes, softcap, return_lse,
        deterministic, backend))
    out, lse = run_planned(q, k, v, attn_mask, alibi_slopes, opts, name)
    return (out, lse) if return_lse else out


def run_planned(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor],
                opts: AttentionOptions, backend: str) -> tuple[Tensor, Tensor]:
    """(out, lse) of `attention` on arguments that passed `plan_attention`, which gave opts and backend."""
    extras = AttentionTensors(*split_mask(attn_mask), alibi_slopes)
    if opts.dropout_p > 0:
        extras = extras._replace(dropout_seed=draw_seed(q.device))
    return attention_op(q, k, v, attn_mask, extras, opts, backend)


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    causal_alignment: str = "top_left",
    scale: Optional[float] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: Optional[str] = None,
) -> str:
    """Which backend `attention(q, k, v, **same keywords)` would run, and why each other would not.

    Returns a multi-line report; nothing is computed. Invalid input raises as `attention` would.
    A call the chosen backend runs by another path than its plain kernels is reported with that
    path: a decoding kernel (fewer queries than keys, few query rows per key/value head), or the
    cpu backend's decoding path (keys split across tasks), which its forward takes for every dense
    call no backward follows that has no mask, bias or dropout.
    """
    opts, extras = _validate(q, k, v, causal, causal_alignment, scale, attn_mask, dropout_p, window,
                             alibi_slopes, softcap, return_lse, deterministic)
    return explain_choice(q, k, v, extras, opts, backend)


def plan_attention(q, k, v, causal, causal_alignment, scale, attn_mask, dropout_p, window, alibi_slopes, softcap,
                   return_lse, deterministic, backend) -> tuple[AttentionOptions, str]:
    """What `attention` with these arguments runs with: its options and its backend's name, after
    every check (raising as `attention` does). plans.py keeps it for the calls like it."""
    opts, extras = _validate(q, k, v, causal, causal_alignment, scale, attn_mask, dropout_p, window, alibi_slopes,
                             softcap, return_lse, deterministic)
    return opts, select_backend(q, k, v, extras, opts, backend)


def _validate(q, k, v, causal, causal_alignment, scale, attn_mask, dropout_p, window, alibi_slopes, softcap,
              return_lse, deterministic) -> tuple[AttentionOptions, AttentionTensors]:
    check_dense(q=q, k=k, v=v, attn_mask=attn_mask, alibi_slopes=alibi_slopes)
    check_qkv(q, k, v)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    opts = make_options(q, causal=causal, causal_alignment=causal_alignment, scale=scale, window=window,
                        softcap=softcap, dropout_p=dropout_p, deterministic=deterministic,
                        reach=q.shape[2] + k.shape[2])
    check_attn_mask(attn_mask, q, k)
    check_alibi_slopes(alibi_slopes, q.shape[0], q.shape[1], q.device)
    # The seed is drawn only when the call runs; dispatch just needs to know dropout is on.
    mask, bias = split_mask(attn_mask)
    return opts, AttentionTensors(mask=mask, bias=bias, alibi_slopes=alibi_slopes)
