"""Hugging Face transformers integration: attn_implementation="fused_attn".

    import fused_attn.integrations.transformers as fa_hf
    fa_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fused_attn")
    # or, for a model already built: model.set_attn_implementation("fused_attn")

`register()` adds `attention_forward` to transformers.AttentionInterface and transformers'
boolean SDPA mask builder (`masking_utils.sdpa_mask`) to AttentionMaskInterface under the same
name, so models build the same masks for fused_attn as for "sdpa" (None where `is_causal` does the
job, otherwise a (B, 1, Lq, Lk) bool mask with True = attend, padding, sliding windows and
chunking included) and call `attention_forward` where they would call SDPA.

This module imports transformers only inside its functions: importing fused_attn (or this
module) never imports transformers. Tested with transformers 5.x.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..api import attention

Tensor = torch.Tensor

NAME = "fused_attn"
_warned_output_attentions = False


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    position_bias: Optional[Tensor] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The transformers attention function (same contract as transformers' sdpa_attention_forward).

    Args:
        module: the calling attention layer; its `is_causal` is used when `is_causal` is None.
        query: (B, Hq, Lq, D); key: (B, Hkv, Lk, D); value: (B, Hkv, Lk, Dv). Hkv < Hq (the
            model's num_key_value_groups > 1) runs as grouped-query attention without repeating
            k and v.
        attention_mask: None, or the mask the model built with the registered mask function:
            bool (B or 1, 1 or Hq, Lq, Lk) with True = attend, or a float additive mask (custom
            4-D masks). Padding, sliding windows and chunks are in it.
        dropout: dropout probability (models pass 0.0 in eval mode).
        scaling: multiplier of q @ k^T (None: 1 / sqrt(D)).
        is_causal: as in SDPA: causal (top-left aligned) only when there is no mask and Lq > 1.
        sliding_window: accepted and not needed: the model's mask already holds the window
            (transformers only drops the mask when every key is inside the window).
        softcap: tanh soft-capping of the scores (Gemma 2), natively supported.
        position_bias: an additive (B or 1, H, Lq, Lk) bias (T5-style), combined with the mask.

    Returns:
        (attn_output (B, Lq, Hq, Dv) contiguous, None): attention weights are never materialized.
    """
    global _warned_output_attentions
    if kwargs.get("output_attentions", False) and not _warned_output_attentions:
        _warned_output_attentions = True
        import warnings

        warnings.warn("fused_attn does not return attention weights (output_attentions=True); use "
                      "attn_implementation='eager' for them", stacklevel=2)
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("fused_attn does not support attention sinks (s_aux)")
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        # Continuous batching: its cache layout is served by transformers' SDPA integration.
        if softcap is not None:
            raise NotImplementedError("fused_attn does not support softcap with a PagedAttentionCache")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)

    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: shape first (keeps compile happy), then the mask.
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if torch.jit.is_tracing() and isinstance(is_causal, torch.Tensor):
        is_causal = bool(is_causal.item())

    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype not in (query.dtype, torch.float32):
        mask = mask.to(query.dtype)
    if position_bias is not None:
        if mask is None:
            mask = position_bias
        elif mask.dtype == torch.bool:
            mask = torch.where(mask, position_bias, float("-inf"))
        else:
            mask = position_bias + mask
        if mask.dtype not in (query.dtype, torch.float32):
            mask = mask.to(query.dtype)

    if query.shape[0] != key.shape[0] and 1 in (query.shape[0], key.shape[0]):
        # A batch of 1 broadcast, as transformers' SDPA path does (learned queries): stride-0 views.
        batch = max(query.shape[0], key.shape[0])
        query, key, value = (t.expand(batch, *t.shape[1:]) for t in (query, key, value))
    out = attention(query, key, value, causal=bool(is_causal), scale=scaling, attn_mask=mask,
                    dropout_p=float(dropout), softcap=float(softcap) if softcap else 0.0)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Make attn_implementation=name ("fused_attn") available in transformers.

    Registers `attention_forward` in transformers.AttentionInterface and transformers' boolean
    SDPA mask function in transformers.masking_utils.AttentionMaskInterface (both are needed:
    without a mask function a model would build no padding or sliding-window mask). Idempotent.
    Afterwards `from_pretrained(..., attn_implementation=name)`, `Model(config)` with
    `config._attn_implementation = name` (or `AutoConfig...(attn_implementation=name)`) and
    `model.set_attn_implementation(name)` select it. The name must not contain "sdpa", "flash" or
    "flex" (transformers treats those specially).

    Raises ImportError when transformers (with AttentionInterface, i.e. >= 4.48) is not installed.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def is_registered(name: str = NAME) -> bool:
    """True when `register(name)` has been called (False if transformers is not importable)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    return name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping
