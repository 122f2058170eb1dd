"""fused_attn.nn.Attention: a small module around fused_attn.attention for new code."""
from __future__ import annotations

from typing import Optional

import torch

from ..api import attention
from ..checks import check_keywords
from ..dispatch import check_backend_name

Tensor = torch.Tensor


class Attention(torch.nn.Module):
    """Scaled-dot-product attention as a module: fused_attn.attention with fixed options.

        attn = fused_attn.nn.Attention(causal=True, dropout=0.1, window=(256, 0))
        out = attn(q, k, v)            # q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)

    It has no parameters: projections belong to the surrounding model. Dropout is applied only
    in training mode (module.train()), so module.eval() gives deterministic inference.

    Args (keyword only; see fused_attn.attention for their exact meaning):
        causal: causal masking.
        causal_alignment: "top_left" (torch SDPA) or "bottom_right" (flash-attn, KV caches).
        scale: multiplier of q @ k^T; None = 1 / sqrt(D).
        dropout: dropout probability on the attention probabilities while training, in [0, 1).
        window: (left, right) sliding window; -1 = unbounded.
        softcap: if > 0, scores become softcap * tanh(scores / softcap).
        deterministic: the same bits in every run and process (fused_attn.attention).
        backend: force a backend ("triton", "reference", ...); None chooses automatically.
    """

    def __init__(
        self,
        *,
        causal: bool = False,
        causal_alignment: str = "top_left",
        scale: Optional[float] = None,
        dropout: float = 0.0,
        window: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        deterministic: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        # Every option checked here, as attention checks it, so a bad one fails where it is given.
        _, window, _, _ = check_keywords(causal=causal, causal_alignment=causal_alignment, scale=scale, window=window,
                                         softcap=softcap, dropout_p=dropout, deterministic=deterministic)
        check_backend_name(backend)
        self.causal = causal
        self.causal_alignment = causal_alignment
        self.scale = scale
        self.dropout = float(dropout)
        self.window = window
        self.softcap = softcap
        self.deterministic = deterministic
        self.backend = backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                alibi_slopes: Optional[Tensor] = None) -> Tensor:
        """(B, Hq, Lq, Dv) attention output, laid out like q.

        Args:
            q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); Hq a multiple of Hkv (GQA).
                float16, bfloat16 or float32 (float64 on the reference backend); any strides.
            attn_mask: broadcastable to (B, Hq, Lq, Lk); bool True = attend, or a float additive
                bias (differentiable).
            alibi_slopes: float32 (Hq,) or (B, Hq) ALiBi slopes.
        """
        return attention(
            q, k, v, causal=self.causal, causal_alignment=self.causal_alignment, scale=self.scale,
            attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, window=self.window,
            alibi_slopes=alibi_slopes, softcap=self.softcap, deterministic=self.deterministic, backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [f"causal={self.causal}"]
        if self.causal_alignment != "top_left":
            parts.append(f"causal_alignment={self.causal_alignment!r}")
        for name, default in (("scale", None), ("dropout", 0.0), ("window", (-1, -1)), ("softcap", 0.0),
                              ("deterministic", False), ("backend", None)):
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}")
        return ", ".join(parts)
