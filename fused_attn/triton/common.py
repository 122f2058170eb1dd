"""Shared pieces of the Triton kernels: interpreter workarounds, tile sizes, masked tile loads."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Decided once, like Triton itself decides it when the kernels are decorated.
INTERPRETING = _interpreting()

LOG2_E = 1.4426950408889634
LN_2: tl.constexpr = tl.constexpr(0.6931471805599453)  # natural lse = base-2 lse * ln(2)


def upcast_tiles(dtype: torch.dtype) -> bool:
    """bf16 arithmetic is wrong in Triton's interpreter; there tiles are upcast to fp32 on load."""
    return INTERPRETING and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 products for fp32 inputs (tf32 only if torch allows it); 16-bit dots ignore this."""
    if dtype == torch.float32 and not INTERPRETING and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def head_dim_block(head_dim: int) -> int:
    """Tiles are powers of two and tl.dot needs at least 16: pad the head dim, mask the padding."""
    return max(16, triton.next_power_of_2(head_dim))


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def tile_config(head_dim: int, dtype: torch.dtype, backward: bool) -> TileConfig:
    """Sensible fixed tiles; the benchmark issue replaces this with autotuned ones for Hopper."""
    if INTERPRETING:
        # The interpreter's cost grows with the number of programs times loop steps.
        return TileConfig(32, 32, 1, 1)
    wide = head_dim_block(head_dim) * (4 if dtype == torch.float32 else 2)  # bytes per row
    if backward:
        if wide <= 256:
            return TileConfig(64, 64, 4, 2)
        return TileConfig(32, 32, 4, 1)
    if wide <= 128:
        return TileConfig(128, 64, 4, 3)
    if wide <= 256:
        return TileConfig(128, 64, 8, 2)
    return TileConfig(64, 32, 4, 1)


def num_blocks(length: int, block: int) -> int:
    return math.ceil(length / block)


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
def causal_visible(rows, cols, causal_offset):
    """Query row i sees key j when j <= i + causal_offset (offset 0: top-left, Lk - Lq: bottom-right)."""
    return cols[None, :] <= rows[:, None] + causal_offset
