"""The `reference` backend: plain PyTorch, block by block over keys.

It runs anywhere torch runs, supports every feature and float64, and never builds the full
Lq x Lk score matrix: scores exist one key block at a time, so extra memory is O(Lq * BLOCK).
It is the last resort of dispatch and an independent cross-check for the kernels' tests.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..layout import empty_like_layout
from ..options import AttentionOptions
from .base import Backend, Tensor

KEY_BLOCK = 512


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(t: Tensor, heads_kv: int) -> Tensor:
    """(B, Hq, L, D) -> (B, Hkv, G, L, D): query heads grouped by the key/value head they share."""
    return t.unflatten(1, (heads_kv, t.shape[1] // heads_kv))


def _key_blocks(q: Tensor, k: Tensor, opts: AttentionOptions) -> Iterator[tuple[int, int]]:
    """Key blocks [start, end) that at least one query row can see; causal skips the rest."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    stop = seqlen_k
    if opts.causal:
        stop = max(0, min(seqlen_k, seqlen_q + opts.causal_offset(seqlen_q, seqlen_k)))
    for start in range(0, stop, KEY_BLOCK):
        yield start, min(start + KEY_BLOCK, stop)


def _masked_scores(q: Tensor, k_block: Tensor, start: int, seqlen_k: int, opts: AttentionOptions) -> Tensor:
    """scale * q @ k_block^T with masked entries set to -inf. q (..., Lq, D), k_block (..., N, D)."""
    scores = torch.matmul(q, k_block.transpose(-1, -2)) * opts.scale
    if opts.causal:
        seqlen_q = q.shape[-2]
        rows = torch.arange(seqlen_q, device=q.device)[:, None]
        cols = torch.arange(start, start + k_block.shape[-2], device=q.device)[None, :]
        visible = cols <= rows + opts.causal_offset(seqlen_q, seqlen_k)
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


class ReferenceBackend(Backend):
    name = "reference"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions) -> tuple[Tensor, Tensor]:
        acc_dtype = _accumulation_dtype(q.dtype)
        heads_kv = k.shape[1]
        qg = _grouped(q, heads_kv).to(acc_dtype)
        row_shape = qg.shape[:-1]
        row_max = qg.new_full(row_shape, float("-inf"))
        row_sum = qg.new_zeros(row_shape)
        acc = qg.new_zeros((*row_shape, v.shape[-1]))
        for start, end in _key_blocks(q, k, opts):
            k_block = k[:, :, None, start:end].to(acc_dtype)
            v_block = v[:, :, None, start:end].to(acc_dtype)
            scores = _masked_scores(qg, k_block, start, k.shape[2], opts)
            new_max = torch.maximum(row_max, scores.amax(-1))
            # Rows with nothing visible yet keep max -inf; subtracting 0 keeps exp() at 0, not NaN.
            safe_max = torch.where(new_max == float("-inf"), 0.0, new_max)
            probs = torch.exp(scores - safe_max[..., None])
            rescale = torch.exp(row_max - safe_max)
            row_sum = row_sum * rescale + probs.sum(-1)
            acc = acc * rescale[..., None] + torch.matmul(probs, v_block)
            row_max = new_max
        empty = row_sum == 0
        out = acc / torch.where(empty, 1.0, row_sum)[..., None]
        lse = torch.where(empty, float("-inf"), row_max + torch.log(row_sum))
        result = empty_like_layout(q, (*q.shape[:3], v.shape[-1]))
        result.copy_(out.flatten(1, 2))
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return result, lse.flatten(1, 2).to(lse_dtype)

    def backward(
        self,
        dout: Tensor,
        dlse: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        opts: AttentionOptions,
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc_dtype = _accumulation_dtype(q.dtype)
        heads_kv = k.shape[1]
        qg = _grouped(q, heads_kv).to(acc_dtype)
        dog = _grouped(dout, heads_kv).to(acc_dtype)
        # d(loss)/d(score_ij) = p_ij * (dp_ij - delta_i), delta_i = rowsum(dO * O) - dlse_i.
        delta = (dog * _grouped(out, heads_kv).to(acc_dtype)).sum(-1) - _grouped(dlse, heads_kv).to(acc_dtype)
        # Empty rows have lse = -inf; +inf makes every p_ij = exp(s_ij - lse_i) exactly 0.
        lse = _grouped(lse, heads_kv).to(acc_dtype)
        lse = torch.where(lse == float("-inf"), float("inf"), lse)
        dq = torch.zeros_like(qg)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        for start, end in _key_blocks(q, k, opts):
            k_block = k[:, :, None, start:end].to(acc_dtype)
            v_block = v[:, :, None, start:end].to(acc_dtype)
            probs = torch.exp(_masked_scores(qg, k_block, start, k.shape[2], opts) - lse[..., None])
            dv[:, :, start:end] = torch.matmul(probs.transpose(-1, -2), dog).sum(2)
            dprobs = torch.matmul(dog, v_block.transpose(-1, -2))
            dscores = probs * (dprobs - delta[..., None]) * opts.scale
            dq += torch.matmul(dscores, k_block)
            dk[:, :, start:end] = torch.matmul(dscores.transpose(-1, -2), qg).sum(2)
        return (
            _copy_into_layout(dq.flatten(1, 2), q),
            _copy_into_layout(dk, k),
            _copy_into_layout(dv, v),
        )


def _copy_into_layout(grad: Tensor, like: Tensor) -> Tensor:
    result = empty_like_layout(like, tuple(like.shape))
    result.copy_(grad)
    return result
