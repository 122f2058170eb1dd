"""fused_attn.varlen_attention: packed batches of sequences of different lengths, no padding."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import plans
from .autocast import autocast_inputs
from .checks import (boundaries_valid, check_alibi_slopes, check_cu_seqlens, check_cu_seqlens_values, check_dense,
                     check_packed_qkv, make_options)
from .dispatch import select_backend
from .dropout import draw_seed
from .ops import attention_op
from .options import AttentionOptions, AttentionTensors

Tensor = torch.Tensor


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    causal_alignment: str = "top_left",
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over a packed batch: sequence b is rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1.

    Args:
        q: (total_q, Hq, D), the queries of every sequence back to back.
        k: (total_k, Hkv, D); v: (total_k, Hkv, Dv). Hq a multiple of Hkv (GQA), as in `attention`.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths, starting at 0. Query
            sequence b attends only to key sequence b; no work is spent on padding.
        max_seqlen_q, max_seqlen_k: the longest query and key sequence, or any larger bound (ints;
            they size the grid, up to the packed totals).
        Keywords: as in `fused_attn.attention` (causal alignment, window and ALiBi shifts are per
            sequence: bottom-right aligns each sequence's last query with its last key), except
            attn_mask, which packed sequences do not take. Dropout counters use the sequence's
            batch index and its local positions.

    Returns:
        out (total_q, Hq, Dv) in the input dtype; with return_lse also lse (Hq, total_q) float32
        (float64 for float64 input).

    cu_seqlens are checked on the host as fused_attn/host_checks.py says (a sync on GPUs, once per
    tensor and version). Where they are not (a CUDA graph captured, torch.compile,
    FUSED_ATTN_HOST_CHECKS=0, inference-mode tensors after their first call), the call judges them
    on the device instead: invalid ones give NaN out, lse and gradients, never wrong rows (the cpu
    backend's op checks them itself and raises a RuntimeError, but for a max_seqlen too small).
    Under torch.jit.trace, max_seqlen_q and max_seqlen_k are constants of the trace (they size the
    kernels' grids): cu_seqlens given to the traced module later must keep every sequence within
    them, which it does not check.
    """
    q, k, v = autocast_inputs(q, k, v)
    arguments = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, causal_alignment, scale, dropout_p,
                 window, alibi_slopes, softcap, return_lse, deterministic)
    key = plans.signature("varlen_attention", (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes),
                          (max_seqlen_q, max_seqlen_k, causal, causal_alignment, scale, dropout_p, window, softcap,
                           return_lse, deterministic, backend))
    opts, name = plans.recall(key) or plans.remember(key, _plan(q, k, v, *arguments, backend=backend))
    verified = check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    verified &= check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    extras = AttentionTensors(alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if opts.dropout_p > 0:
        extras = extras._replace(dropout_seed=draw_seed(q.device))
    out, lse = attention_op(q, k, v, None, extras, opts, name)
    if not verified:
        out, lse = _nan_unless_valid(out, lse, (cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     (cu_seqlens_k, k.shape[0], max_seqlen_k))
    return (out, lse) if return_lse else out


def _nan_unless_valid(out: Tensor, lse: Tensor, *boundaries: tuple) -> tuple[Tensor, Tensor]:
    """out and lse as they are, or NaN throughout (gradients too) when some cu_seqlens are invalid,
    judged on the device, for boundaries the host did not verify (a CUDA graph captured,
    torch.compile, FUSED_ATTN_HOST_CHECKS=0, inference-mode tensors after their first check). The
    kernels clamp such boundaries into the packed rows (never reading past them); the rows they
    then give are wrong, and this makes them NaN rather than silently wrong."""
    valid = boundaries_valid(*boundaries[0])
    for bounds in boundaries[1:]:
        valid = valid & boundaries_valid(*bounds)
    factor = torch.where(valid, 1.0, float("nan"))  # times 1 changes no bit; NaN reaches the gradients too
    return out * factor, lse * factor


def _plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, causal_alignment, scale, dropout_p,
          window, alibi_slopes, softcap, return_lse, deterministic, *, backend) -> tuple[AttentionOptions, str]:
    """What a call with these arguments runs with (its options and backend) after every check but
    those of cu_seqlens's values (plans.py keeps it for the calls like it)."""
    check_dense(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes)
    check_packed_qkv(q, k, v)
    opts = make_options(q.transpose(0, 1), causal=causal, causal_alignment=causal_alignment, scale=scale,
                        window=window, softcap=softcap, dropout_p=dropout_p, deterministic=deterministic,
                        reach=q.shape[0] + k.shape[0])
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, max_seqlen_q, "max_seqlen_q", q.device)
    batch = cu_seqlens_q.shape[0] - 1
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, max_seqlen_k, "max_seqlen_k", q.device, batch)
    check_alibi_slopes(alibi_slopes, batch, q.shape[1], q.device)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    opts = opts._replace(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    extras = AttentionTensors(alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return opts, select_backend(q, k, v, extras, opts, backend)
