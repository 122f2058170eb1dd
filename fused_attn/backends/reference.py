"""The `reference` backend: plain PyTorch, block by block over keys.

It runs anywhere torch runs, supports every feature and float64, and never builds the full
Lq x Lk score matrix: scores exist one key block at a time, so extra memory is O(Lq * BLOCK).
It is the last resort of dispatch and an independent cross-check for the kernels' tests.
"""
from __future__ import annotations

import functools
from typing import Iterator, Optional

import torch

from ..dropout import keep_mask_from_seed
from ..layout import empty_like_layout
from ..options import HIDING_BIAS, AttentionOptions, AttentionTensors
from .base import Backend, Tensor, as_4d

KEY_BLOCK = 512


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(t: Tensor, heads_kv: int) -> Tensor:
    """(B, Hq, ...) -> (B, Hkv, G, ...): query heads grouped by the key/value head they share."""
    return t.unflatten(1, (heads_kv, t.shape[1] // heads_kv))


class _Problem:
    """One call's inputs arranged for block-by-block work: query heads grouped, scalars resolved."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors, opts: AttentionOptions,
                 first_batch: int = 0):
        self.acc_dtype = _accumulation_dtype(q.dtype)
        self.batch, self.heads_q, self.seqlen_q = q.shape[:3]
        self.heads_kv, self.seqlen_k = k.shape[1], k.shape[2]
        self.k, self.v, self.extras, self.opts = k, v, extras, opts
        self.q = _grouped(q, self.heads_kv).to(self.acc_dtype)
        self.shift = opts.causal_offset(self.seqlen_q, self.seqlen_k)
        self.rows = torch.arange(self.seqlen_q, device=q.device)
        full = (self.batch, self.heads_q, self.seqlen_q, self.seqlen_k)
        self.mask = None if extras.mask is None else _grouped(as_4d(extras.mask).expand(full), self.heads_kv)
        self.bias = None if extras.bias is None else _grouped(as_4d(extras.bias).expand(full), self.heads_kv)
        self.slopes = None
        if extras.alibi_slopes is not None:
            slopes = extras.alibi_slopes.expand(self.batch, self.heads_q).to(self.acc_dtype)
            self.slopes = _grouped(slopes, self.heads_kv)[..., None, None]
        # Dropout counters use the batch index of the whole call (first_batch: one packed sequence's).
        first = first_batch * self.heads_q
        self.batch_heads = torch.arange(first, first + self.batch * self.heads_q, device=q.device).view(
            self.batch, self.heads_kv, -1, 1, 1)

    def key_blocks(self) -> Iterator[tuple[int, int]]:
        """Key blocks [start, end) that some query row can see; blocks outside every window are skipped."""
        opts = self.opts
        first = 0 if opts.left < 0 else max(0, self.shift - opts.left)
        stop = self.seqlen_k if opts.right < 0 else min(self.seqlen_k, self.seqlen_q + self.shift + opts.right)
        for start in range(first, stop, KEY_BLOCK):
            yield start, min(start + KEY_BLOCK, stop)

    def kv_block(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        return (self.k[:, :, None, start:end].to(self.acc_dtype), self.v[:, :, None, start:end].to(self.acc_dtype))

    def scores(self, k_block: Tensor, start: int) -> tuple[Tensor, Optional[Tensor]]:
        """Final scores of one key block (masked entries -inf), and tanh of the softcap (or None)."""
        opts = self.opts
        end = start + k_block.shape[-2]
        scores = torch.matmul(self.q, k_block.transpose(-1, -2)) * opts.scale
        tanh = None
        if opts.softcap > 0:
            tanh = torch.tanh(scores / opts.softcap)
            scores = opts.softcap * tanh
        cols = torch.arange(start, end, device=scores.device)
        distance = cols[None, :] - (self.rows[:, None] + self.shift)  # j - (i + shift)
        if self.slopes is not None:
            scores = scores - self.slopes * distance.abs()
        hidden = torch.zeros_like(distance, dtype=torch.bool)
        if self.bias is not None:
            bias = self.bias[..., start:end]
            scores = scores + bias.to(self.acc_dtype)
            hidden = hidden | (bias <= HIDING_BIAS)
        if opts.left >= 0:
            hidden |= distance < -opts.left
        if opts.right >= 0:
            hidden |= distance > opts.right
        if self.mask is not None:
            hidden = hidden | ~self.mask[..., start:end]
        return scores.masked_fill(hidden, float("-inf")), tanh

    def dropout_scale(self, start: int, end: int) -> Optional[Tensor]:
        """keep / (1 - p) for one key block, or None without dropout."""
        p = self.opts.dropout_p
        if p == 0:
            return None
        cols = torch.arange(start, end, device=self.rows.device)
        keep = keep_mask_from_seed(self.extras.dropout_seed, self.batch, self.heads_q, self.rows, cols, p,
                                   batch_heads=self.batch_heads)
        return keep.to(self.acc_dtype) / (1 - p)


def _packed_sequences(extras: AttentionTensors):
    """Per packed sequence: its index, query and key row ranges, and its own extras."""
    bounds_q = extras.cu_seqlens_q.tolist()
    bounds_k = extras.cu_seqlens_k.tolist()
    for index in range(len(bounds_q) - 1):
        slopes = extras.alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[index:index + 1]
        yield (index, slice(bounds_q[index], bounds_q[index + 1]), slice(bounds_k[index], bounds_k[index + 1]),
               AttentionTensors(alibi_slopes=slopes, dropout_seed=extras.dropout_seed))


def _as_batch(packed: Tensor) -> Tensor:
    """(L, H, D) rows of one packed sequence -> a (1, H, L, D) view."""
    return packed.transpose(0, 1).unsqueeze(0)


def _without_autocast(method):
    """The method run with autocast off on its first tensor's device: the reference computes in
    float32 (float64 for float64 inputs) as it converts its inputs, which autocast would undo by
    running its matmuls in its own dtype (the caller's autocast already cast the inputs)."""
    @functools.wraps(method)
    def run(self, first, *args, **kwargs):
        device = first.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return method(self, first, *args, **kwargs)
        return method(self, first, *args, **kwargs)
    return run


class ReferenceBackend(Backend):
    name = "reference"
    twice_differentiable = True  # its backward is torch operations

    @_without_autocast
    def forward(self, q, k, v, extras, opts, first_batch: int = 0):
        if q.dim() == 3:
            return self._varlen_forward(q, k, v, extras, opts)
        problem = _Problem(q, k, v, extras, opts, first_batch)
        row_shape = problem.q.shape[:-1]
        row_max = problem.q.new_full(row_shape, float("-inf"))
        row_sum = problem.q.new_zeros(row_shape)
        acc = problem.q.new_zeros((*row_shape, v.shape[-1]))
        for start, end in problem.key_blocks():
            k_block, v_block = problem.kv_block(start, end)
            scores, _ = problem.scores(k_block, start)
            new_max = torch.maximum(row_max, scores.amax(-1))
            # Rows with nothing visible yet keep max -inf; subtracting 0 keeps exp() at 0, not NaN.
            safe_max = torch.where(new_max == float("-inf"), 0.0, new_max)
            probs = torch.exp(scores - safe_max[..., None])
            rescale = torch.exp(row_max - safe_max)
            row_sum = row_sum * rescale + probs.sum(-1)
            dropout = problem.dropout_scale(start, end)
            if dropout is not None:
                probs = probs * dropout
            acc = acc * rescale[..., None] + torch.matmul(probs, v_block)
            row_max = new_max
        empty = row_sum == 0
        out = acc / torch.where(empty, 1.0, row_sum)[..., None]
        lse = torch.where(empty, float("-inf"), row_max + torch.log(row_sum))
        result = empty_like_layout(q, v.shape[-1])
        result.copy_(out.flatten(1, 2))
        return result, lse.flatten(1, 2).to(_accumulation_dtype(q.dtype))

    def _varlen_forward(self, q, k, v, extras, opts):
        out = q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
        lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=_accumulation_dtype(q.dtype))
        for index, rows, keys, own in _packed_sequences(extras):
            if rows.stop > rows.start and keys.stop > keys.start:
                seq_out, seq_lse = self.forward(_as_batch(q[rows]), _as_batch(k[keys]), _as_batch(v[keys]), own, opts,
                                                first_batch=index)
                out[rows] = seq_out[0].transpose(0, 1)
                lse[:, rows] = seq_lse[0]
        return out, lse

    def _varlen_backward(self, dout, dlse, q, k, v, out, lse, extras, opts):
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        for index, rows, keys, own in _packed_sequences(extras):
            if rows.stop > rows.start and keys.stop > keys.start:
                seq_grads = self.backward(
                    _as_batch(dout[rows]), dlse[:, rows].unsqueeze(0), _as_batch(q[rows]), _as_batch(k[keys]),
                    _as_batch(v[keys]), _as_batch(out[rows]), lse[:, rows].unsqueeze(0), own, opts, False,
                    first_batch=index,
                )
                for grad, seq_grad, span in zip(grads, seq_grads, (rows, keys, keys)):
                    grad[span] = seq_grad[0].transpose(0, 1)
        return (*grads, None)

    @_without_autocast
    def backward(self, dout, dlse, q, k, v, out, lse, extras, opts, bias_requires_grad, first_batch: int = 0):
        if q.dim() == 3:
            return self._varlen_backward(dout, dlse, q, k, v, out, lse, extras, opts)
        problem = _Problem(q, k, v, extras, opts, first_batch)
        acc_dtype, heads_kv = problem.acc_dtype, problem.heads_kv
        dog = _grouped(dout, heads_kv).to(acc_dtype)
        # d(loss)/d(score_ij) = p_ij * (dp_ij - delta_i), delta_i = rowsum(dO * O) - dlse_i.
        delta = (dog * _grouped(out, heads_kv).to(acc_dtype)).sum(-1) - _grouped(dlse, heads_kv).to(acc_dtype)
        # Empty rows have lse = -inf; +inf makes every p_ij = exp(s_ij - lse_i) exactly 0.
        lse = _grouped(lse, heads_kv).to(acc_dtype)
        lse = torch.where(lse == float("-inf"), float("inf"), lse)
        dq = torch.zeros_like(problem.q)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        dbias = None
        if bias_requires_grad:
            dbias = torch.zeros(as_4d(extras.bias).shape, dtype=acc_dtype, device=q.device)
        for start, end in problem.key_blocks():
            k_block, v_block = problem.kv_block(start, end)
            scores, tanh = problem.scores(k_block, start)
            probs = torch.exp(scores - lse[..., None])
            dprobs = torch.matmul(dog, v_block.transpose(-1, -2))
            dropped = probs
            dropout = problem.dropout_scale(start, end)
            if dropout is not None:
                dropped = probs * dropout
                dprobs = dprobs * dropout
            dv[:, :, start:end] = torch.matmul(dropped.transpose(-1, -2), dog).sum(2)
            dscores = probs * (dprobs - delta[..., None])
            if dbias is not None:
                _accumulate_bias_grad(dbias, dscores.flatten(1, 2), start, end)
            if tanh is not None:
                dscores = dscores * (1 - tanh * tanh)
            dscores = dscores * opts.scale
            dq += torch.matmul(dscores, k_block)
            dk[:, :, start:end] = torch.matmul(dscores.transpose(-1, -2), problem.q).sum(2)
        grads = (_copy_into_layout(dq.flatten(1, 2), q), _copy_into_layout(dk, k), _copy_into_layout(dv, v))
        if dbias is not None:
            dbias = dbias.reshape(extras.bias.shape).to(extras.bias.dtype)
        return (*grads, dbias)


    supports_kvcache = True

    @_without_autocast
    def decode(self, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, opts):
        batch, seqlen_q, heads_q, _ = q.shape
        out = q.new_zeros((batch, seqlen_q, heads_q, v_cache.shape[-1]))
        lse = q.new_full((batch, heads_q, seqlen_q), float("-inf"), dtype=_accumulation_dtype(q.dtype))
        for index, length in enumerate(seqlens_k.tolist()):
            rows = _cached_rows(k_cache, v_cache, block_table, index, length)
            if rows is None:
                out[index], lse[index] = float("nan"), float("nan")
                continue
            if length == 0:
                continue
            keys, values = rows
            slopes = alibi_slopes
            if slopes is not None and slopes.dim() == 2:
                slopes = slopes[index:index + 1]
            seq_out, seq_lse = self.forward(
                q[index:index + 1].transpose(1, 2), keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                AttentionTensors(alibi_slopes=slopes), opts,
            )
            out[index] = seq_out[0].transpose(0, 1)
            lse[index] = seq_lse[0]
        return out, lse


def _cached_rows(k_cache: Tensor, v_cache: Tensor, block_table: Optional[Tensor], index: int,
                 length: int) -> Optional[tuple[Tensor, Tensor]]:
    """Sequence `index`'s first `length` keys and values, (length, Hkv, D) each; None where they
    do not all lie in the cache. Lengths and pages the host did not check (a traced call's) are
    judged as the kernels judge them: such a sequence reads nothing and gets NaN rows."""
    page_size = k_cache.shape[1]
    if not 0 <= length <= page_size * (1 if block_table is None else block_table.shape[1]):
        return None
    if block_table is None:
        return k_cache[index, :length], v_cache[index, :length]
    pages = block_table[index, :-(-length // page_size)].long()
    if pages.numel() and (pages.min() < 0 or pages.max() >= k_cache.shape[0]):
        return None
    return tuple(cache[pages].flatten(0, 1)[:length] for cache in (k_cache, v_cache))


def _accumulate_bias_grad(dbias: Tensor, dscores: Tensor, start: int, end: int) -> None:
    """Add one key block's score gradient (B, Hq, Lq, N), summed over the bias's broadcast dims."""
    broadcast = [dim for dim in range(3) if dbias.shape[dim] == 1 and dscores.shape[dim] != 1]
    if broadcast:
        dscores = dscores.sum(broadcast, keepdim=True)
    if dbias.shape[3] == 1:
        dbias += dscores.sum(3, keepdim=True)
    else:
        dbias[..., start:end] += dscores


def _copy_into_layout(grad: Tensor, like: Tensor) -> Tensor:
    result = empty_like_layout(like, like.shape[-1])
    result.copy_(grad)
    return result
