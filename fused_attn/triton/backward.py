"""Backward pass: recompute the probabilities from q, k and the saved lse, then

    dv = p^T @ do            dp = do @ v^T
    ds = p * (dp - delta)    delta = rowsum(do * out) - dlse
    dq = scale * ds @ k      dk = scale * ds^T @ q

Three launches: delta per query row; dk/dv per key block (looping over the query rows, and over
every query head of a GQA group, so a group's gradient is summed in registers); dq per query
block. No atomics anywhere, so gradients are bitwise reproducible run to run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import empty_like_layout, new_output
from ..options import AttentionOptions
from .common import (
    LOG2_E,
    causal_visible,
    dot_precision,
    head_dim_block,
    load_tile,
    num_blocks,
    tile_config,
    upcast_tiles,
)


@triton.jit
def _delta_kernel(
    Out, DOut, DLse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    num_heads, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta_i = sum_d do_id * out_id - dlse_i, in fp32."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    inside = (offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V)
    out = tl.load(Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om
                  + offs_dv[None, :] * stride_od, mask=inside, other=0.0).to(tl.float32)
    dout = tl.load(DOut + batch * stride_gb + head * stride_gh + offs_m[:, None] * stride_gm
                   + offs_dv[None, :] * stride_gd, mask=inside, other=0.0).to(tl.float32)
    dlse = tl.load(DLse + batch * stride_lb + head * stride_lh + offs_m * stride_lm,
                   mask=offs_m < seqlen_q, other=0.0)
    tl.store(Delta + batch_head.to(tl.int64) * seqlen_q + offs_m, tl.sum(out * dout, 1) - dlse,
             mask=offs_m < seqlen_q)


@triton.jit
def _load_row_stats(Lse, Delta, row_base, offs_m, seqlen_q):
    """Base-2 lse and delta of a query block. Empty rows (lse -inf) get +inf so that p = 0."""
    in_range = offs_m < seqlen_q
    lse = tl.load(Lse + row_base + offs_m, mask=in_range, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + row_base + offs_m, mask=in_range, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_query_blocks(
    dk, dv, k, v, q_ptrs, do_ptrs, Lse, Delta, row_base, stride_qm, stride_gm,
    offs_m, offs_n, offs_d, offs_dv, start, stop,
    seqlen_q, causal_offset, qk_scale_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, MASKED: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dk, dv of one key block over query blocks [start, stop) of one head.

    Works on transposed tiles (keys x queries) so dk and dv accumulate without transposes.
    Out-of-range query rows load q = do = 0 and lse = +inf, so their p is 0: no bounds mask needed.
    """
    for start_m in range(start, stop, BLOCK_M):
        rows = start_m + offs_m
        q = load_tile(q_ptrs + start_m * stride_qm, rows, seqlen_q, offs_d, HEAD_DIM, True, not EVEN_D, UPCAST)
        dout = load_tile(do_ptrs + start_m * stride_gm, rows, seqlen_q, offs_dv, HEAD_DIM_V, True, not EVEN_DV,
                         UPCAST)
        lse, delta = _load_row_stats(Lse, Delta, row_base, rows, seqlen_q)
        logits_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
        probs_t = tl.math.exp2(logits_t - lse[None, :])
        if MASKED:
            probs_t = tl.where(tl.trans(causal_visible(rows, offs_n, causal_offset)), probs_t, 0.0)
        dv += tl.dot(probs_t.to(dout.dtype), dout, input_precision=DOT_PRECISION)
        dprobs_t = tl.dot(v, tl.trans(dout), input_precision=DOT_PRECISION)
        dscores_t = probs_t * (dprobs_t - delta[None, :])
        dk += tl.dot(dscores_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads_kv, group_size, seqlen_q, seqlen_k, causal_offset, scale, qk_scale_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block_n = tl.program_id(0)
    batch_head_kv = tl.program_id(1)
    batch = (batch_head_kv // num_heads_kv).to(tl.int64)
    head_kv = (batch_head_kv % num_heads_kv).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV

    start_n = block_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_tile(K + batch * stride_kb + head_kv * stride_kh + offs_n[:, None] * stride_kn
                  + offs_d[None, :] * stride_kd, offs_n, seqlen_k, offs_d, HEAD_DIM, True, not EVEN_D, UPCAST)
    v = load_tile(V + batch * stride_vb + head_kv * stride_vh + offs_n[:, None] * stride_vn
                  + offs_dv[None, :] * stride_vd, offs_n, seqlen_k, offs_dv, HEAD_DIM_V, True, not EVEN_DV,
                  UPCAST)

    # Query rows that see this key block: causal row i sees key j when i >= j - causal_offset.
    # Rows from `full_start` on see every key of the block and need no causal mask.
    start = 0
    full_start = 0
    if CAUSAL:
        start = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        first_full_row = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)
        full_start = start + tl.cdiv(tl.maximum(first_full_row - start, 0), BLOCK_M) * BLOCK_M
        full_start = tl.minimum(full_start, tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for member in range(0, group_size):  # every query head that shares this k/v head
        head = head_kv * group_size + member
        q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_ptrs = (DOut + batch * stride_gb + head * stride_gh + offs_m[:, None] * stride_gm
                   + offs_dv[None, :] * stride_gd)
        row_base = (batch * num_heads_kv * group_size + head) * seqlen_q
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_ptrs, do_ptrs, Lse, Delta, row_base, stride_qm, stride_gm,
            offs_m, offs_n, offs_d, offs_dv, start, full_start,
            seqlen_q, causal_offset, qk_scale_log2,
            HEAD_DIM, HEAD_DIM_V, BLOCK_M, EVEN_D, EVEN_DV, True, UPCAST, DOT_PRECISION,
        )
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_ptrs, do_ptrs, Lse, Delta, row_base, stride_qm, stride_gm,
            offs_m, offs_n, offs_d, offs_dv, full_start, seqlen_q,
            seqlen_q, causal_offset, qk_scale_log2,
            HEAD_DIM, HEAD_DIM_V, BLOCK_M, EVEN_D, EVEN_DV, False, UPCAST, DOT_PRECISION,
        )

    inside_d = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    inside_dv = (offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V)
    tl.store(DK + batch * stride_dkb + head_kv * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, (dk * scale).to(DK.dtype.element_ty), mask=inside_d)
    tl.store(DV + batch * stride_dvb + head_kv * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=inside_dv)


@triton.jit
def _dq_key_blocks(
    dq, q, dout, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
    offs_m, offs_n, offs_d, offs_dv, start, stop,
    seqlen_k, causal_offset, qk_scale_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dq of one query block over key blocks [start, stop)."""
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        k_t = load_tile(k_ptrs + start_n * stride_kn, offs_d, HEAD_DIM, cols, seqlen_k, not EVEN_D, MASKED, UPCAST)
        v_t = load_tile(v_ptrs + start_n * stride_vn, offs_dv, HEAD_DIM_V, cols, seqlen_k, not EVEN_DV, MASKED,
                        UPCAST)
        logits = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale_log2
        probs = tl.math.exp2(logits - lse[:, None])
        if MASKED:
            # Keys past seqlen_k load as 0 and would get p > 0: mask them with the causal ones.
            visible = cols[None, :] < seqlen_k
            if CAUSAL:
                visible = visible & causal_visible(offs_m, cols, causal_offset)
            probs = tl.where(visible, probs, 0.0)
        dprobs = tl.dot(dout, v_t, input_precision=DOT_PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        dq += tl.dot(dscores.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_heads, group_size, seqlen_q, seqlen_k, causal_offset, scale, qk_scale_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    head_kv = head // group_size
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_tile(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                  offs_m, seqlen_q, offs_d, HEAD_DIM, True, not EVEN_D, UPCAST)
    dout = load_tile(DOut + batch * stride_gb + head * stride_gh + offs_m[:, None] * stride_gm
                     + offs_dv[None, :] * stride_gd, offs_m, seqlen_q, offs_dv, HEAD_DIM_V, True, not EVEN_DV, UPCAST)
    lse, delta = _load_row_stats(Lse, Delta, batch_head.to(tl.int64) * seqlen_q, offs_m, seqlen_q)
    # k and v are both read transposed, (BLOCK_D, BLOCK_N), as in the forward pass.
    k_ptrs = K + batch * stride_kb + head_kv * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    v_ptrs = V + batch * stride_vb + head_kv * stride_vh + offs_dv[:, None] * stride_vd + offs_n[None, :] * stride_vn

    # Same key range and unmasked prefix as the forward pass.
    stop = seqlen_k
    if CAUSAL:
        stop = tl.minimum(seqlen_k, tl.maximum((block_m + 1) * BLOCK_M + causal_offset, 0))
    full_stop = (seqlen_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        first_row_sees = tl.maximum(block_m * BLOCK_M + causal_offset + 1, 0)
        full_stop = tl.minimum(full_stop, (first_row_sees // BLOCK_N) * BLOCK_N)
    full_stop = tl.minimum(full_stop, stop)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_key_blocks(
        dq, q, dout, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
        offs_m, offs_n, offs_d, offs_dv, 0, full_stop, seqlen_k, causal_offset, qk_scale_log2,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, EVEN_D, EVEN_DV, False, CAUSAL, UPCAST, DOT_PRECISION,
    )
    dq = _dq_key_blocks(
        dq, q, dout, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
        offs_m, offs_n, offs_d, offs_dv, full_stop, stop, seqlen_k, causal_offset, qk_scale_log2,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, EVEN_D, EVEN_DV, True, CAUSAL, UPCAST, DOT_PRECISION,
    )
    tl.store(DQ + batch * stride_dqb + head * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))


def attention_backward(
    dout: torch.Tensor,
    dlse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    opts: AttentionOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels. Shapes and layouts as in backends/base.py."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    group_size = heads_q // heads_kv
    causal_offset = opts.causal_offset(seqlen_q, seqlen_k)
    cfg = tile_config(max(head_dim, head_dim_v), q.dtype, backward=True)
    block_d, block_dv = head_dim_block(head_dim), head_dim_block(head_dim_v)
    flags = dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=opts.causal,
        UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    delta = new_output(q, (batch, heads_q, seqlen_q), torch.float32)
    _delta_kernel[(num_blocks(seqlen_q, cfg.block_m), batch * heads_q)](
        out, dout, dlse, delta, *out.stride(), *dout.stride(), *dlse.stride(), heads_q, seqlen_q,
        HEAD_DIM_V=head_dim_v, BLOCK_M=cfg.block_m, BLOCK_DV=block_dv,
    )

    dq = empty_like_layout(q, tuple(q.shape))
    dk = empty_like_layout(k, tuple(k.shape))
    dv = empty_like_layout(v, tuple(v.shape))
    qk_scale_log2 = opts.scale * LOG2_E
    _dkdv_kernel[(num_blocks(seqlen_k, cfg.block_n), batch * heads_kv)](
        q, k, v, dout, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        heads_kv, group_size, seqlen_q, seqlen_k, causal_offset, opts.scale, qk_scale_log2, **flags,
    )
    _dq_kernel[(num_blocks(seqlen_q, cfg.block_m), batch * heads_q)](
        q, k, v, dout, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        heads_q, group_size, seqlen_q, seqlen_k, causal_offset, opts.scale, qk_scale_log2, **flags,
    )
    return dq, dk, dv
