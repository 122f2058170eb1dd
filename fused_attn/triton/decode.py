"""Decoding against a KV cache: few query rows, many keys, possibly paged.

One program serves one key/value head and all query rows of its GQA group (Lq x G rows packed
into the M dimension), so each cached key is read once per group, not once per query head. For
long caches the keys are split across programs (split-KV, "flash-decoding"): each writes a
partial output with its lse, and the partials are merged with their log-sum-exps.

A contiguous cache (B, capacity, Hkv, D) is read as a paged one whose page b is batch b.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import as_full_cache, attention_outputs, kvcache_outputs
from ..options import AttentionOptions
from .common import (
    INTERPRETING,
    LN_2,
    dot_precision,
    head_dim_block,
    load_tile,
    num_blocks,
    next_power_of_2,
    score_tile,
    upcast_tiles,
)
from .tuning import ShapeClass, select


@triton.jit
def _decode_kernel(
    Q, KCache, VCache, CacheSeqlens, BlockTable, OutPartial, LsePartial, Slopes,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kp, stride_kn, stride_kh, stride_kd,
    stride_vp, stride_vn, stride_vh, stride_vd,
    stride_tb, stride_sb, stride_sh,
    stride_os, stride_ob, stride_om, stride_oh, stride_od,
    stride_ls, stride_lb, stride_lm, stride_lh,
    num_heads_kv, group_size, seqlen_q, page_size, split_size, new_tokens, capacity, num_pages,
    left, right, scale, softcap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block_m = tl.program_id(0)
    split = tl.program_id(1)
    batch_head_kv = tl.program_id(2)
    batch = (batch_head_kv // num_heads_kv).to(tl.int64)
    head_kv = (batch_head_kv % num_heads_kv).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEAD_DIM_V == BLOCK_DV
    # The tokens append_to_cache just wrote count too. Lengths and pages go unchecked on the host
    # where reading them would cost a sync (host_checks.py: CUDA graphs, inference-mode tensors,
    # FUSED_ATTN_HOST_CHECKS=0): a sequence whose length or pages lie outside the cache reads
    # nothing and gets NaN rows, never another sequence's keys and never memory past the cache.
    keys = tl.load(CacheSeqlens + batch) + new_tokens
    valid = (keys >= 0) & (keys <= capacity)
    seqlen_k = tl.minimum(tl.maximum(keys, 0), capacity)
    shift = seqlen_k - seqlen_q  # the cache convention: the last query sees the whole cache

    # Packed rows: row r is query position r // G of query head head_kv * G + r % G.
    packed = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = packed // group_size
    heads = head_kv * group_size + packed % group_size
    live = rows < seqlen_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + batch * stride_qb + rows[:, None] * stride_qm + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=live[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    slope = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Slopes + batch * stride_sb + heads * stride_sh, mask=live, other=0.0)[:, None]

    # This split's keys, intersected with what the first..last query positions of the block can see.
    lo = split * split_size
    hi = tl.minimum((split + 1) * split_size, seqlen_k)
    if HAS_LEFT:
        lo = tl.maximum(lo, ((block_m * BLOCK_M // group_size + shift - left) // BLOCK_N) * BLOCK_N)
    if HAS_RIGHT:
        last_row = tl.minimum((block_m * BLOCK_M + BLOCK_M - 1) // group_size, seqlen_q - 1)
        hi = tl.minimum(hi, last_row + shift + right + 1)

    if PAGED:  # the pages of every key the loop loads: whole blocks from lo on, within the sequence
        loaded = tl.minimum(lo + tl.cdiv(hi - lo, BLOCK_N) * BLOCK_N, seqlen_k)
        valid = valid & _pages_exist(BlockTable + batch * stride_tb, lo, loaded, page_size, num_pages)
    hi = tl.where(valid, hi, lo)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if PAGED:
            pages = tl.load(BlockTable + batch * stride_tb + cols // page_size, mask=cols < seqlen_k, other=0)
            slots = cols % page_size
        else:
            pages = cols * 0 + batch
            slots = cols.to(tl.int64)  # times the row stride, passes 2^31 in a long cache (as in append)
        pages = pages.to(tl.int64)
        k_t = load_tile(KCache + pages[None, :] * stride_kp + slots[None, :] * stride_kn + head_kv * stride_kh
                        + offs_d[:, None] * stride_kd, offs_d, HEAD_DIM, cols, seqlen_k, not EVEN_D, True, UPCAST)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        scores, _ = score_tile(qk, rows[:, None], cols[None, :], seqlen_q, seqlen_k, Q, 0, 0, slope, shift, left,
                               right, scale, softcap, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, 0)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        centre = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.math.exp2(scores - centre[:, None])
        rescale = tl.math.exp2(row_max - centre)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        v = load_tile(VCache + pages[:, None] * stride_vp + slots[:, None] * stride_vn + head_kv * stride_vh
                      + offs_dv[None, :] * stride_vd, cols, seqlen_k, offs_dv, HEAD_DIM_V, True, not EVEN_DV, UPCAST)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    empty = row_sum == 0.0
    row_sum = tl.where(empty, 1.0, row_sum)
    lse = tl.where(empty, float("-inf"), (row_max + tl.math.log2(row_sum)) * LN_2)
    lse = tl.where(valid, lse, float("nan"))
    out = tl.where(valid, acc / row_sum[:, None], float("nan"))
    out_ptrs = (OutPartial + split * stride_os + batch * stride_ob + rows[:, None] * stride_om
                + heads[:, None] * stride_oh + offs_dv[None, :] * stride_od)
    tl.store(out_ptrs, out, mask=live[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    lse_ptrs = LsePartial + split * stride_ls + batch * stride_lb + rows * stride_lm + heads * stride_lh
    tl.store(lse_ptrs, lse, mask=live)


@triton.jit
def _pages_exist(table_row, lo, hi, page_size, num_pages, BLOCK_P: tl.constexpr = 64):
    """Whether every page holding keys [lo, hi) of a sequence (its block-table row) is a page of
    the cache."""
    first, last = lo // page_size, (hi + page_size - 1) // page_size
    missing = tl.zeros([BLOCK_P], dtype=tl.int32)
    for start in range(first, last, BLOCK_P):
        index = start + tl.arange(0, BLOCK_P)
        pages = tl.load(table_row + index, mask=index < last, other=0)
        missing += ((pages < 0) | (pages >= num_pages)).to(tl.int32)
    return tl.sum(missing, 0) == 0


def _num_splits(programs: int, capacity: int, block_n: int) -> int:
    """Enough key splits to give the GPU several programs per SM, each with at least a few key blocks."""
    if INTERPRETING:
        return min(2, num_blocks(capacity, block_n))
    target = 4 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, min(num_blocks(target, programs), num_blocks(capacity, 4 * block_n), 64))


@triton.jit
def _merge_splits_kernel(
    OutPartial, LsePartial, Out, Lse, splits, rows, seqlen_q, heads_q,
    stride_os, stride_or, stride_ls, stride_ob, stride_om, stride_oh, stride_lb, stride_lh, stride_lm,
    HEAD_DIM_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Rows r = (b * Lq + m) * Hq + h of the splits' partial results (each normalised, with its
    lse), merged: with M = max_s lse_s, w_s = exp(lse_s - M):  out = sum_s w_s out_s / sum_s w_s,
    lse = M + log(sum_s w_s). Rows no split saw (M = -inf) get out = 0 and lse = -inf; rows of a
    split that found its sequence outside the cache (lse NaN) get NaN."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    offs_dv = tl.arange(0, BLOCK_DV)
    cols_live = live[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    top = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    broken = tl.zeros([BLOCK_R], dtype=tl.int32)
    for split in range(0, splits):
        lse_split = tl.load(LsePartial + split * stride_ls + r, mask=live, other=float("-inf"))
        top = tl.maximum(top, lse_split)
        broken += (lse_split != lse_split).to(tl.int32)
    centre = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for split in range(0, splits):
        weight = tl.exp(tl.load(LsePartial + split * stride_ls + r, mask=live, other=float("-inf")) - centre)
        out = tl.load(OutPartial + split * stride_os + r[:, None] * stride_or + offs_dv[None, :], mask=cols_live,
                      other=0.0)
        total += weight
        acc += weight[:, None] * out
    empty = total == 0.0
    total = tl.where(empty, 1.0, total)
    out = tl.where(broken[:, None] == 0, acc / total[:, None], float("nan"))
    lse = tl.where(broken == 0, tl.where(empty, float("-inf"), top + tl.log(total)), float("nan"))
    b, m, h = r // (seqlen_q * heads_q), r // heads_q % seqlen_q, r % heads_q
    tl.store(Out + b[:, None] * stride_ob + m[:, None] * stride_om + h[:, None] * stride_oh + offs_dv[None, :],
             out, mask=cols_live)
    tl.store(Lse + b * stride_lb + h * stride_lh + m * stride_lm, lse, mask=live)


@triton.jit
def _append_kernel(
    KNew, VNew, KCache, VCache, CacheSeqlens, BlockTable, new_tokens, page_size, heads_kv, capacity, num_pages,
    stride_knb, stride_knl, stride_knh, stride_knd, stride_vnb, stride_vnl, stride_vnh, stride_vnd,
    stride_kp, stride_kn, stride_kh, stride_kd, stride_vp, stride_vn, stride_vh, stride_vd, stride_tb,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PAGED: tl.constexpr,
):
    """New token i of sequence b (one program) written into the caches at position
    CacheSeqlens[b] + i, through the block table of a paged cache; every head at once. A position
    outside the cache, or a page outside it (unchecked input), is not written."""
    batch = (tl.program_id(0) // new_tokens).to(tl.int64)
    token = tl.program_id(0) % new_tokens
    position = tl.load(CacheSeqlens + batch) + token
    in_cache = (position >= 0) & (position < capacity)
    position = tl.where(in_cache, position, 0)  # a table entry and a row that exist, written to or not
    if PAGED:
        page = tl.load(BlockTable + batch * stride_tb + position // page_size).to(tl.int64)
        in_cache = in_cache & (page >= 0) & (page < num_pages)
        slot = (position % page_size).to(tl.int64)
    else:
        page = batch
        slot = position.to(tl.int64)  # its offset, times the row stride, may pass 2^31 in a long cache
    page = tl.where(in_cache, page, 0)
    heads = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    offs_dv = tl.arange(0, BLOCK_DV)[None, :]
    # in_cache broadcast over the heads (Triton's interpreter takes no scalar in a mask)
    writes = (heads < heads_kv) & (heads * 0 + in_cache.to(tl.int32) != 0)
    k_live = writes & (offs_d < HEAD_DIM)
    v_live = writes & (offs_dv < HEAD_DIM_V)
    k = tl.load(KNew + batch * stride_knb + token * stride_knl + heads * stride_knh + offs_d * stride_knd, mask=k_live)
    v = tl.load(VNew + batch * stride_vnb + token * stride_vnl + heads * stride_vnh + offs_dv * stride_vnd, mask=v_live)
    tl.store(KCache + page * stride_kp + slot * stride_kn + heads * stride_kh + offs_d * stride_kd, k, mask=k_live)
    tl.store(VCache + page * stride_vp + slot * stride_vn + heads * stride_vh + offs_dv * stride_vd, v, mask=v_live)


def append_to_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None,
                    cache_seqlens: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """backends.base.append_by_indexing in one launch (its indexed writes take several small ones)."""
    batch, new_tokens, heads_kv, head_dim = k.shape
    head_dim_v = v.shape[3]
    paged = block_table is not None
    table = block_table if paged else cache_seqlens[:, None]
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else page_size
    _append_kernel[(batch * new_tokens,)](
        k, v, k_cache, v_cache, cache_seqlens, table, new_tokens, page_size, heads_kv, capacity, k_cache.shape[0],
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), table.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_H=next_power_of_2(heads_kv),
        BLOCK_D=head_dim_block(head_dim), BLOCK_DV=head_dim_block(head_dim_v), PAGED=paged,
    )


def decode_forward(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
    block_table: torch.Tensor | None, alibi_slopes: torch.Tensor | None, opts: AttentionOptions,
    out: torch.Tensor | None = None, lse: torch.Tensor | None = None, new_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Lq, Hq, Dv), lse (B, Hq, Lq)) of q (B, Lq, Hq, D) against the first
    seqlens_k[b] + new_tokens keys of the cache, bottom-right aligned. Shapes as in
    fused_attn.attention_with_kvcache. Written into out (any strides but a unit last one) and lse
    when they are given."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv, head_dim_v = k_cache.shape[2], v_cache.shape[3]
    group_size = heads_q // heads_kv
    paged = block_table is not None
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else page_size

    rows = seqlen_q * group_size
    block_m = max(16, min(64, next_power_of_2(rows)))
    m_blocks = num_blocks(rows, block_m)
    # Without ALiBi the kernel never reads the slopes: q stands in for them, as in common.feature_arguments.
    slopes = alibi_slopes.expand(batch, heads_q) if alibi_slopes is not None else q
    slope_strides = slopes.stride() if alibi_slopes is not None else (0, 0)
    table = block_table if paged else seqlens_k[:, None]
    k_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3))
    v_strides = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3))

    def grid(tiles):
        return m_blocks, _num_splits(m_blocks * batch * heads_kv, capacity, tiles.block_n), batch * heads_kv

    def launch(tiles):
        """The partial results of every split, merged: the split count follows block_n."""
        launch_grid = grid(tiles)
        splits = launch_grid[1]
        split_size = num_blocks(num_blocks(capacity, splits), tiles.block_n) * tiles.block_n
        if splits == 1:  # the one split's results are final: written where they belong
            out_strides, lse_strides = (0, *out.stride()), (0, lse.stride(0), lse.stride(2), lse.stride(1))
            out_partial, lse_partial = out, lse
        else:
            out_partial = torch.empty((splits, batch, seqlen_q, heads_q, head_dim_v), dtype=torch.float32,
                                      device=q.device)
            lse_partial = torch.empty((splits, batch, seqlen_q, heads_q), dtype=torch.float32, device=q.device)
            out_strides, lse_strides = out_partial.stride(), lse_partial.stride()
        _decode_kernel[launch_grid](
            q, k_cache, v_cache, seqlens_k, table, out_partial, lse_partial, slopes,
            *q.stride(), *k_strides, *v_strides, table.stride(0), *slope_strides,
            *out_strides, *lse_strides,
            heads_kv, group_size, seqlen_q, page_size, split_size, new_tokens, capacity, k_cache.shape[0],
            opts.left, opts.right, opts.scale, opts.softcap or 1.0,
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
            BLOCK_D=head_dim_block(head_dim), BLOCK_DV=head_dim_block(head_dim_v),
            PAGED=paged, HAS_LEFT=opts.left >= 0, HAS_RIGHT=opts.right >= 0, SOFTCAP=opts.softcap > 0,
            HAS_ALIBI=alibi_slopes is not None, UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
        if splits > 1:
            merge_splits(out_partial, lse_partial, out, lse)

    if out is None:
        out, lse = kvcache_outputs(q, v_cache)
    launch(select(ShapeClass.of("decode", q, v_cache, opts, block_m), q.device, launch, grid))
    return out, lse


def merge_splits(out_partial: torch.Tensor, lse_partial: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """out (B, Lq, Hq, Dv) and lse (B, Hq, Lq) from the splits' out_partial (S, B, Lq, Hq, Dv) and
    lse_partial (S, B, Lq, Hq), float32 and contiguous, in one launch."""
    splits, batch, seqlen_q, heads_q, head_dim_v = out_partial.shape
    rows = batch * seqlen_q * heads_q
    block_r = 16
    _merge_splits_kernel[(num_blocks(rows, block_r),)](
        out_partial, lse_partial, out, lse, splits, rows, seqlen_q, heads_q,
        out_partial.stride(0), out_partial.stride(3), lse_partial.stride(0),
        out.stride(0), out.stride(1), out.stride(2), *lse.stride(),
        HEAD_DIM_V=head_dim_v, BLOCK_R=block_r, BLOCK_DV=head_dim_block(head_dim_v),
    )


def decoding_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: torch.Tensor | None,
                     opts: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense call (shapes as in fused_attn.attention) by the decoding kernel: the keys are a full
    contiguous cache, read through (B, Lk, Hkv, D) views; out laid out like q (layout.py)."""
    out, lse = attention_outputs(q, v)
    q_, k_, v_, out_, seqlens = as_full_cache(q, k, v, out)
    decode_forward(q_, k_, v_, seqlens, None, alibi_slopes, opts, out_, lse)
    return out, lse
