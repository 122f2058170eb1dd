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
    # Whether backward's gradients are themselves differentiable (a backward written in torch
    # operations, which autograd records under create_graph=True). Where not, differentiating them
    # raises instead of silently giving no second-order terms.
    twice_differentiable: bool = False

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all, or None if it can."""
        return None

    def unsupported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors, opts: AttentionOptions, kvcache: bool = False
    ) -> list[str]:
        """Every reason this backend cannot serve this call; empty when it can. kvcache: the call is
        attention_with_kvcache's, q (B, Lq, Hq, D) against caches (B or pages, L, Hkv, D)."""
        return []

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors, opts: AttentionOptions
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    supports_kvcache: bool = False
    # Whether a KV-cache call's kernels check lengths and pages on the device as they read and
    # write them (a sequence outside the cache gets NaN rows, new tokens outside it are not
    # written), so that the host may skip the checks it cannot make without a sync.
    judges_cache_values: bool = False
    # Whether forward sends decoding-shaped dense calls (takes_decoding_kernel) to decode's kernels.
    decodes_few_query_rows: bool = False

    def path(self, q: Tensor, k: Tensor, v: Tensor, extras: AttentionTensors, opts: AttentionOptions) -> Optional[str]:
        """How forward would run this dense call, where the backend has more than one way (for
        `fused_attn.explain`); None for its plain kernels."""
        if self.decodes_few_query_rows and takes_decoding_kernel(q, k, v, extras, opts):
            rows = q.shape[2] * (q.shape[1] // k.shape[1])
            return f"with its decoding kernel: {rows} query rows per key/value head against {k.shape[2]} keys"
        return None

    def kvcache_forward(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, block_table: Optional[Tensor],
        alibi_slopes: Optional[Tensor], opts: AttentionOptions, k: Optional[Tensor] = None,
        v: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Decoding (inference only): q (B, Lq, Hq, D) against a contiguous (B, capacity, Hkv, D)
        or paged (pages, page_size, Hkv, D) cache, bottom-right aligned. New keys and values k, v
        (B, Lnew, Hkv, D / Dv), if given, are first written into the caches in place after each
        sequence's cache_seqlens[b] tokens; sequence b then sees its first cache_seqlens[b] + Lnew
        keys. Returns out (B, Lq, Hq, Dv) and lse (B, Hq, Lq) float32.

        Backends implement decode, and override this where their kernels write the new tokens."""
        if k is not None:
            cache_seqlens = append_by_indexing(k_cache, v_cache, block_table, cache_seqlens, k, v)
        return self.decode(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, opts)

    def decode(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, block_table: Optional[Tensor],
        alibi_slopes: Optional[Tensor], opts: AttentionOptions,
    ) -> tuple[Tensor, Tensor]:
        """kvcache_forward without new tokens: q against the first seqlens_k[b] keys of the cache."""
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


def append_by_indexing(k_cache: Tensor, v_cache: Tensor, block_table: Optional[Tensor], cache_seqlens: Tensor,
                       k: Tensor, v: Tensor) -> Tensor:
    """Write new tokens k, v (B, Lnew, Hkv, D) into the caches in place, after each sequence's
    cache_seqlens[b] tokens (through block_table's pages for a paged cache), by indexed
    assignments: any device, and torch.compile and torch.jit.trace record them.

    Traced calls reach here with lengths and pages the host never checked, so the writes judge
    them as the kernels do: a sequence whose tokens would lie outside [0, capacity), or on a page
    that is not one of the cache's, writes nothing. One indexed write of fixed shape cannot skip
    tokens, so each such token is sent to a valid token's slot with that token's value (the same
    write twice), or, where no token is valid, writes a slot's own value back.

    Returns each sequence's length with its new tokens, -1 where they were not written (a length
    outside the cache, which the kernels judge as such)."""
    batch, new_tokens = k.shape[:2]
    page_size = k_cache.shape[1]
    capacity = page_size * (1 if block_table is None else block_table.shape[1])
    lengths = cache_seqlens.long()
    valid = (lengths >= 0) & (lengths + new_tokens <= capacity)
    if batch * new_tokens == 0 or capacity == 0 or k_cache.shape[0] == 0:
        # nothing to write, or no slot to write it in
        return torch.where(valid, cache_seqlens + new_tokens, -1).to(cache_seqlens.dtype)
    positions = (lengths[:, None] + torch.arange(new_tokens, device=k.device)).clamp(0, capacity - 1)
    if block_table is None:
        slots = (torch.arange(batch, device=k.device)[:, None].expand(batch, new_tokens), positions)
    else:
        pages = block_table.long().gather(1, positions // page_size)
        valid = valid & ((pages >= 0) & (pages < k_cache.shape[0])).all(1)
        slots = (pages.clamp(0, k_cache.shape[0] - 1), positions % page_size)
    judged = torch.where(valid, cache_seqlens + new_tokens, -1).to(cache_seqlens.dtype)
    valid = valid[:, None].expand(batch, new_tokens).reshape(-1)
    slots = tuple(index.reshape(-1) for index in slots)
    # (index_select by a 1-element tensor: indexing by a 0-d one would read it on the host)
    donor = valid.to(torch.int32).argmax().view(1)  # the first valid token (token 0 when there is none)
    donor_valid = valid.index_select(0, donor)[:, None, None]
    slots = tuple(torch.where(valid, index, index.index_select(0, donor)) for index in slots)
    donor_slot = tuple(index.index_select(0, donor) for index in slots)
    for cache, tokens in ((k_cache, k), (v_cache, v)):
        tokens = tokens.reshape(batch * new_tokens, *tokens.shape[2:])
        donor_value = torch.where(donor_valid, tokens.index_select(0, donor), cache[donor_slot])
        cache[slots] = torch.where(valid[:, None, None], tokens, donor_value)
    return judged


# Dense calls of fewer queries than keys, with at most this many query rows per key/value head
# (Lq x the GQA group), take the decoding kernel: the plain forward would give each query head one
# mostly empty block of rows and read every key once per query head, with B x Hq programs in all.
DECODING_ROWS = 64


def needs_backward(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a forward on these inputs will be followed by a backward (one of them requires grad)."""
    for t in tensors:  # (a plain loop: this runs twice on every call)
        if t is not None and t.requires_grad:
            return True
    return False


def takes_decoding_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: AttentionTensors,
                          opts: AttentionOptions) -> bool:
    """Whether a dense call (q (B, Hq, Lq, D)) is decoding-shaped (few query rows against more
    keys) and in what the decoding kernel computes: no mask, bias or dropout, and the diagonal
    bottom-right aligned, or not used; and no backward follows, which recomputes the scores as the
    block kernels do: P = exp(S - lse) needs the forward's S rounded alike, and the decoding
    kernels sum their dot products in another order."""
    seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
    if q.dim() != 4 or seqlen_q >= seqlen_k or seqlen_q * (q.shape[1] // k.shape[1]) > DECODING_ROWS:
        return False
    if needs_backward(q, k, v):
        return False
    if extras.mask is not None or extras.bias is not None or opts.dropout_p > 0:
        return False
    uses_diagonal = opts.causal or opts.left >= 0 or opts.right >= 0 or extras.alibi_slopes is not None
    return opts.bottom_right or not uses_diagonal
