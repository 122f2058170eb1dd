"""fused_attn.attention_with_kvcache: decoding against a contiguous or paged KV cache."""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

from . import host_checks, plans
from .backends import get_backend
from .backends.base import append_by_indexing
from .checks import check_alibi_slopes, check_dense, check_qkv, make_options
from .dispatch import select_backend
from .layout import kvcache_outputs
from .ops import needs_the_op
from .options import AttentionOptions, AttentionTensors

Tensor = torch.Tensor


def _kvcache_forward_impl(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, block_table: Optional[Tensor],
    alibi_slopes: Optional[Tensor], scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    opts = AttentionOptions(scale=scale, causal=causal, bottom_right=True, window_left=window_left,
                            window_right=window_right, softcap=softcap)
    return get_backend(backend).kvcache_forward(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, opts)


def _eager_kvcache_forward(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, k, v,
                           opts: AttentionOptions, backend: str) -> tuple[Tensor, Tensor]:
    """New tokens appended, then _kvcache_forward, with the options already built: the op where
    needs_the_op says so (the append then is indexed writes that torch.compile and torch.jit.trace
    record, so a traced module writes the caches in place too), else the backend directly, which
    may fuse the append (the op's dispatch costs more than a small decoding step)."""
    inputs = (q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes)
    if q.numel() == 0:  # no query rows (B, Lq or Hq is 0): the new tokens are still written
        if k is not None:
            append_by_indexing(k_cache, v_cache, block_table, cache_seqlens, k, v)
        return kvcache_outputs(q, v_cache)
    if not needs_the_op(inputs + (k, v)):
        return get_backend(backend).kvcache_forward(*inputs, opts, k, v)
    if k is not None:
        # (a sequence whose new tokens were not written gets length -1: cache_seqlens + Lnew
        # might fit where the tokens did not)
        lengths = append_by_indexing(k_cache, v_cache, block_table, cache_seqlens, k, v)
        inputs = (q, k_cache, v_cache, lengths, block_table, alibi_slopes)
    return _kvcache_forward(*inputs, opts.scale, opts.causal, opts.window_left, opts.window_right, opts.softcap,
                            backend)


_kvcache_forward = torch.library.custom_op("fused_attn::kvcache_forward", _kvcache_forward_impl, mutates_args=())


@_kvcache_forward.register_fake
def _(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, *scalars):
    return kvcache_outputs(q, v_cache)


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Union[Tensor, int],
    *,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention of new queries against a KV cache, for decoding (inference only, no autograd).

    Args:
        q: (B, Lq, Hq, D) queries of the new tokens (sequence-major, as models hold them).
        k_cache, v_cache: a contiguous cache (B, capacity, Hkv, D) / (B, capacity, Hkv, Dv), or,
            with block_table, a paged one (num_pages, page_size, Hkv, D) / (..., Dv).
        cache_seqlens: int32 (B,) (or one int for all): how many cached tokens each sequence has.
        k, v: optional (B, Lnew, Hkv, D) / (B, Lnew, Hkv, Dv) new tokens. They are written into
            the caches IN PLACE at positions cache_seqlens[b] .. cache_seqlens[b] + Lnew - 1 and
            then attended to; cache_seqlens itself is not modified. The caches must then have
            memory of their own for each element (not expand()ed views).
        block_table: int32 (B, max_pages_per_sequence): page i of sequence b is k_cache[block_table[b, i]].
        causal: query i (of Lq) sees keys up to i + seqlen_k - Lq: the cache convention, bottom-right
            aligned; causal_alignment must stay "bottom_right".
        scale, window, alibi_slopes, softcap: as in `fused_attn.attention`, aligned bottom-right.
        dropout_p: must be 0 (inference only).
        backend: as in `fused_attn.attention` ("triton", "cuda", "cpu" or "reference").

    Returns:
        out (B, Lq, Hq, Dv) in q's dtype; with return_lse also lse (B, Hq, Lq) float32 (float64
        for float64 input).

    The lengths and pages are checked on the host, one device-to-host transfer (a sync on GPUs;
    none when cache_seqlens is an int and the cache contiguous), once per GPU tensor and version
    (the first layer of a step); not while torch.compile traces or a CUDA graph is captured, nor
    for GPU tensors with FUSED_ATTN_HOST_CHECKS=0 (no sync). A tensor made under
    torch.inference_mode has no version counter: the triton and cuda backends check it the first
    time they see it (the reference backend on every call). Where the host does not check, the
    triton and cuda kernels do: a sequence whose length with its new tokens lies outside
    [0, capacity], or one of whose pages is not a page of the cache, reads nothing and gets NaN
    out and lse rows, and new tokens are never written outside the cache (a compiled call's
    append and the reference backend judge them alike; the cpu backend's op raises a RuntimeError).
    See fused_attn/host_checks.py.
    torch.jit.trace records the append and the attention, so a traced module writes the caches in
    place as eager calls do; the host checks run while tracing, not in the traced module, and an
    int cache_seqlens becomes a constant of the trace (with a TracerWarning): pass a tensor.
    Long caches are split across programs (split-KV) automatically where a call has too few
    (sequence, key/value head) pairs to fill the GPU or the CPU's cores. The query rows of a GQA
    group share one program (or CPU task), so each cached key is read once per key/value head.
    """
    arguments = (cache_seqlens, k, v, block_table, causal, causal_alignment, scale, dropout_p, window, alibi_slopes,
                 softcap, return_lse)
    key = plans.signature("attention_with_kvcache",
                          (q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes),
                          (causal, causal_alignment, scale, dropout_p, window, softcap, return_lse, backend))
    opts, name = plans.recall(key) or plans.remember(key, _plan(q, k_cache, v_cache, *arguments, backend=backend))
    if k is not None:  # (strides are not part of a plan's key)
        _check_writable(k_cache, "k_cache")
        _check_writable(v_cache, "v_cache")
    seqlens, host_lengths = _seqlens_tensor(cache_seqlens, q)
    _check_capacity(seqlens, 0 if k is None else k.shape[1], k_cache, block_table, host_lengths,
                    get_backend(name).judges_cache_values)
    # No input requires grad (checked), so nothing below is recorded for autograd.
    out, lse = _eager_kvcache_forward(q, k_cache, v_cache, seqlens, block_table, alibi_slopes, k, v, opts, name)
    return (out, lse) if return_lse else out


def _plan(q, k_cache, v_cache, cache_seqlens, k, v, block_table, causal, causal_alignment, scale, dropout_p, window,
          alibi_slopes, softcap, return_lse, *, backend) -> tuple[AttentionOptions, str]:
    """What a call with these arguments runs with (its options and backend) after every check but
    those of the lengths' and pages' values (plans.py keeps it for the calls like it)."""
    check_dense(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k=k, v=v,
                block_table=block_table, alibi_slopes=alibi_slopes)
    _check_kvcache_inputs(q, k_cache, v_cache, block_table, k, v)
    _check_cache_seqlens(cache_seqlens, q)
    if causal_alignment != "bottom_right":
        raise ValueError(f"causal_alignment must be 'bottom_right' for KV-cache attention, got {causal_alignment!r}")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0 for KV-cache attention (inference only), got {dropout_p!r}")
    opts = make_options(q, causal=causal, causal_alignment="bottom_right", scale=scale, window=window,
                        softcap=softcap, dropout_p=0.0, deterministic=False,
                        reach=q.shape[1] + _capacity(k_cache, block_table))
    check_alibi_slopes(alibi_slopes, q.shape[0], q.shape[2], q.device)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    # (Backends judge a KV-cache call by its device, dtype and head dims, the same in either layout.)
    return opts, select_backend(q, k_cache, v_cache, AttentionTensors(alibi_slopes=alibi_slopes), opts, backend,
                                kvcache=True)


def _check_kvcache_inputs(q, k_cache, v_cache, block_table, k, v) -> None:
    """Checks the tensors: the attention rules (dtypes, devices, heads, head dims) on their
    (B, H, L, D) shapes, a paged cache's pages standing for each sequence's keys."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dimensional tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    batch, seqlen_q, heads_q, head_dim = q.shape
    cache_rows, page_size, heads_kv, k_head_dim = k_cache.shape
    v_rows, v_page_size, v_heads, v_head_dim = v_cache.shape
    if block_table is not None:  # every sequence reads pages of the pool
        cache_rows = v_rows = batch
    check_qkv(q, k_cache, v_cache, shapes=((batch, heads_q, seqlen_q, head_dim),
                                           (cache_rows, heads_kv, page_size, k_head_dim),
                                           (v_rows, v_heads, v_page_size, v_head_dim)), names=("q", "k_cache", "v_cache"))
    if block_table is not None:
        if page_size == 0:
            raise ValueError(f"a paged cache's pages must hold at least one token: k_cache of shape "
                             f"{tuple(k_cache.shape)} is (num_pages, page_size = 0, Hkv, D)")
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
            raise TypeError("block_table must be an int32 tensor of shape (batch, max_pages_per_sequence)")
        if block_table.shape[0] != batch or block_table.device != q.device:
            raise ValueError(f"block_table must have {batch} rows (the batch) on {q.device}, "
                             f"got {tuple(block_table.shape)} on {block_table.device}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must agree but in the last dim, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise TypeError(f"k and v must be tensors, got {type(k).__name__} and {type(v).__name__}")
        expected_k = (batch, k.shape[1] if k.dim() == 4 else -1, heads_kv, k_head_dim)
        expected_v = (batch, expected_k[1], heads_kv, v_head_dim)
        if tuple(k.shape) != expected_k or tuple(v.shape) != expected_v:
            raise ValueError(f"k and v must be (B, Lnew, Hkv, D) = {expected_k} and {expected_v}, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype or k.device != q.device or v.device != q.device:
            raise TypeError("k and v must have the caches' dtype and q's device")
    if q.requires_grad or k_cache.requires_grad or v_cache.requires_grad or (
            k is not None and (k.requires_grad or v.requires_grad)):
        raise ValueError("attention_with_kvcache is inference only: its inputs must not require grad")


def _check_writable(cache: Tensor, name: str) -> None:
    """New tokens are written into the caches in place: a cache in which several elements share
    memory (a dim of stride 0, as expand() makes) would keep one sequence's token for all of them,
    so it is refused, as torch refuses in-place writes into such a tensor."""
    if 0 in cache.stride() and any(stride == 0 and size > 1 for size, stride in zip(cache.shape, cache.stride())):
        raise ValueError(f"{name} of strides {cache.stride()} has elements that share memory (an expand()ed "
                         "view): new tokens cannot be written into it; pass a tensor of its own (clone() it)")


def _check_cache_seqlens(cache_seqlens, q) -> None:
    """cache_seqlens: an int, or an int32 (B,) tensor on q's device (its values: _check_capacity)."""
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not -2 ** 31 <= cache_seqlens < 2 ** 31:  # (other negative ones: _check_capacity)
            raise ValueError(f"cache_seqlens must fit int32 (and the cache), got {cache_seqlens}")
        return
    batch = q.shape[0]
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor of shape ({batch},)")
    if tuple(cache_seqlens.shape) != (batch,) or cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must have shape ({batch},) on {q.device}, got "
                         f"{tuple(cache_seqlens.shape)} on {cache_seqlens.device}")


def _seqlens_tensor(cache_seqlens, q) -> tuple[Tensor, Optional[list[int]]]:
    """cache_seqlens (checked) as a contiguous int32 tensor on q's device, and the lengths on the
    host when they are known there without a transfer (an int was given), else None."""
    if isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens.contiguous(), None  # the kernels read it as a plain array
    if torch.jit.is_tracing():  # not a tensor, so not an input of the trace: it would be replayed
        warnings.warn(f"torch.jit.trace records cache_seqlens={cache_seqlens} as a constant: the traced module "
                      "reads that many cached tokens on every call; pass an int32 tensor to trace the lengths",
                      torch.jit.TracerWarning, stacklevel=3)
    batch = q.shape[0]
    return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device), [cache_seqlens] * batch


# Block tables up to this many entries are checked in Python on the host (_check_capacity).
_SMALL_TABLE = 4096


def _capacity(k_cache: Tensor, block_table: Optional[Tensor]) -> int:
    """How many keys a sequence's cache holds: a contiguous cache's length, or its pages' worth."""
    return k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])


def _check_capacity(seqlens: Tensor, new_tokens: int, k_cache: Tensor, block_table: Optional[Tensor],
                    host_lengths: Optional[list[int]] = None, kernels_judge: bool = False) -> None:
    """Every sequence must fit its cache; pages must exist. One device-to-host transfer (a sync on
    GPUs), when and as often as host_checks.py says (once per step for a model's layers; with
    kernels_judge, the chosen backend's kernels check the values too); none when the lengths are
    known on the host (host_lengths) and so is what else is checked (a contiguous cache, or a
    block table on the CPU)."""
    if seqlens.numel() == 0:  # a batch of 0: nothing to check
        return
    capacity = _capacity(k_cache, block_table)
    facts = ("kvcache", new_tokens, k_cache.shape[:2], capacity, None if host_lengths is None else tuple(host_lengths))
    host_checks.check_once(
        lambda: _check_lengths_and_pages(seqlens, new_tokens, k_cache, block_table, capacity, host_lengths),
        seqlens.device, facts, seqlens if host_lengths is None else None, block_table, guarded=kernels_judge)


def _check_lengths_and_pages(seqlens: Tensor, new_tokens: int, k_cache: Tensor, block_table: Optional[Tensor],
                             capacity: int, host_lengths: Optional[list[int]]) -> None:
    """_check_capacity's checks of the values, read on the host."""
    page_size = k_cache.shape[1]
    # One device-to-host transfer for every check.
    if block_table is None:
        # B ints: cheaper than reducing them on the device first
        lengths = host_checks.read(seqlens) if host_lengths is None else host_lengths
        shortest, longest, page_range = min(lengths), max(lengths) + new_tokens, ()
    elif block_table.device.type == "cpu" and block_table.numel() <= _SMALL_TABLE:
        # A small table on the host: Python over its rows beats ten small tensor ops (~40 us).
        lengths = host_checks.read(seqlens) if host_lengths is None else host_lengths
        shortest, longest = min(lengths), max(lengths) + new_tokens
        rows = block_table.tolist()
        needed = [page for row, n in zip(rows, lengths) for page in row[:-(-(n + new_tokens) // page_size)]]
        page_range = (min(needed), max(needed)) if needed else ()
    else:
        lengths = seqlens.long() + new_tokens
        used = -(-lengths // page_size)  # pages each sequence needs
        needed = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < used[:, None]
        pages = block_table.long()
        found = [seqlens.min().long(), lengths.max(), torch.where(needed, pages, 0).min(),
                 torch.where(needed, pages, -1).max()]
        shortest, longest, *page_range = host_checks.read(torch.stack(found))
    if shortest < 0:
        raise ValueError("cache_seqlens must be >= 0")
    if longest > capacity:
        raise ValueError(f"cache_seqlens + new tokens ({longest}) exceeds the cache capacity ({capacity})")
    if page_range and page_range[0] < 0:
        raise ValueError(f"block_table has a negative page index ({page_range[0]}) among the pages that "
                         "cache_seqlens + new tokens use")
    if page_range and page_range[1] >= k_cache.shape[0]:
        raise ValueError(f"block_table points past the {k_cache.shape[0]} pages of k_cache")
