"""Forward pass: out = softmax(scores) @ v, streamed over key blocks, scores = scale * q @ k^T
(softcapped, plus ALiBi and bias, masked).

Each program owns BLOCK_M query rows of one (batch, head) and keeps, per row, the running max
m and sum l of exp2 of the base-2 scores, and the unnormalised output acc (online softmax).
Only out and the row log-sum-exp (for the backward pass) are written: memory is O(L).
With TMA tiles (tuning.py) k and v are copied by Hopper's copy engine through tensor descriptors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import attention_outputs, fill_unused_rows
from ..options import AttentionOptions, AttentionTensors
from .common import (
    LN_2,
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
def _forward_key_blocks(
    acc, row_max, row_sum, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
    rows, offs_n, offs_d, offs_dv, start, stop, seqlen_q, seqlen_k,
    mask_ptr, stride_mm, stride_mn, slope, seed_lo, seed_hi, batch_head, threshold,
    shift, left, right, scale, softcap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, CHECK_WINDOW: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr, INT64_OFFSETS: tl.constexpr, batch, head_kv,
):
    """Fold key blocks [start, stop) into the online softmax; those a bool mask hides are skipped.
    k_ptrs and v_ptrs point at the first block's tiles, or with TMA are K's and V's descriptors."""
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        q_index, k_index = rows[:, None], cols[None, :]
        if visible_pairs(mask_ptr, q_index, k_index, seqlen_q, seqlen_k, stride_mm, stride_mn, MASK_KIND,
                         INT64_OFFSETS) > 0:
            if TMA:
                k_t = load_box(k_ptrs, batch, head_kv, start_n, UPCAST).T
            else:
                k_t = load_tile(k_ptrs + offset_of(start_n, stride_kn, INT64_OFFSETS), offs_d, HEAD_DIM, cols,
                                seqlen_k, not EVEN_D, CHECK_WINDOW, UPCAST)
            qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
            scores, _ = score_tile(qk, q_index, k_index, seqlen_q, seqlen_k, mask_ptr, stride_mm, stride_mn, slope,
                                   shift, left, right, scale, softcap,
                                   CHECK_WINDOW, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, MASK_KIND, INT64_OFFSETS)
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            # A row that has seen no visible key keeps max -inf; shifting by 0 keeps exp2 at 0, not NaN.
            centre = tl.where(new_max == float("-inf"), 0.0, new_max)
            probs = tl.math.exp2(scores - centre[:, None])
            rescale = tl.math.exp2(row_max - centre)
            row_sum = row_sum * rescale + tl.sum(probs, 1)
            if DROPOUT:  # the normaliser keeps every probability; only the output sees the dropped ones
                probs = tl.where(dropout_keep(seed_lo, seed_hi, q_index, k_index, batch_head, threshold), probs, 0.0)
            if TMA:
                v = load_box(v_ptrs, batch, head_kv, start_n, UPCAST)
            else:
                v = load_tile(v_ptrs + offset_of(start_n, stride_vn, INT64_OFFSETS), cols, seqlen_k, offs_dv,
                              HEAD_DIM_V, CHECK_WINDOW, not EVEN_DV, UPCAST)
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
            row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
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
    head_kv = head // group_size  # GQA: query heads of one group read the same k/v
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV
    start_q, seqlen_q, start_k, seqlen_k, shift = sequence_bounds(CuSeqQ, CuSeqK, batch, seqlen_q, seqlen_k,
                                                                  VARLEN, BOTTOM_RIGHT)
    if block_m * BLOCK_M >= seqlen_q:  # packed sequences shorter than the longest one
        return

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    Q += batch * stride_qb + head * stride_qh + offset_of(start_q, stride_qm, INT64_OFFSETS)
    Out += batch * stride_ob + head * stride_oh + offset_of(start_q, stride_om, INT64_OFFSETS)
    Lse += batch * stride_lb + head * stride_lh + start_q
    q = load_tile(Q + offset_of(rows, stride_qm, INT64_OFFSETS)[:, None] + offs_d[None, :] * stride_qd,
                  rows, seqlen_q, offs_d, HEAD_DIM, True, not EVEN_D, UPCAST)
    # k is read transposed, (BLOCK_D, BLOCK_N), so q @ k^T is a plain dot.
    k_base = batch * stride_kb + head_kv * stride_kh + offset_of(start_k, stride_kn, INT64_OFFSETS)
    v_base = batch * stride_vb + head_kv * stride_vh + offset_of(start_k, stride_vn, INT64_OFFSETS)
    k_ptrs = streamed_tiles(K, k_base, offs_d, stride_kd, offs_n, stride_kn, TMA, VARLEN)
    v_ptrs = streamed_tiles(V, v_base, offs_n, stride_vn, offs_dv, stride_vd, TMA, VARLEN)
    mask_ptr, slope, seed_lo, seed_hi = head_state(Mask, stride_mb, stride_mh, Slopes, stride_sb, stride_sh, Seed,
                                                   batch, head, HAS_ALIBI, MASK_KIND, DROPOUT)

    # Key blocks outside every row's window are skipped; those inside every row's window skip the masks.
    lo, full_lo, full_hi, hi = visible_span(block_m * BLOCK_M, BLOCK_M, seqlen_k, shift, left, right,
                                            HAS_LEFT, HAS_RIGHT, BLOCK_N)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for stage in tl.static_range(3):
        start, stop = stage_bounds(stage, lo, full_lo, full_hi, hi)
        acc, row_max, row_sum = _forward_key_blocks(
            acc, row_max, row_sum, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
            rows, offs_n, offs_d, offs_dv, start, stop, seqlen_q, seqlen_k,
            mask_ptr, stride_mm, stride_mn, slope, seed_lo, seed_hi, batch_head, threshold,
            shift, left, right, scale, softcap,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, EVEN_D, EVEN_DV, stage != 1,
            HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, MASK_KIND, DROPOUT, UPCAST, DOT_PRECISION,
            TMA, INT64_OFFSETS, batch.to(tl.int32), head_kv.to(tl.int32),
        )

    # Rows that saw no key at all (fully masked) get out = 0 and lse = -inf.
    empty = row_sum == 0.0
    row_sum = tl.where(empty, 1.0, row_sum)
    out = acc * (inv_keep / row_sum)[:, None]
    lse = tl.where(empty, float("-inf"), (row_max + tl.math.log2(row_sum)) * LN_2)

    o_ptrs = Out + offset_of(rows, stride_om, INT64_OFFSETS)[:, None] + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(rows[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + rows, lse, mask=rows < seqlen_q)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: AttentionTensors, opts: AttentionOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Shapes and layouts as in backends/base.py; packed varlen inputs
    (total, H, D) with extras.cu_seqlens_* give out (total_q, Hq, Dv) and lse (Hq, total_q)."""
    problem = ProblemShape.of(q, k, v, extras, opts)
    heads_q, head_dim, head_dim_v = q.shape[1], q.shape[-1], v.shape[-1]
    out, lse = attention_outputs(q, v)
    features, flags = feature_arguments(q, k, extras, opts, addressed=(v, out))

    def grid(tiles):
        return num_blocks(problem.seqlen_q, tiles.block_m), problem.batch * heads_q

    def launch(tiles):
        keys, values = streamed_operands(tiles.tma, tiles.block_n, k, v)
        _forward_kernel[grid(tiles)](
            q, keys, values, out, lse,
            *bhld_strides(q), *bhld_strides(k), *bhld_strides(v), *bhld_strides(out), *row_stat_strides(lse)[:2],
            heads_q, problem.group_size, *problem.sequence_arguments(), *features,
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
            BLOCK_D=head_dim_block(head_dim), BLOCK_DV=head_dim_block(head_dim_v),
            TMA=tiles.tma, num_warps=tiles.num_warps, num_stages=tiles.num_stages, **flags,
        )

    shape = ShapeClass.of("forward", q, v, opts)
    launch(select(shape, q.device, launch, grid, mask_bytes=mask_bytes(extras), reproducible=opts.deterministic,
                  tma=takes_tensor_descriptors(k, v)))
    if problem.varlen:  # packed rows after the last sequence: an empty sequence's out and lse
        fill_unused_rows(out, 0, extras.cu_seqlens_q, 0.0)
        fill_unused_rows(lse, 1, extras.cu_seqlens_q, float("-inf"))
    return out, lse
