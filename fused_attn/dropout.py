"""Dropout on attention probabilities: one counter-based random stream shared by every backend.

Element (b, h, i, j) of the keep-mask is decided by Philox4x32 with 7 rounds (Salmon et al.,
"Parallel random numbers: as easy as 1, 2, 3"; 7 rounds pass BigCrush) on the counter
(j, i, b * Hq + h, 0) under a 64-bit key drawn from torch's generator. The key is the only state:
a kernel regenerates the same mask in the backward pass, every backend draws the same bits, and
`torch.manual_seed` reproduces a call. The probability is kept iff its 32 random bits are
>= threshold(p) = round(p * 2^32), so P(drop) = p to within 2^-32.

This module is the plain-PyTorch Philox (uint32 arithmetic emulated in int64); the Triton kernels
implement the same rounds in fused_attn/triton/common.py.
"""
from __future__ import annotations

from typing import Optional

import torch

PHILOX_ROUNDS = 7
PHILOX_MUL_A = 0xD2511F53
PHILOX_MUL_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
MASK32 = 0xFFFFFFFF


def draw_seed(device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A fresh 62-bit Philox key from torch's generator for `device` (one int64 on that device)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator)


def keep_threshold(dropout_p: float) -> int:
    """Random 32-bit words below this are dropped."""
    return min(round(dropout_p * 2**32), 2**32 - 1)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b, for a < 2^32 and 0 <= b < 2^32."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    low_part = a * b_lo  # < 2^48: exact in int64
    high_part = a * b_hi + (low_part >> 16)
    return high_part >> 16, (a * b) & MASK32  # a * b may wrap in int64; its low 32 bits are right


def philox_bits(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """First 32-bit output word of Philox4x32-7 for counters (c0, c1, c2, 0), as int64 in [0, 2^32)."""
    key = int(seed.reshape(-1)[0])
    k0, k1 = key & MASK32, (key >> 32) & MASK32
    c0, c1, c2 = torch.broadcast_tensors(c0.long() & MASK32, c1.long() & MASK32, c2.long() & MASK32)
    c3 = torch.zeros_like(c0)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_MUL_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_MUL_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0


def keep_mask_from_seed(
    seed: torch.Tensor, batch: int, heads: int, rows: torch.Tensor, cols: torch.Tensor, dropout_p: float,
    batch_heads: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Keep-mask (B, H, len(rows), len(cols)) for the given query rows and key columns."""
    if batch_heads is None:
        batch_heads = torch.arange(batch * heads, device=rows.device).view(batch, heads, 1, 1)
    bits = philox_bits(seed, cols.view(1, 1, 1, -1), rows.view(1, 1, -1, 1), batch_heads)
    return bits >= keep_threshold(dropout_p)


def dropout_keep_mask(
    batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
    device: torch.device | str = "cpu", generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The keep-mask a call to `attention(..., dropout_p=dropout_p)` would use next.

    Draws the key from torch's generator exactly as `attention` does, so

        torch.manual_seed(0); out = attention(q, k, v, dropout_p=p)
        torch.manual_seed(0); keep = dropout_keep_mask(B, Hq, Lq, Lk, p, q.device)

    gives the bool (B, Hq, Lq, Lk) mask (True = kept) that produced `out`. Materializes the
    whole mask: meant for tests and debugging, not for training.
    """
    device = torch.device(device)
    seed = draw_seed(device, generator)
    rows = torch.arange(seqlen_q, device=device)
    cols = torch.arange(seqlen_k, device=device)
    return keep_mask_from_seed(seed, batch, heads, rows, cols, dropout_p)
