"""What every backend receives besides q, k and v, after validation.

AttentionOptions holds the scalars that shape the math (hashable, passed through the custom op as
plain arguments); AttentionTensors the optional tensors (masks, ALiBi slopes, the dropout seed).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")

# A float mask value at or below -2^127 hides its key as -inf does, in every backend (the kernels:
# kHidingBias in csrc/common/views.h, HIDING_BIAS in triton/common.py): torch.finfo(float32).min and
# finfo(bfloat16).min, Hugging Face's padding value, lie below it. A finite score that low would
# be a fully masked row's maximum, and its lse = max + log(sum) would lose the sum (1 ulp there is
# 2e31), so that P = exp(S - lse) in the backward would be 1 for every key; and Triton's base-2
# scores (bias * log2(e)) overflow to -inf there anyway.
HIDING_BIAS = -2.0 ** 127


class AttentionOptions(NamedTuple):
    """Scalars of one call (a NamedTuple: immutable, hashable, and built in a fraction of a frozen
    dataclass's time). Its fields, in this order, are the scalar arguments of the custom op
    (ops.py passes *opts).

    Query i sees key j when  i + shift - left <= j <= i + shift + right,  where shift is 0
    (top-left alignment, torch SDPA) or Lk - Lq (bottom-right, flash-attn and KV caches), and a
    bound of -1 means unbounded. `causal` is the window's right bound 0.

    scale:         multiplier of q @ k^T, resolved (1/sqrt(D) by default).
    softcap:       scores become softcap * tanh(scores / softcap) before any bias or mask; 0 = off.
    dropout_p:     probability of zeroing an attention probability (kept ones scaled by 1/(1-p)).
    deterministic: gradients must be bitwise reproducible run to run.
    max_seqlen_q, max_seqlen_k: the longest packed sequences of a varlen call (0 when dense).
    """

    scale: float = 1.0
    causal: bool = False
    bottom_right: bool = False
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    dropout_p: float = 0.0
    deterministic: bool = False
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0

    def causal_offset(self, seqlen_q: int, seqlen_k: int) -> int:
        """The shift of the diagonal: query i is aligned with key i + shift."""
        return seqlen_k - seqlen_q if self.bottom_right else 0

    def longest(self, total_q: int, total_k: int) -> tuple[int, int]:
        """max_seqlen_q and max_seqlen_k of a packed call, at most its packed totals: a caller's
        generous bound (the context length) covers no more rows than that (they size the grids)."""
        return min(self.max_seqlen_q, total_q), min(self.max_seqlen_k, total_k)

    @property
    def left(self) -> int:
        """How far left of its diagonal a query sees (-1: unbounded)."""
        return self.window_left

    @property
    def right(self) -> int:
        """How far right of its diagonal a query sees (-1: unbounded; 0 when causal)."""
        return 0 if self.causal else self.window_right


class AttentionTensors(NamedTuple):
    """Optional tensors of one call, all broadcastable views (never expanded copies).

    mask:          bool, broadcastable to (B, Hq, Lq, Lk); True = attend.
    bias:          float, broadcastable to (B, Hq, Lq, Lk); added to the (softcapped) scores.
    alibi_slopes:  float32 (Hq,) or (B, Hq); adds -slope * |i + shift - j|.
    dropout_seed:  int64 (1,), the Philox key drawn from torch's generator (see dropout.py).
    cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) sequence boundaries of packed varlen inputs
                   (q (total_q, Hq, D), k and v (total_k, Hkv, D)); None for dense inputs.
    """

    mask: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    alibi_slopes: Optional[torch.Tensor] = None
    dropout_seed: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
