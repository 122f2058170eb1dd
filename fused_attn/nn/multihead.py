"""fused_attn.nn.MultiheadAttention: torch.nn.MultiheadAttention with the attention step fused."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ..api import attention
from ..sdpa import _TORCH_SDPA, _Keywords, _Plan, _unsupported_reason

Tensor = torch.Tensor


def _split_heads(x: Tensor, heads: int, batch_first: bool) -> Tensor:
    """(L, N, H*d) (or (N, L, H*d) when batch_first) -> a (N, H, L, d) view, never a copy."""
    x = x.unflatten(-1, (heads, -1))
    return x.transpose(1, 2) if batch_first else x.permute(1, 2, 0, 3)


def _append_along_sequence(x: Tensor, rows: list[Tensor], batch_first: bool) -> Tensor:
    """Append (1, 1, E) rows to a (S, N, E) / (N, S, E) tensor along its sequence dim."""
    if not rows:
        return x
    batch = x.shape[0] if batch_first else x.shape[1]
    shape = (batch, 1, x.shape[-1]) if batch_first else (1, batch, x.shape[-1])
    return torch.cat([x, *(row.to(x.dtype).expand(shape) for row in rows)], dim=1 if batch_first else 0)


def _pad_last(mask: Optional[Tensor], columns: int) -> Optional[Tensor]:
    """Append `columns` unmasked key columns (False / 0.0 in torch's convention) to a mask."""
    if mask is None or columns == 0:
        return mask
    return F.pad(mask, (0, columns), value=False if mask.dtype == torch.bool else 0.0)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose need_weights=False path runs fused_attn.attention.

    Constructor, parameters, buffers and state_dict are torch's (it subclasses
    torch.nn.MultiheadAttention), so a torch state_dict loads into it and back unchanged:

        MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                           add_zero_attn=False, kdim=None, vdim=None, batch_first=False,
                           device=None, dtype=None)

    `forward` has torch's signature and conventions (see `forward`). With need_weights=False the
    attention itself is fused: the L x S weights are never materialized, q/k/v are head views of
    the projections (no copies), the masks are merged into one broadcastable mask, and dropout
    (in training mode only) uses fused_attn's Philox stream. need_weights=True (torch's default)
    delegates to torch's implementation, which returns the weights; so does nested-tensor input.
    `MultiheadAttention.from_torch(module)` converts an existing torch module.
    """

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention) -> "MultiheadAttention":
        """A fused_attn MultiheadAttention with `module`'s configuration, parameters and train/eval mode."""
        weight = module.out_proj.weight
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
                  add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
                  vdim=module.vdim, batch_first=module.batch_first, device=weight.device, dtype=weight.dtype)
        new.load_state_dict(module.state_dict())
        return new.train(module.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Attention of query over key/value, as torch.nn.MultiheadAttention.forward.

        Args:
            query: (L, E) unbatched, (L, N, E), or (N, L, E) with batch_first.
            key: (S, kdim) / (S, N, kdim) / (N, S, kdim); value likewise with vdim.
            key_padding_mask: (S,) or (N, S). bool: True = ignore that key; float: added.
            need_weights: also return the attention weights (torch's path, not fused). Pass
                False for the fused path.
            attn_mask: (L, S) or (N * num_heads, L, S). bool: True = NOT allowed to attend
                (the opposite of SDPA's convention); float: added to the scores.
            average_attn_weights: average the returned weights over heads (need_weights only).
            is_causal: a hint that attn_mask is the causal mask (attn_mask is still required, as
                in torch); without a key_padding_mask the fused path then applies a top-left
                causal mask and ignores attn_mask, as torch does.

        Returns:
            (attn_output, attn_weights): attn_output (L, E) / (L, N, E) / (N, L, E) in query's
            dtype; attn_weights None when need_weights=False, else torch's (N, L, S) averaged or
            (N, num_heads, L, S). Rows whose keys are all masked give out_proj(0) (fused path).
        """
        if need_weights or query.is_nested or key.is_nested or value.is_nested:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None

    # ------------------------------------------------------------------------------------------
    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The q, k, v input projections in the inputs' layout; one matmul for self-attention."""
        embed = self.embed_dim
        bias = self.in_proj_bias
        if self._qkv_same_embed_dim and query is key and key is value:
            qkv = F.linear(query, self.in_proj_weight, bias)
            return qkv[..., :embed], qkv[..., embed:2 * embed], qkv[..., 2 * embed:]
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, b_q), F.linear(key, self.k_proj_weight, b_k),
                    F.linear(value, self.v_proj_weight, b_v))
        weight = self.in_proj_weight
        if key is value:
            kv = F.linear(key, weight[embed:], bias[embed:] if bias is not None else None)
            return F.linear(query, weight[:embed], b_q), kv[..., :embed], kv[..., embed:]
        w_q, w_k, w_v = weight.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _fused_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> Tensor:
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        same_qkv, same_kv = query is key and key is value, key is value
        batch_first = self.batch_first and is_batched
        if not is_batched:  # (L, E) -> (L, 1, E)
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        for mask, name in ((key_padding_mask, "key_padding_mask"), (attn_mask, "attn_mask")):
            if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
                raise AssertionError(f"only bool and floating types of {name} are supported")
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                          "both instead.", stacklevel=3)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        embed_dim = query.shape[-1]
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        _check_mask_shapes(attn_mask, key_padding_mask, query, key, batch_first, self.num_heads)
        if key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"key's sequence and batch dims {tuple(key.shape[:-1])} do not match value's "
                                 f"{tuple(value.shape[:-1])}")
        causal = bool(is_causal and key_padding_mask is None)
        if causal:
            attn_mask = None  # torch trusts the hint and lets SDPA apply is_causal

        # Projections, with identity kept so self-attention is one matmul.
        if same_qkv:
            key = value = query
        elif same_kv:
            value = key
        q, k, v = self._project(query, key, value)
        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = _append_along_sequence(k, [self.bias_k], batch_first)
            v = _append_along_sequence(v, [self.bias_v], batch_first)
            extra += 1
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must both be set or both be None")
        if self.add_zero_attn:
            k = _append_along_sequence(k, [k.new_zeros(1, 1, k.shape[-1])], batch_first)
            v = _append_along_sequence(v, [v.new_zeros(1, 1, v.shape[-1])], batch_first)
            extra += 1
        q, k, v = (_split_heads(t, self.num_heads, batch_first) for t in (q, k, v))
        batch, heads, seqlen_q, _ = q.shape
        seqlen_k = k.shape[2]

        mask = self._merged_mask(_pad_last(attn_mask, extra), _pad_last(key_padding_mask, extra),
                                 batch, seqlen_q, seqlen_k, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        plan = _Plan(q, k, v, mask, _Keywords(causal, None, dropout_p, False, ()))
        if _unsupported_reason(plan) is None:
            out = attention(q, k, v, causal=causal, attn_mask=mask, dropout_p=dropout_p)
        else:  # e.g. an unsupported dtype or head dim: torch's SDPA on the same views
            out = _TORCH_SDPA(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)

        # (N, H, L, d) -> (L, N, E) or (N, L, E), then the output projection.
        if batch_first:
            out = out.transpose(1, 2).reshape(batch, seqlen_q, self.embed_dim)
        else:
            out = out.permute(2, 0, 1, 3).reshape(seqlen_q, batch, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return out if is_batched else out.squeeze(1)

    def _merged_mask(self, attn_mask, key_padding_mask, batch, seqlen_q, seqlen_k, dtype) -> Optional[Tensor]:
        """attn_mask and key_padding_mask (torch's convention: bool True = masked out, float added)
        as one mask in fused_attn's convention (bool True = attend, float added), broadcastable to
        (N, H, L, S) and only as large as the inputs require."""
        masks = []
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                masks.append(attn_mask.view(1, 1, seqlen_q, seqlen_k))
            else:
                masks.append(attn_mask.view(batch, self.num_heads, seqlen_q, seqlen_k))
        if key_padding_mask is not None:
            masks.append(key_padding_mask.view(batch, 1, 1, seqlen_k))
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            hidden = masks[0] if len(masks) == 1 else masks[0] | masks[1]
            return ~hidden
        floats = [m if m.dtype != torch.bool else torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
                  for m in masks]
        bias = floats[0] if len(floats) == 1 else floats[0] + floats[1]
        if bias.dtype not in (dtype, torch.float32):
            bias = bias.to(dtype)
        return bias


def _check_mask_shapes(attn_mask, key_padding_mask, query, key, batch_first, num_heads) -> None:
    """torch's shape rules for the masks (with its messages), before they are viewed as
    (N, H, L, S): a mask of the wrong shape but the right size must not be silently reinterpreted."""
    batch_dim, sequence_dim = (0, 1) if batch_first else (1, 0)
    batch, seqlen_q, seqlen_k = query.shape[batch_dim], query.shape[sequence_dim], key.shape[sequence_dim]
    if attn_mask is not None:
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) != (seqlen_q, seqlen_k):
            raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                               f"{(seqlen_q, seqlen_k)}.")
        # (Sizes compared one by one: torch.compile specializes a dynamic batch on ==, not on `in`.)
        if attn_mask.dim() == 3 and not (attn_mask.shape[0] == batch * num_heads
                                         and tuple(attn_mask.shape[1:]) == (seqlen_q, seqlen_k)):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                               f"{(batch * num_heads, seqlen_q, seqlen_k)}.")
        if attn_mask.is_floating_point() and attn_mask.dtype != query.dtype:
            raise RuntimeError("Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                               f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead.")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, seqlen_k):
        raise AssertionError(f"expecting key_padding_mask shape of {(batch, seqlen_k)}, but got "
                             f"{key_padding_mask.shape}")
