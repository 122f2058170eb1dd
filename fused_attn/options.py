"""The per-call options every backend receives, after validation.

Tensors travel separately; this holds only what shapes the math, so one frozen value can be
hashed, compared and passed through the custom op as plain scalars.
"""
from __future__ import annotations

from dataclasses import dataclass

CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


@dataclass(frozen=True)
class AttentionOptions:
    """What a backend needs to know besides q, k and v.

    causal:        mask key j for query i when j > i + causal_offset(Lq, Lk).
    bottom_right:  causal alignment; False aligns the mask top-left (torch SDPA),
                   True bottom-right (flash-attn, KV caches).
    scale:         multiplier of q @ k^T, already resolved (1/sqrt(D) by default).
    deterministic: gradients must be bitwise reproducible run to run.
    """

    causal: bool = False
    bottom_right: bool = False
    scale: float = 1.0
    deterministic: bool = False

    def causal_offset(self, seqlen_q: int, seqlen_k: int) -> int:
        """Shift of the causal diagonal: query i may see keys j <= i + offset."""
        return seqlen_k - seqlen_q if self.bottom_right else 0
