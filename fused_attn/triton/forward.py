"""Forward pass: out = softmax(scale * q @ k^T) @ v, streamed over key blocks.

Each program owns BLOCK_M query rows of one (batch, head) and keeps, per row, the running max
m and sum l of exp2 of the base-2 logits, and the unnormalised output acc (online softmax).
Only out and the row log-sum-exp (for the backward pass) are written: memory is O(L).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import empty_like_layout, new_output
from ..options import AttentionOptions
from .common import (
    LN_2,
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
def _forward_key_blocks(
    acc, row_max, row_sum, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
    offs_m, offs_n, offs_d, offs_dv, start, stop,
    seqlen_k, causal_offset, qk_scale_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold key blocks [start, stop) into the online softmax. MASKED blocks check bounds and causality."""
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        k_t = load_tile(k_ptrs + start_n * stride_kn, offs_d, HEAD_DIM, cols, seqlen_k,
                        not EVEN_D, MASKED, UPCAST)
        # Base-2 logits: scale * log2(e) is folded in so exp2 replaces exp.
        logits = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale_log2
        if MASKED:
            visible = cols[None, :] < seqlen_k
            if CAUSAL:
                visible = visible & causal_visible(offs_m, cols, causal_offset)
            logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        # A row that has seen no visible key keeps max -inf; shifting by 0 keeps exp2 at 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.math.exp2(logits - shift[:, None])
        rescale = tl.math.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        v = load_tile(v_ptrs + start_n * stride_vn, cols, seqlen_k, offs_dv, HEAD_DIM_V,
                      MASKED, not EVEN_DV, UPCAST)
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
    num_heads, group_size, seqlen_q, seqlen_k, causal_offset, qk_scale_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    head_kv = head // group_size  # GQA: query heads of one group read the same k/v

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV

    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = load_tile(q_ptrs, offs_m, seqlen_q, offs_d, HEAD_DIM, True, not EVEN_D, UPCAST)
    # k is read transposed, (BLOCK_D, BLOCK_N), so q @ k^T is a plain dot.
    k_ptrs = K + batch * stride_kb + head_kv * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    v_ptrs = V + batch * stride_vb + head_kv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd

    # Keys this block needs at all: causal rows see no key past (last row + causal_offset).
    stop = seqlen_k
    if CAUSAL:
        stop = tl.minimum(seqlen_k, tl.maximum((block_m + 1) * BLOCK_M + causal_offset, 0))
    # Leading key blocks that every row sees in full need neither bounds nor causal checks.
    full_stop = (seqlen_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        first_row_sees = tl.maximum(block_m * BLOCK_M + causal_offset + 1, 0)
        full_stop = tl.minimum(full_stop, (first_row_sees // BLOCK_N) * BLOCK_N)
    full_stop = tl.minimum(full_stop, stop)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, row_max, row_sum = _forward_key_blocks(
        acc, row_max, row_sum, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
        offs_m, offs_n, offs_d, offs_dv, 0, full_stop,
        seqlen_k, causal_offset, qk_scale_log2,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, EVEN_D, EVEN_DV, False, CAUSAL, UPCAST, DOT_PRECISION,
    )
    acc, row_max, row_sum = _forward_key_blocks(
        acc, row_max, row_sum, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
        offs_m, offs_n, offs_d, offs_dv, full_stop, stop,
        seqlen_k, causal_offset, qk_scale_log2,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, EVEN_D, EVEN_DV, True, CAUSAL, UPCAST, DOT_PRECISION,
    )

    # Rows that saw no key at all (fully masked) get out = 0 and lse = -inf.
    empty = row_sum == 0.0
    row_sum = tl.where(empty, 1.0, row_sum)
    out = acc / row_sum[:, None]
    lse = tl.where(empty, float("-inf"), (row_max + tl.math.log2(row_sum)) * LN_2)

    o_ptrs = Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + batch_head.to(tl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Shapes and layouts as in backends/base.py."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    out = empty_like_layout(q, (batch, heads_q, seqlen_q, head_dim_v))
    lse = new_output(q, (batch, heads_q, seqlen_q), torch.float32)
    cfg = tile_config(max(head_dim, head_dim_v), q.dtype, backward=False)
    grid = (num_blocks(seqlen_q, cfg.block_m), batch * heads_q)
    _forward_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads_q, heads_q // heads_kv, seqlen_q, seqlen_k,
        opts.causal_offset(seqlen_q, seqlen_k), opts.scale * LOG2_E,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=head_dim_block(head_dim), BLOCK_DV=head_dim_block(head_dim_v),
        CAUSAL=opts.causal, UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse
