"""Shared pieces of the Triton kernels: interpreter workarounds, tile sizes, and the per-tile math
every pass recomputes (scores with softcap, ALiBi, bias and masks; the dropout keep-mask)."""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: no host-side tensor descriptors, the kernels load through pointers
    TensorDescriptor = None

from ..dropout import PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_MUL_A, PHILOX_MUL_B, PHILOX_ROUNDS, keep_threshold
from ..options import HIDING_BIAS as OPTIONS_HIDING_BIAS, AttentionOptions, AttentionTensors


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Decided once, like Triton itself decides it when the kernels are decorated.
INTERPRETING = _interpreting()


@triton.jit
def _count_to(Out, n):
    count = 0
    for _ in range(0, n):
        count += 1
    tl.store(Out, count)


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here (None: it can), from a loop over a
    runtime bound, which every kernel's key loop is. Triton 3.6's interpreter turns such a bound
    into a Python int through a one-element array, which NumPy >= 2.4 refuses; Triton 3.8 runs it."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_to[(1,)](out, 3)
    except Exception as error:  # noqa: BLE001 - any failure means the kernels cannot run
        import numpy

        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound with "
                f"NumPy {numpy.__version__} ({error}): use Triton >= 3.8, or NumPy < 2.4")
    return None if out.item() == 3 else f"Triton {triton.__version__}'s interpreter miscounts a loop"


LOG2_E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN_2: tl.constexpr = tl.constexpr(0.6931471805599453)  # natural lse = base-2 lse * ln(2)
# A float mask value at or below this hides its key as -inf does (options.HIDING_BIAS).
HIDING_BIAS: tl.constexpr = tl.constexpr(OPTIONS_HIDING_BIAS)
_ROUNDS: tl.constexpr = tl.constexpr(PHILOX_ROUNDS)
_MUL_A: tl.constexpr = tl.constexpr(PHILOX_MUL_A)
_MUL_B: tl.constexpr = tl.constexpr(PHILOX_MUL_B)
_KEY_A: tl.constexpr = tl.constexpr(PHILOX_KEY_A)
_KEY_B: tl.constexpr = tl.constexpr(PHILOX_KEY_B)

MASK_NONE, MASK_BOOL, MASK_BIAS = 0, 1, 2


def upcast_tiles(dtype: torch.dtype) -> bool:
    """bf16 arithmetic is wrong in Triton's interpreter; there tiles are upcast to fp32 on load."""
    return INTERPRETING and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 products for fp32 inputs (tf32 only if torch allows it); 16-bit dots ignore this."""
    if dtype == torch.float32 and not INTERPRETING and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1. In host code this, not triton.next_power_of_2:
    that is a constexpr function, whose every call from Python unwraps its arguments (~3 us, and a
    decoding step sizes several blocks)."""
    return 1 << (n - 1).bit_length()


def head_dim_block(head_dim: int) -> int:
    """Tiles are powers of two and tl.dot needs at least 16: pad the head dim, mask the padding."""
    return max(16, next_power_of_2(head_dim))


def takes_tensor_descriptors(*tensors: torch.Tensor) -> bool:
    """Whether Hopper's TMA engine can copy tiles of these dense (B, H, L, D) tensors: compute
    capability 9.0 or newer (or the interpreter, which emulates it), a 16-byte aligned base, unit
    stride along D and the other strides positive multiples of 16 bytes."""
    if TensorDescriptor is None:
        return False
    for t in tensors:
        if t.dim() != 4 or t.numel() == 0 or t.data_ptr() % 16 != 0:
            return False
        size = t.element_size()
        *outer, inner = t.stride()
        if inner != 1 or any(stride <= 0 or stride * size % 16 for stride in outer):
            return False
    return INTERPRETING or all(t.is_cuda and compute_capability(t.device.index)[0] >= 9 for t in tensors)


@functools.cache  # asked at every launch; torch looks the device's properties up each time
def compute_capability(index: int) -> tuple[int, int]:
    """(major, minor) of GPU `index`."""
    return torch.cuda.get_device_capability(index)


def streamed_operands(tma: bool, rows: int, *tensors: torch.Tensor) -> tuple:
    """What a kernel's loop streams `rows` at a time: the (B, H, L, D) tensors as they are, or with
    TMA tiles (tensors takes_tensor_descriptors accepts) a descriptor of each, copying
    (1, 1, rows, padded D) boxes: zeros past L and past D."""
    if not tma:
        return tensors
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, head_dim_block(t.shape[-1])])
                 for t in tensors)


def num_blocks(length: int, block: int) -> int:
    return math.ceil(length / block)


@dataclass(frozen=True)
class ProblemShape:
    """Batch size, (longest) sequence lengths and GQA group of a dense or packed varlen call.

    rows_q, rows_k: what the kernels get as seqlen_q and seqlen_k: a dense call's lengths, or a
    packed call's totals, into which sequence_bounds clamps the boundaries it reads (unchecked
    cu_seqlens, under a CUDA graph, are never followed out of the tensors)."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    group_size: int
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    varlen: bool
    rows_q: int
    rows_k: int

    @staticmethod
    def of(q, k, v, extras: AttentionTensors, opts: AttentionOptions) -> "ProblemShape":
        group_size = q.shape[1] // k.shape[1]
        if q.dim() == 3:
            return ProblemShape(extras.cu_seqlens_q.shape[0] - 1, *opts.longest(q.shape[0], k.shape[0]), group_size,
                                extras.cu_seqlens_q, extras.cu_seqlens_k, True, q.shape[0], k.shape[0])
        # Dense calls pass q where the kernels expect cu_seqlens: VARLEN=False never reads it.
        return ProblemShape(q.shape[0], q.shape[2], k.shape[2], group_size, q, q, False, q.shape[2], k.shape[2])

    def sequence_arguments(self) -> tuple:
        """Kernel arguments seqlen_q, seqlen_k, CuSeqQ, CuSeqK."""
        return self.rows_q, self.rows_k, self.cu_seqlens_q, self.cu_seqlens_k


# Offsets within one (batch, head) slice of a tensor are int32 in the kernels (batch and head offsets
# are int64): in a slice spanning more, they would wrap around and address the wrong memory.
INT32_MAX = 2 ** 31 - 1


def needs_int64_offsets(*tensors: torch.Tensor | None) -> bool:
    """Whether a (batch, head) slice of one of these tensors spans more than INT32_MAX elements:
    (B, H, L, D) ones (masks (B, H, Lq, Lk)) along L and D, packed (total, H, D) ones along total
    and D. A (B, L, H, D) tensor's slice does from L = 2^31 / (H * D) on: 524288 at H = 32, D = 128.
    The kernels then compute those offsets in int64 (INT64_OFFSETS, offset_of): a variant compiled
    only for such calls, so that the common one keeps its registers (int64 offsets in the loops
    spilled on sm_80)."""
    for t in tensors:
        if t is not None:
            shape, strides = t.shape, t.stride()  # one call each: this runs at every launch
            rows = 2 if len(shape) == 4 else 0
            if (shape[rows] - 1) * strides[rows] + (shape[-1] - 1) * strides[-1] > INT32_MAX:
                return True
    return False


def feature_arguments(q: torch.Tensor, k: torch.Tensor, extras: AttentionTensors, opts: AttentionOptions,
                      addressed: tuple = ()):
    """Positional kernel arguments and constexpr flags describing masks, ALiBi, softcap and dropout,
    and whether offsets must be int64 (needs_int64_offsets of q, k, the mask and `addressed`, the
    kernel's other (B, H, L, D) or packed tensors).

    Every kernel takes them in this order: Mask, its 4 strides, Slopes, its 2 strides, Seed,
    threshold, 1/(1-p), left, right, scale, softcap. Size-1 (broadcast) dims get stride 0.
    Masks exist only for dense (B, H, L, D) inputs; varlen calls have none.
    """
    batch, heads = (q.shape[0], q.shape[1]) if q.dim() == 4 else (extras.cu_seqlens_q.shape[0] - 1, q.shape[1])
    seqlen_q, seqlen_k = (q.shape[2], k.shape[2]) if q.dim() == 4 else (0, 0)
    mask = extras.mask if extras.mask is not None else extras.bias
    full = None
    if mask is None:
        mask_args = (q, 0, 0, 0, 0)
        mask_kind = MASK_NONE
    else:
        full = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(batch, heads, seqlen_q, seqlen_k)
        if mask.dtype == torch.bool:
            full, mask_kind = full.view(torch.uint8), MASK_BOOL
        else:
            mask_kind = MASK_BIAS
        mask_args = (full, *full.stride())
    slopes = extras.alibi_slopes
    slope_args = (q, 0, 0) if slopes is None else (slopes, *slopes.expand(batch, heads).stride())
    seed = extras.dropout_seed if opts.dropout_p > 0 else q
    args = (
        *mask_args, *slope_args, seed, keep_threshold(opts.dropout_p), 1.0 / (1.0 - opts.dropout_p),
        opts.left, opts.right, opts.scale, opts.softcap or 1.0,
    )
    flags = dict(
        VARLEN=q.dim() == 3, BOTTOM_RIGHT=opts.bottom_right,
        HAS_LEFT=opts.left >= 0, HAS_RIGHT=opts.right >= 0, SOFTCAP=opts.softcap > 0,
        HAS_ALIBI=slopes is not None, MASK_KIND=mask_kind, DROPOUT=opts.dropout_p > 0,
        UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        INT64_OFFSETS=needs_int64_offsets(q, k, full, *addressed),
    )
    return args, flags


@triton.jit
def load_tile(ptrs, rows, row_limit, cols, col_limit, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr,
              UPCAST: tl.constexpr):
    """Load a (rows x cols) tile, zero outside [0, row_limit) x [0, col_limit)."""
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(rows[:, None] < row_limit) & (cols[None, :] < col_limit), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < row_limit, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < col_limit, other=0.0)
    else:
        tile = tl.load(ptrs)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def streamed_tiles(T, base, rows, stride_rows, cols, stride_cols, TMA: tl.constexpr, VARLEN: tl.constexpr):
    """What a kernel's loop reads its streamed tiles through: with TMA the descriptor T itself (over
    a dense tensor: the copy engine fills rows past the sequence with zeros), else pointers to the
    first (rows x cols) tile, base elements into T."""
    if TMA:
        tl.static_assert(not VARLEN)
        return T
    else:
        return T + base + rows[:, None] * stride_rows + cols[None, :] * stride_cols


@triton.jit
def load_box(desc, batch, head, start, UPCAST: tl.constexpr):
    """Rows [start, start + block rows) of (batch, head) through a descriptor (streamed_operands), as a
    2-D tile."""
    tile = desc.load([batch, head, start, 0]).reshape(desc.block_shape[2], desc.block_shape[3])
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def visible_span(start, BLOCK: tl.constexpr, length, shift, left, right,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, TILE: tl.constexpr):
    """Rows [start, start + BLOCK) see columns c in [0, length) with row + shift - left <= c <= row + shift + right.

    Returns TILE-aligned bounds lo <= full_lo <= full_hi and hi: columns [lo, hi) are seen by some
    row, and the whole tiles in [full_lo, full_hi) by every row, so those need no masking.
    """
    last = start + BLOCK - 1
    lo = 0
    full_lo = 0
    hi = length
    full_hi = length
    if HAS_LEFT:
        lo = tl.maximum(start + shift - left, 0)
        full_lo = tl.maximum(last + shift - left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(last + shift + right + 1, length)
        full_hi = tl.maximum(tl.minimum(start + shift + right + 1, length), 0)
    lo = (lo // TILE) * TILE
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, TILE) * TILE, lo), tl.cdiv(hi, TILE) * TILE)
    full_hi = tl.maximum((full_hi // TILE) * TILE, full_lo)
    return lo, full_lo, full_hi, hi


def bhld_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, head, position, dim) strides: a packed varlen (total, H, D) tensor has batch stride 0."""
    if t.dim() == 4:
        return t.stride()
    return 0, t.stride(1), t.stride(0), t.stride(2)


def row_stat_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, position) strides of an lse-like tensor: (B, H, L) dense or (H, total) varlen."""
    if t.dim() == 3:
        return t.stride()
    return 0, t.stride(0), t.stride(1)


@triton.jit
def sequence_bounds(CuSeqQ, CuSeqK, batch, seqlen_q, seqlen_k, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """(start_q, seqlen_q, start_k, seqlen_k, shift) of one batch entry: packed sequences read their
    bounds from cu_seqlens, clamped into the packed totals that seqlen_q and seqlen_k then hold
    (ProblemShape.rows_q/k); shift aligns the causal diagonal (bottom-right: Lk - Lq)."""
    start_q = 0
    start_k = 0
    if VARLEN:
        start_q = tl.minimum(tl.maximum(tl.load(CuSeqQ + batch), 0), seqlen_q)
        seqlen_q = tl.minimum(tl.maximum(tl.load(CuSeqQ + batch + 1), start_q), seqlen_q) - start_q
        start_k = tl.minimum(tl.maximum(tl.load(CuSeqK + batch), 0), seqlen_k)
        seqlen_k = tl.minimum(tl.maximum(tl.load(CuSeqK + batch + 1), start_k), seqlen_k) - start_k
    shift = 0
    if BOTTOM_RIGHT:
        shift = seqlen_k - seqlen_q
    return start_q, seqlen_q, start_k, seqlen_k, shift


@triton.jit
def stage_bounds(STAGE: tl.constexpr, lo, full_lo, full_hi, hi):
    """Tiles of a visible_span in three stages: 0 and 2 the partly visible ones before and after
    (masked), 1 the fully visible ones between (no masks)."""
    start = full_lo
    stop = full_hi
    if STAGE == 0:
        start = lo
        stop = full_lo
    if STAGE == 2:
        start = full_hi
        stop = hi
    return start, stop


@triton.jit
def tanh(x):
    """tanh within ~3 ulps relative, as softcap * tanh(x / softcap) needs however large the softcap
    (libdevice is unavailable in the interpreter): 1 - 2 / (exp(2x) + 1) above |x| = 0.625, which
    saturates cleanly at +-1; below, where it would cancel to ~1e-7 absolute, x P(x^2), fitted to
    tanh(x) / x for the least relative error (csrc/cpu/scores.h has the same)."""
    y = x * x
    poly = 1.0 + y * (-0.333332598 + y * (0.133311272 + y * (-0.0537210666 + y * (0.0205909871 + y * -0.00565998862))))
    saturating = 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2_E)) + 1.0)
    return tl.where(tl.abs(x) < 0.625, x * poly, saturating)


@triton.jit
def offset_of(index, stride, INT64_OFFSETS: tl.constexpr):
    """index * stride: an offset inside one (batch, head) slice, int64 where the slice may span more
    than 2^31 elements (needs_int64_offsets), else int32."""
    if INT64_OFFSETS:
        return tl.cast(index, tl.int64) * stride
    else:
        return index * stride


@triton.jit
def head_state(Mask, stride_mb, stride_mh, Slopes, stride_sb, stride_sh, Seed, batch, head,
               HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr):
    """Per-(batch, head) pieces of the features: the mask's base pointer, the ALiBi slope, the Philox key."""
    mask_ptr = Mask
    if MASK_KIND != 0:
        mask_ptr = Mask + batch * stride_mb + head * stride_mh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + batch * stride_sb + head * stride_sh)
    seed_lo = tl.zeros([], dtype=tl.uint32)
    seed_hi = tl.zeros([], dtype=tl.uint32)
    if DROPOUT:
        seed = tl.load(Seed)
        seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return mask_ptr, slope, seed_lo, seed_hi


@triton.jit
def score_tile(qk, q_index, k_index, seqlen_q, seqlen_k, mask_ptr, stride_mm, stride_mn, slope,
               shift, left, right, scale, softcap,
               CHECK_WINDOW: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
               INT64_OFFSETS: tl.constexpr = False):
    """Base-2 scores of a tile from qk, the q.k products: scale, softcap, ALiBi, bias, masks.
    q_index and k_index are each element's query and key positions, broadcast to qk's shape:
    rows[:, None] and cols[None, :] for qk = q @ k^T, or rows[None, :] and cols[:, None] for its
    transpose k @ q^T.

    Masked entries are -inf. Also returns tanh(scale * qk / softcap) (the softcap's derivative is
    1 - tanh^2), or qk itself when there is no softcap. CHECK_WINDOW applies the key bound and the
    causal/window bounds; tiles known to be fully visible skip it.
    """
    if SOFTCAP:
        capped = tanh(qk * (scale / softcap))
        scores = capped * (softcap * LOG2_E)
    else:
        capped = qk
        scores = qk * (scale * LOG2_E)
    if HAS_ALIBI:
        distance = (k_index - q_index - shift).to(tl.float32)
        scores -= (slope * LOG2_E) * tl.abs(distance)
    if MASK_KIND != 0:
        in_bounds = (q_index < seqlen_q) & (k_index < seqlen_k)
        values = tl.load(mask_ptr + offset_of(q_index, stride_mm, INT64_OFFSETS)
                         + offset_of(k_index, stride_mn, INT64_OFFSETS), mask=in_bounds, other=0)
        if MASK_KIND == 1:
            scores = tl.where(values != 0, scores, float("-inf"))
        else:  # (a bias at or below HIDING_BIAS hides its key, as in every backend)
            values = values.to(tl.float32)
            scores = tl.where(values <= HIDING_BIAS, float("-inf"), scores + values * LOG2_E)
    if CHECK_WINDOW:
        visible = k_index < seqlen_k
        if HAS_LEFT:
            visible = visible & (k_index >= q_index + shift - left)
        if HAS_RIGHT:
            visible = visible & (k_index <= q_index + shift + right)
        scores = tl.where(visible, scores, float("-inf"))
    return scores, capped


@triton.jit
def visible_pairs(mask_ptr, q_index, k_index, seqlen_q, seqlen_k, stride_mm, stride_mn, MASK_KIND: tl.constexpr,
                  INT64_OFFSETS: tl.constexpr = False):
    """How many (query, key) pairs of the tile a bool mask leaves visible (1 without a bool mask):
    the kernels skip tiles where it is 0, which add nothing (p = dS = 0 there)."""
    count = 1
    if MASK_KIND == 1:
        in_bounds = (q_index < seqlen_q) & (k_index < seqlen_k)
        values = tl.load(mask_ptr + offset_of(q_index, stride_mm, INT64_OFFSETS)
                         + offset_of(k_index, stride_mn, INT64_OFFSETS), mask=in_bounds, other=0)
        count = tl.sum((values != 0).to(tl.int32))
    return count


@triton.jit
def dropout_keep(seed_lo, seed_hi, q_index, k_index, batch_head, threshold):
    """Keep-mask of a tile (positions as score_tile's): Philox4x32 on counter (key, query,
    batch_head, 0), as dropout.py, so either orientation draws the same bits."""
    zero = (q_index * 0 + k_index * 0).to(tl.uint32)
    c0 = zero + k_index.to(tl.uint32)
    c1 = zero + q_index.to(tl.uint32)
    c2 = zero + batch_head.to(tl.uint32)
    c3 = zero
    k0 = seed_lo
    k1 = seed_hi
    for _ in tl.static_range(_ROUNDS):
        hi_b = tl.math.umulhi(c2, _MUL_B)
        lo_b = c2 * _MUL_B
        hi_a = tl.math.umulhi(c0, _MUL_A)
        lo_a = c0 * _MUL_A
        c0 = hi_b ^ c1 ^ k0
        c1 = lo_b
        c2 = hi_a ^ c3 ^ k1
        c3 = lo_a
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0.to(tl.int64) >= threshold
