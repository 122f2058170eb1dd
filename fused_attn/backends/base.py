"""What every backend provides: capabilities, reasons for refusing a call, forward and backward."""
from __future__ import annotations

from typing import Optional

import torch

from ..options import AttentionOptions, AttentionTensors

Tensor = torch.Tensor


class Backend:
    """One implementation of attention.

    A backend says whether it can run on this machine at all (`unavailable_reason`) and, for a
    given call, every reason it cannot serve it (`unsupported_reasons`). Dispatch takes the first
    backend with no reasons; `fused_attn.explain` prints them all.

    forward(q, k, v, extras, opts) -> (out, lse):
        q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), any strides; extras and opts
        as in options.py. out (B, Hq, Lq, Dv) in q's dtype, laid out like q (see layout.py);
        lse (B, Hq, Lq) float32 (float64 for float64 input), natural log, -inf on empty rows.
    backward(dout, dlse, q, k, v, out, lse, extras, opts, bias_requires_grad) -> (dq, dk, dv, dbias):
        dlse is the gradient of lse (zeros when the loss ignores it); gradients are laid out
        like their inputs; dbias has extras.bias's own shape and dtype, or is None when
        bias_requires_grad is False.
    Both are called only with non-empty tensors (B, Hq, Lq, Lk >= 1).
    """

    name: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all, or None if it can."""
        return None

    def unsupported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors, opts: AttentionOptions
    ) -> list[str]:
        """Every reason this backend cannot serve this call; empty when it can."""
        return []

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors, opts: AttentionOptions
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    supports_kvcache: bool = False

    def kvcache_forward(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, block_table: Optional[Tensor],
        alibi_slopes: Optional[Tensor], opts: AttentionOptions,
    ) -> tuple[Tensor, Tensor]:
        """Decoding (inference only): q (B, Lq, Hq, D) against the first seqlens_k[b] keys of a
        contiguous (B, capacity, Hkv, D) or paged (pages, page_size, Hkv, D) cache, bottom-right
        aligned. Returns out (B, Lq, Hq, Dv) and lse (B, Hq, Lq) float32."""
        raise NotImplementedError

    def backward(
        self,
        dout: Tensor,
        dlse: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        extras: AttentionTensors,
        opts: AttentionOptions,
        bias_requires_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        raise NotImplementedError


def as_4d(t: Tensor) -> Tensor:
    """A mask or bias broadcastable to (B, Hq, Lq, Lk) with its missing leading dims as size 1."""
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
