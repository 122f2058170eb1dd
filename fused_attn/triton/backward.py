"""Backward pass: recompute the probabilities from q, k and the saved lse, then

    dv = p'^T @ do           dp = (do @ v^T) * keep / (1 - p_drop)      p' = p * keep / (1 - p_drop)
    ds = p * (dp - delta)    delta = rowsum(do * out) - dlse            (= d loss / d scores = d bias)
    dq = scale * ds' @ k     dk = scale * ds'^T @ q                     ds' = ds * softcap'(scores)

Three launches: delta per query row; dk/dv per key block (looping over the query rows, and over
every query head of a GQA group, so a group's gradient is summed in registers; its tiles are
transposed, keys x queries, so that every product has the block's keys as rows, which Hopper's
wgmma needs 64 of); dq per query block. No atomics anywhere, so gradients are bitwise
reproducible run to run. The bias gradient, when asked for, is a fourth launch (bias_grad.py).
With TMA tiles (tuning.py) the tiles each loop streams (q and do for dk/dv, k and v for dq) are
copied by Hopper's copy engine.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import fill_unused_rows, gradient_like, new_output
from ..options import AttentionOptions, AttentionTensors
from .common import (
    LOG2_E,
    ProblemShape,
    bhld_strides,
    row_stat_strides,
    sequence_bounds,
    stage_bounds,
    dropout_keep,
    feature_arguments,
    head_dim_block,
    head_state,
    load_box,
    load_tile,
    num_blocks,
    offset_of,
    score_tile,
    streamed_operands,
    streamed_tiles,
    takes_tensor_descriptors,
    visible_pairs,
    visible_span,
)
from .tuning import ShapeClass, mask_bytes, select


@triton.jit
def _delta_kernel(
    Out, DOut, DLse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_glb, stride_glh, stride_glm, stride_lb, stride_lh,
    num_heads, seqlen_q, CuSeqQ,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, VARLEN: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
):
    """delta_i = sum_d do_id * out_id - dlse_i, in fp32, laid out like lse."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    start_q, seqlen_q, _, _, _ = sequence_bounds(CuSeqQ, CuSeqQ, batch, seqlen_q, seqlen_q, VARLEN, False)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    inside = (rows[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V)
    positions = start_q + rows
    out = tl.load(Out + batch * stride_ob + head * stride_oh + offset_of(positions, stride_om, INT64_OFFSETS)[:, None]
                  + offs_dv[None, :] * stride_od, mask=inside, other=0.0).to(tl.float32)
    dout = tl.load(DOut + batch * stride_gb + head * stride_gh + offset_of(positions, stride_gm, INT64_OFFSETS)[:, None]
                   + offs_dv[None, :] * stride_gd, mask=inside, other=0.0).to(tl.float32)
    dlse = tl.load(DLse + batch * stride_glb + head * stride_glh + offset_of(positions, stride_glm, INT64_OFFSETS),
                   mask=rows < seqlen_q, other=0.0)
    tl.store(Delta + batch * stride_lb + head * stride_lh + positions, tl.sum(out * dout, 1) - dlse,
             mask=rows < seqlen_q)


@triton.jit
def load_row_stats(Lse, Delta, row_base, rows, seqlen_q):
    """Base-2 lse and delta of a query block. Empty rows (lse -inf) get +inf so that p = 0."""
    in_range = rows < seqlen_q
    lse = tl.load(Lse + row_base + rows, mask=in_range, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2_E
    delta = tl.load(Delta + row_base + rows, mask=in_range, other=0.0)
    return lse, delta


@triton.jit
def backward_tile(
    q, k, v, dout, lse, delta, rows, cols, seqlen_q, seqlen_k,
    mask_ptr, stride_mm, stride_mn, slope, seed_lo, seed_hi, batch_head, threshold, inv_keep,
    shift, left, right, scale, softcap,
    CHECK_WINDOW: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, KEYS_AS_ROWS: tl.constexpr = False,
):
    """For a tile of queries `rows` and keys `cols`: the dropped probabilities p', the score
    gradient ds (= bias gradient) and ds' (through the softcap), from q (M, D), k (N, D), v (N, Dv),
    dout (M, Dv). Tiles are (M x N), or with KEYS_AS_ROWS their transposes (N x M): then the
    products dk and dv take next, ds'^T q and p'^T dout, have the keys as rows, as do the two
    here, and every product of the dk/dv kernel is one Hopper's wgmma can take at 32 queries
    (a warpgroup covers 64 rows)."""
    if KEYS_AS_ROWS:
        q_index, k_index = rows[None, :], cols[:, None]
        qk = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    else:
        q_index, k_index = rows[:, None], cols[None, :]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    scores, capped = score_tile(qk, q_index, k_index, seqlen_q, seqlen_k, mask_ptr, stride_mm, stride_mn, slope,
                                shift, left, right, scale, softcap,
                                CHECK_WINDOW, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, MASK_KIND, INT64_OFFSETS)
    if KEYS_AS_ROWS:
        probs = tl.math.exp2(scores - lse[None, :])
        dprobs = tl.dot(v, tl.trans(dout), input_precision=DOT_PRECISION)
        row_delta = delta[None, :]
    else:
        probs = tl.math.exp2(scores - lse[:, None])
        dprobs = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
        row_delta = delta[:, None]
    dropped = probs
    if DROPOUT:
        keep = dropout_keep(seed_lo, seed_hi, q_index, k_index, batch_head, threshold)
        dropped = tl.where(keep, probs * inv_keep, 0.0)
        dprobs = tl.where(keep, dprobs * inv_keep, 0.0)
    dscores = probs * (dprobs - row_delta)
    dscores_raw = dscores
    if SOFTCAP:
        dscores_raw = dscores * (1.0 - capped * capped)
    return dropped, dscores, dscores_raw


@triton.jit
def _dkdv_query_blocks(
    dk, dv, k, v, q_ptrs, do_ptrs, Lse, Delta, row_base, stride_qm, stride_gm,
    offs_m, cols, offs_d, offs_dv, start, stop, seqlen_q, seqlen_k,
    mask_ptr, stride_mm, stride_mn, slope, seed_lo, seed_hi, batch_head, threshold, inv_keep,
    shift, left, right, scale, softcap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, CHECK_WINDOW: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr, INT64_OFFSETS: tl.constexpr, batch, head,
):
    """Accumulate dk, dv of one key block over query blocks [start, stop) of one head, but those
    a bool mask hides. q_ptrs and do_ptrs point at the first block's tiles, or with TMA are Q's and
    dO's descriptors.

    Out-of-range query rows load q = do = 0 and lse = +inf, so their p is 0.
    """
    for start_m in range(start, stop, BLOCK_M):
        rows = start_m + offs_m
        if visible_pairs(mask_ptr, rows[:, None], cols[None, :], seqlen_q, seqlen_k, stride_mm, stride_mn,
                         MASK_KIND, INT64_OFFSETS) > 0:
            if TMA:
                q = load_box(q_ptrs, batch, head, start_m, UPCAST)
                dout = load_box(do_ptrs, batch, head, start_m, UPCAST)
            else:
                q = load_tile(q_ptrs + offset_of(start_m, stride_qm, INT64_OFFSETS), rows, seqlen_q, offs_d, HEAD_DIM,
                              True, not EVEN_D, UPCAST)
                dout = load_tile(do_ptrs + offset_of(start_m, stride_gm, INT64_OFFSETS), rows, seqlen_q, offs_dv,
                                 HEAD_DIM_V, True, not EVEN_DV, UPCAST)
            lse, delta = load_row_stats(Lse, Delta, row_base, rows, seqlen_q)
            # (keys x queries) tiles: p'^T and ds'^T
            dropped, _, dscores = backward_tile(
                q, k, v, dout, lse, delta, rows, cols, seqlen_q, seqlen_k,
                mask_ptr, stride_mm, stride_mn, slope, seed_lo, seed_hi, batch_head, threshold, inv_keep,
                shift, left, right, scale, softcap,
                CHECK_WINDOW, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, MASK_KIND, DROPOUT, DOT_PRECISION,
                INT64_OFFSETS, KEYS_AS_ROWS=True,
            )
            dv += tl.dot(dropped.to(dout.dtype), dout, input_precision=DOT_PRECISION)
            dk += tl.dot(dscores.to(q.dtype), q, input_precision=DOT_PRECISION)
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
    stride_lb, stride_lh, num_heads_kv, group_size, seqlen_q, seqlen_k, CuSeqQ, CuSeqK,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn, Slopes, stride_sb, stride_sh,
    Seed, threshold, inv_keep, left, right, scale, softcap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, TMA: tl.constexpr = False,
):
    block_n = tl.program_id(0)
    batch_head_kv = tl.program_id(1)
    batch = (batch_head_kv // num_heads_kv).to(tl.int64)
    head_kv = (batch_head_kv % num_heads_kv).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV
    start_q, seqlen_q, start_k, seqlen_k, shift = sequence_bounds(CuSeqQ, CuSeqK, batch, seqlen_q, seqlen_k,
                                                                  VARLEN, BOTTOM_RIGHT)
    if block_n * BLOCK_N >= seqlen_k:  # packed sequences shorter than the longest one
        return

    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    K += batch * stride_kb + head_kv * stride_kh + offset_of(start_k, stride_kn, INT64_OFFSETS)
    V += batch * stride_vb + head_kv * stride_vh + offset_of(start_k, stride_vn, INT64_OFFSETS)
    DK += batch * stride_dkb + head_kv * stride_dkh + offset_of(start_k, stride_dkn, INT64_OFFSETS)
    DV += batch * stride_dvb + head_kv * stride_dvh + offset_of(start_k, stride_dvn, INT64_OFFSETS)
    k = load_tile(K + offset_of(cols, stride_kn, INT64_OFFSETS)[:, None] + offs_d[None, :] * stride_kd,
                  cols, seqlen_k, offs_d, HEAD_DIM, True, not EVEN_D, UPCAST)
    v = load_tile(V + offset_of(cols, stride_vn, INT64_OFFSETS)[:, None] + offs_dv[None, :] * stride_vd,
                  cols, seqlen_k, offs_dv, HEAD_DIM_V, True, not EVEN_DV, UPCAST)

    # Queries that see this key block: key j is seen by rows j - shift - right .. j - shift + left,
    # the forward window seen from the keys' side (bounds swapped, shift negated).
    lo, full_lo, full_hi, hi = visible_span(block_n * BLOCK_N, BLOCK_N, seqlen_q, -shift, right, left,
                                            HAS_RIGHT, HAS_LEFT, BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for member in range(0, group_size):  # every query head that shares this k/v head
        head = head_kv * group_size + member
        batch_head = batch * num_heads_kv * group_size + head
        q_base = batch * stride_qb + head * stride_qh + offset_of(start_q, stride_qm, INT64_OFFSETS)
        do_base = batch * stride_gb + head * stride_gh + offset_of(start_q, stride_gm, INT64_OFFSETS)
        q_ptrs = streamed_tiles(Q, q_base, offs_m, stride_qm, offs_d, stride_qd, TMA, VARLEN)
        do_ptrs = streamed_tiles(DOut, do_base, offs_m, stride_gm, offs_dv, stride_gd, TMA, VARLEN)
        row_base = batch * stride_lb + head * stride_lh + start_q
        mask_ptr, slope, seed_lo, seed_hi = head_state(Mask, stride_mb, stride_mh, Slopes, stride_sb, stride_sh,
                                                       Seed, batch, head, HAS_ALIBI, MASK_KIND, DROPOUT)
        for stage in tl.static_range(3):
            start, stop = stage_bounds(stage, lo, full_lo, full_hi, hi)
            dk, dv = _dkdv_query_blocks(
                dk, dv, k, v, q_ptrs, do_ptrs, Lse, Delta, row_base, stride_qm, stride_gm,
                offs_m, cols, offs_d, offs_dv, start, stop, seqlen_q, seqlen_k,
                mask_ptr, stride_mm, stride_mn, slope, seed_lo, seed_hi, batch_head, threshold, inv_keep,
                shift, left, right, scale, softcap,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, EVEN_D, EVEN_DV, stage != 1,
                HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, MASK_KIND, DROPOUT, UPCAST, DOT_PRECISION,
                TMA, INT64_OFFSETS, batch.to(tl.int32), head.to(tl.int32),
            )

    inside_d = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    inside_dv = (cols[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V)
    tl.store(DK + offset_of(cols, stride_dkn, INT64_OFFSETS)[:, None] + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=inside_d)
    tl.store(DV + offset_of(cols, stride_dvn, INT64_OFFSETS)[:, None] + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=inside_dv)


@triton.jit
def _dq_key_blocks(
    dq, q, dout, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
    rows, offs_n, offs_d, offs_dv, start, stop, seqlen_q, seqlen_k,
    mask_ptr, stride_mm, stride_mn, slope, seed_lo, seed_hi, batch_head, threshold, inv_keep,
    shift, left, right, scale, softcap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, CHECK_WINDOW: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr, INT64_OFFSETS: tl.constexpr, batch, head_kv,
):
    """Accumulate dq of one query block over key blocks [start, stop), but those a bool mask hides.
    k_ptrs and v_ptrs point at the first block's tiles, or with TMA are K's and V's descriptors."""
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        if visible_pairs(mask_ptr, rows[:, None], cols[None, :], seqlen_q, seqlen_k, stride_mm, stride_mn,
                         MASK_KIND, INT64_OFFSETS) > 0:
            if TMA:
                k = load_box(k_ptrs, batch, head_kv, start_n, UPCAST)
                v = load_box(v_ptrs, batch, head_kv, start_n, UPCAST)
            else:
                k = load_tile(k_ptrs + offset_of(start_n, stride_kn, INT64_OFFSETS), cols, seqlen_k, offs_d, HEAD_DIM,
                              CHECK_WINDOW, not EVEN_D, UPCAST)
                v = load_tile(v_ptrs + offset_of(start_n, stride_vn, INT64_OFFSETS), cols, seqlen_k, offs_dv,
                              HEAD_DIM_V, CHECK_WINDOW, not EVEN_DV, UPCAST)
            _, _, dscores = backward_tile(
                q, k, v, dout, lse, delta, rows, cols, seqlen_q, seqlen_k,
                mask_ptr, stride_mm, stride_mn, slope, seed_lo, seed_hi, batch_head, threshold, inv_keep,
                shift, left, right, scale, softcap,
                CHECK_WINDOW, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, MASK_KIND, DROPOUT, DOT_PRECISION,
                INT64_OFFSETS,
            )
            dq += tl.dot(dscores.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh, num_heads, group_size, seqlen_q, seqlen_k, CuSeqQ, CuSeqK,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn, Slopes, stride_sb, stride_sh,
    Seed, threshold, inv_keep, left, right, scale, softcap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr, TMA: tl.constexpr = False,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    head_kv = head // group_size
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV
    start_q, seqlen_q, start_k, seqlen_k, shift = sequence_bounds(CuSeqQ, CuSeqK, batch, seqlen_q, seqlen_k,
                                                                  VARLEN, BOTTOM_RIGHT)
    if block_m * BLOCK_M >= seqlen_q:
        return

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    Q += batch * stride_qb + head * stride_qh + offset_of(start_q, stride_qm, INT64_OFFSETS)
    DOut += batch * stride_gb + head * stride_gh + offset_of(start_q, stride_gm, INT64_OFFSETS)
    DQ += batch * stride_dqb + head * stride_dqh + offset_of(start_q, stride_dqm, INT64_OFFSETS)
    q = load_tile(Q + offset_of(rows, stride_qm, INT64_OFFSETS)[:, None] + offs_d[None, :] * stride_qd,
                  rows, seqlen_q, offs_d, HEAD_DIM, True, not EVEN_D, UPCAST)
    dout = load_tile(DOut + offset_of(rows, stride_gm, INT64_OFFSETS)[:, None] + offs_dv[None, :] * stride_gd,
                     rows, seqlen_q, offs_dv, HEAD_DIM_V, True, not EVEN_DV, UPCAST)
    lse, delta = load_row_stats(Lse, Delta, batch * stride_lb + head * stride_lh + start_q, rows, seqlen_q)
    k_base = batch * stride_kb + head_kv * stride_kh + offset_of(start_k, stride_kn, INT64_OFFSETS)
    v_base = batch * stride_vb + head_kv * stride_vh + offset_of(start_k, stride_vn, INT64_OFFSETS)
    k_ptrs = streamed_tiles(K, k_base, offs_n, stride_kn, offs_d, stride_kd, TMA, VARLEN)
    v_ptrs = streamed_tiles(V, v_base, offs_n, stride_vn, offs_dv, stride_vd, TMA, VARLEN)
    mask_ptr, slope, seed_lo, seed_hi = head_state(Mask, stride_mb, stride_mh, Slopes, stride_sb, stride_sh, Seed,
                                                   batch, head, HAS_ALIBI, MASK_KIND, DROPOUT)

    lo, full_lo, full_hi, hi = visible_span(block_m * BLOCK_M, BLOCK_M, seqlen_k, shift, left, right,
                                            HAS_LEFT, HAS_RIGHT, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for stage in tl.static_range(3):
        start, stop = stage_bounds(stage, lo, full_lo, full_hi, hi)
        dq = _dq_key_blocks(
            dq, q, dout, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
            rows, offs_n, offs_d, offs_dv, start, stop, seqlen_q, seqlen_k,
            mask_ptr, stride_mm, stride_mn, slope, seed_lo, seed_hi, batch_head, threshold, inv_keep,
            shift, left, right, scale, softcap,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, EVEN_D, EVEN_DV, stage != 1,
            HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, MASK_KIND, DROPOUT, UPCAST, DOT_PRECISION,
            TMA, INT64_OFFSETS, batch.to(tl.int32), head_kv.to(tl.int32),
        )
    tl.store(DQ + offset_of(rows, stride_dqm, INT64_OFFSETS)[:, None] + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty),
             mask=(rows[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))


def attention_backward(
    dout: torch.Tensor,
    dlse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    extras: AttentionTensors,
    opts: AttentionOptions,
    bias_requires_grad: bool,
):
    """Launch the backward kernels. Shapes and layouts as in backends/base.py (varlen: packed)."""
    from .bias_grad import bias_gradient

    problem = ProblemShape.of(q, k, v, extras, opts)
    heads_q, heads_kv, head_dim, head_dim_v = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    block_d, block_dv = head_dim_block(head_dim), head_dim_block(head_dim_v)
    dq, dk, dv = (gradient_like(t) for t in (q, k, v))
    features, flags = feature_arguments(q, k, extras, opts, addressed=(v, out, dout, dq, dk, dv))
    lse_strides = row_stat_strides(lse)[:2]

    # Two fp32 (rows x Dv) tiles per program: 64 rows while they stay in registers.
    delta_rows = max(16, min(64, 8192 // block_dv))
    delta = new_output(lse, tuple(lse.shape), torch.float32)
    _delta_kernel[(num_blocks(problem.seqlen_q, delta_rows), problem.batch * heads_q)](
        out, dout, dlse, delta, *bhld_strides(out), *bhld_strides(dout), *row_stat_strides(dlse), *lse_strides,
        heads_q, problem.rows_q, problem.cu_seqlens_q,
        HEAD_DIM_V=head_dim_v, BLOCK_M=delta_rows, BLOCK_DV=block_dv, VARLEN=problem.varlen,
        INT64_OFFSETS=flags["INT64_OFFSETS"],
    )

    strides = (*bhld_strides(q), *bhld_strides(k), *bhld_strides(v), *bhld_strides(dout))

    def launch_options(tiles):
        return dict(
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
            BLOCK_D=block_d, BLOCK_DV=block_dv, TMA=tiles.tma, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages, **flags,
        )

    def dkdv_grid(tiles):
        return num_blocks(problem.seqlen_k, tiles.block_n), problem.batch * heads_kv

    def launch_dkdv(tiles):
        q_tiles, do_tiles = streamed_operands(tiles.tma, tiles.block_m, q, dout)
        _dkdv_kernel[dkdv_grid(tiles)](
            q_tiles, k, v, do_tiles, lse, delta, dk, dv, *strides, *bhld_strides(dk), *bhld_strides(dv), *lse_strides,
            heads_kv, problem.group_size, *problem.sequence_arguments(), *features, **launch_options(tiles),
        )

    def dq_grid(tiles):
        return num_blocks(problem.seqlen_q, tiles.block_m), problem.batch * heads_q

    def launch_dq(tiles):
        k_tiles, v_tiles = streamed_operands(tiles.tma, tiles.block_n, k, v)
        _dq_kernel[dq_grid(tiles)](
            q, k_tiles, v_tiles, dout, lse, delta, dq, *strides, *bhld_strides(dq), *lse_strides,
            heads_q, problem.group_size, *problem.sequence_arguments(), *features, **launch_options(tiles),
        )

    for kernel, launch, grid, tma in (("dkdv", launch_dkdv, dkdv_grid, takes_tensor_descriptors(q, dout)),
                                      ("dq", launch_dq, dq_grid, takes_tensor_descriptors(k, v))):
        shape = ShapeClass.of(kernel, q, v, opts)
        launch(select(shape, q.device, launch, grid, mask_bytes=mask_bytes(extras), reproducible=opts.deterministic,
                      tma=tma))
    if problem.varlen:  # packed rows after the last sequence take no part: zero gradients
        fill_unused_rows(dq, 0, extras.cu_seqlens_q, 0.0)
        for grad in (dk, dv):
            fill_unused_rows(grad, 0, extras.cu_seqlens_k, 0.0)
    dbias = bias_gradient(dout, q, k, v, lse, delta, extras, opts, features, flags) if bias_requires_grad else None
    return dq, dk, dv, dbias
