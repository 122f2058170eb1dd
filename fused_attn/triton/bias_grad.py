"""Gradient of a float attn_mask (additive bias), reduced to the bias's own broadcast shape.

d loss / d bias_ij = ds_ij = p_ij * (dp_ij - delta_i), summed over every (batch, head, row, col)
the bias element was broadcast to. One program owns one tile of the bias gradient and loops over
the batches, heads, query blocks and key blocks that map onto it, recomputing ds: nothing of size
(B, H, Lq, Lk) is stored, no atomics are used, and the total work is one more dq-like pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import AttentionOptions, AttentionTensors
from .backward import backward_tile, load_row_stats
from .common import head_dim_block, head_state, load_tile, needs_int64_offsets, num_blocks, offset_of
from .tuning import ShapeClass, mask_bytes, select


@triton.jit
def _bias_grad_kernel(
    Q, K, V, DOut, Lse, Delta, DBias,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_db, stride_dh, stride_dm, stride_dn,
    num_batches, num_heads, group_size, seqlen_q, seqlen_k, bias_heads,
    Mask, stride_mb, stride_mh, stride_mm, stride_mn, Slopes, stride_sb, stride_sh,
    Seed, threshold, inv_keep, left, right, scale, softcap,
    FULL_BATCH: tl.constexpr, FULL_HEADS: tl.constexpr, FULL_ROWS: tl.constexpr, FULL_COLS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
):
    """Dense inputs only (masks do not exist for packed varlen calls); lse and delta are (B, H, Lq)."""
    tile_m = tl.program_id(0)
    tile_n = tl.program_id(1)
    bias_bh = tl.program_id(2)
    bias_b = bias_bh // bias_heads
    bias_h = bias_bh % bias_heads
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    shift = seqlen_k - seqlen_q if BOTTOM_RIGHT else 0

    # What this tile of the gradient sums over: broadcast dims span everything, full dims one index/tile.
    batch_count = 1 if FULL_BATCH else num_batches
    head_count = 1 if FULL_HEADS else num_heads
    m_start, m_stop = 0, seqlen_q
    if FULL_ROWS:
        m_start, m_stop = tile_m * BLOCK_M, tile_m * BLOCK_M + 1
    n_start, n_stop = 0, seqlen_k
    if FULL_COLS:
        n_start, n_stop = tile_n * BLOCK_N, tile_n * BLOCK_N + 1

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for member in range(0, batch_count * head_count):
        batch = (bias_b if FULL_BATCH else member // head_count).to(tl.int64)
        head = (bias_h if FULL_HEADS else member % head_count).to(tl.int64)
        head_kv = head // group_size
        batch_head = batch * num_heads + head
        mask_ptr, slope, seed_lo, seed_hi = head_state(Mask, stride_mb, stride_mh, Slopes, stride_sb, stride_sh,
                                                       Seed, batch, head, HAS_ALIBI, MASK_KIND, DROPOUT)
        for start_m in range(m_start, m_stop, BLOCK_M):
            rows = start_m + offs_m
            q_rows = Q + batch * stride_qb + head * stride_qh + offset_of(rows, stride_qm, INT64_OFFSETS)
            q = load_tile(q_rows[:, None] + offs_d[None, :] * stride_qd, rows, seqlen_q, offs_d, HEAD_DIM, True,
                          not EVEN_D, UPCAST)
            dout_rows = DOut + batch * stride_gb + head * stride_gh + offset_of(rows, stride_gm, INT64_OFFSETS)
            dout = load_tile(dout_rows[:, None] + offs_dv[None, :] * stride_gd, rows, seqlen_q, offs_dv, HEAD_DIM_V,
                             True, not EVEN_DV, UPCAST)
            lse, delta = load_row_stats(Lse, Delta, batch_head * seqlen_q, rows, seqlen_q)
            for start_n in range(n_start, n_stop, BLOCK_N):
                cols = start_n + offs_n
                k_rows = K + batch * stride_kb + head_kv * stride_kh + offset_of(cols, stride_kn, INT64_OFFSETS)
                k = load_tile(k_rows[:, None] + offs_d[None, :] * stride_kd, cols, seqlen_k, offs_d, HEAD_DIM, True,
                              not EVEN_D, UPCAST)
                v_rows = V + batch * stride_vb + head_kv * stride_vh + offset_of(cols, stride_vn, INT64_OFFSETS)
                v = load_tile(v_rows[:, None] + offs_dv[None, :] * stride_vd, cols, seqlen_k, offs_dv, HEAD_DIM_V, True,
                              not EVEN_DV, UPCAST)
                _, dscores, _ = backward_tile(
                    q, k, v, dout, lse, delta, rows, cols, seqlen_q, seqlen_k,
                    mask_ptr, stride_mm, stride_mn, slope, seed_lo, seed_hi, batch_head, threshold, inv_keep,
                    shift, left, right, scale, softcap,
                    True, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, MASK_KIND, DROPOUT, DOT_PRECISION, INT64_OFFSETS,
                )
                acc += dscores

    base = DBias + bias_b.to(tl.int64) * stride_db + bias_h.to(tl.int64) * stride_dh
    rows = tile_m * BLOCK_M + offs_m
    cols = tile_n * BLOCK_N + offs_n
    if FULL_ROWS and FULL_COLS:
        tl.store(base + offset_of(rows, stride_dm, INT64_OFFSETS)[:, None]
                 + offset_of(cols, stride_dn, INT64_OFFSETS)[None, :], acc,
                 mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))
    elif FULL_COLS:
        tl.store(base + offset_of(cols, stride_dn, INT64_OFFSETS), tl.sum(acc, 0), mask=cols < seqlen_k)
    elif FULL_ROWS:
        tl.store(base + offset_of(rows, stride_dm, INT64_OFFSETS), tl.sum(acc, 1), mask=rows < seqlen_q)
    else:
        tl.store(base, tl.sum(tl.sum(acc, 1), 0))


def bias_gradient(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
    extras: AttentionTensors, opts: AttentionOptions, features: tuple, flags: dict,
) -> torch.Tensor:
    """The bias gradient with extras.bias's shape and dtype (lse, delta and the feature arguments
    from the backward pass: common.feature_arguments, its int64 decision covering dout)."""
    bias = extras.bias
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    bias_shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    full = [size != 1 or total == 1 for size, total in zip(bias_shape, (batch, heads_q, seqlen_q, seqlen_k))]
    dbias = torch.empty(bias_shape, dtype=torch.float32, device=q.device)
    flags = dict(flags, INT64_OFFSETS=flags["INT64_OFFSETS"] or needs_int64_offsets(dbias))

    def grid(tiles):
        return (
            num_blocks(seqlen_q, tiles.block_m) if full[2] else 1,
            num_blocks(seqlen_k, tiles.block_n) if full[3] else 1,
            bias_shape[0] * bias_shape[1],
        )

    def launch(tiles):
        _bias_grad_kernel[grid(tiles)](
            q, k, v, dout, lse, delta, dbias,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dbias.stride(),
            batch, heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, bias_shape[1], *features,
            FULL_BATCH=full[0], FULL_HEADS=full[1], FULL_ROWS=full[2], FULL_COLS=full[3],
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
            BLOCK_D=head_dim_block(head_dim), BLOCK_DV=head_dim_block(head_dim_v),
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, **flags,
        )

    shape = ShapeClass.of("bias_grad", q, v, opts)
    launch(select(shape, q.device, launch, grid, mask_bytes=mask_bytes(extras), reproducible=opts.deterministic))
    return dbias.reshape(bias.shape).to(bias.dtype)
