"""Decoding against a KV cache (contiguous and paged, with and without appending new tokens)
against float64 attention over each sequence's cached prefix."""
import pytest
import torch

from conftest import BACKENDS, DEVICE
from oracle import assert_accurate, naive_attention, random_qkv

import fused_attn

B, HQ, HKV, D, DV, CAPACITY, PAGE = 3, 8, 2, 32, 24, 100, 16
# Backends whose KV-cache kernels run on GPUs, where the host checks can be turned off.
KVCACHE_GPU_BACKENDS = ("triton", "cuda")


def make_cache(dtype):
    return (torch.randn(B, CAPACITY, HKV, D, dtype=dtype, device=DEVICE),
            torch.randn(B, CAPACITY, HKV, DV, dtype=dtype, device=DEVICE))


def with_strided_last_dim(t):
    """t's values in a tensor whose last dim has stride 2."""
    return torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)[..., ::2].copy_(t)


def paged_copy(k_cache, v_cache, page=PAGE):
    """The same cache scattered over shuffled pages of `page` keys (plus unused ones, random), and
    its block table."""
    batch, capacity, heads = k_cache.shape[:3]
    pages_per_sequence = -(-capacity // page)
    total_pages = batch * pages_per_sequence + 3
    table = torch.randperm(total_pages, device=DEVICE)[:batch * pages_per_sequence].view(batch, pages_per_sequence)
    k_pages, v_pages = (torch.randn(total_pages, page, heads, cache.shape[-1], dtype=cache.dtype, device=DEVICE)
                        for cache in (k_cache, v_cache))
    for b in range(batch):
        for i in range(pages_per_sequence):
            n = min(page, capacity - i * page)
            k_pages[table[b, i], :n] = k_cache[b, i * page:i * page + n]
            v_pages[table[b, i], :n] = v_cache[b, i * page:i * page + n]
    return k_pages, v_pages, table.to(torch.int32)


CASES = [
    pytest.param(1, 1, dict(causal=True), id="decode-one-token-append"),
    pytest.param(5, 5, dict(causal=True), id="append-five-causal"),
    pytest.param(3, 0, dict(causal=True, window=(12, -1)), id="window"),
    pytest.param(1, 0, dict(softcap=4.0, alibi_slopes="per-head"), id="alibi-softcap"),
    pytest.param(2, 0, dict(), id="no-mask"),
    # Query rows of several heads share a block (GQA packing) only while they fit one: 20 rows of 4
    # heads do not, 70 rows take two blocks per head.
    pytest.param(20, 4, dict(causal=True, window=(30, -1)), id="twenty-rows"),
    pytest.param(70, 0, dict(causal=True), id="prefill-seventy"),
]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("seqlen_q, new_tokens, keywords", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kvcache_matches_attention_on_the_prefix(kvcache_backend, dtype, seqlen_q, new_tokens, keywords, paged):
    keywords = dict(keywords)
    if keywords.get("alibi_slopes") == "per-head":
        keywords["alibi_slopes"] = torch.rand(B, HQ, device=DEVICE)
    k_cache, v_cache = make_cache(dtype)
    # Lengths that name the edge cases: an empty cache, a middle one, a cache filled to capacity.
    cached = torch.tensor([0, 37, CAPACITY - new_tokens], dtype=torch.int32, device=DEVICE)
    if new_tokens == 0:
        cached[0] = 1
    q = torch.randn(B, seqlen_q, HQ, D, dtype=dtype, device=DEVICE)
    k_new = torch.randn(B, new_tokens, HKV, D, dtype=dtype, device=DEVICE) if new_tokens else None
    v_new = torch.randn(B, new_tokens, HKV, DV, dtype=dtype, device=DEVICE) if new_tokens else None
    caches, table = (k_cache.clone(), v_cache.clone()), None
    if paged:
        *caches, table = paged_copy(k_cache, v_cache)
    cached_before = cached.clone()
    out, lse = fused_attn.attention_with_kvcache(q, *caches, cached, k=k_new, v=v_new, block_table=table,
                                                 return_lse=True, backend=kvcache_backend, **keywords)
    assert out.shape == (B, seqlen_q, HQ, DV) and lse.shape == (B, HQ, seqlen_q)
    assert torch.equal(cached, cached_before), "cache_seqlens must not be modified"

    for b in range(B):
        length = int(cached[b])
        keys = torch.cat([k_cache[b, :length], k_new[b]]) if new_tokens else k_cache[b, :length]
        values = torch.cat([v_cache[b, :length], v_new[b]]) if new_tokens else v_cache[b, :length]
        slopes = keywords.get("alibi_slopes")
        ref_keywords = dict(causal=keywords.get("causal", False), window=keywords.get("window", (-1, -1)),
                            softcap=keywords.get("softcap", 0.0), bottom_right=True,
                            alibi_slopes=None if slopes is None else slopes[b:b + 1])
        args = (q[b:b + 1].transpose(1, 2), keys.transpose(0, 1)[None], values.transpose(0, 1)[None])
        exact_out, exact_lse = naive_attention(*args, dtype=torch.float64, **ref_keywords)
        low_out, _ = naive_attention(*args, **ref_keywords)
        assert_accurate(f"out[{b}]", out[b], exact_out[0].transpose(0, 1), low_out[0].transpose(0, 1), dtype)
        torch.testing.assert_close(lse[b].double(), exact_lse[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("page", [None, 16, 48], ids=["contiguous", "pages-of-16", "pages-of-48"])
@pytest.mark.parametrize("keywords", [dict(), dict(causal=True, window=(300, 0))], ids=["plain", "window"])
@pytest.mark.parametrize("seqlen_q", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decoding_long_caches_with_whole_vector_rows(kvcache_backend, dtype, seqlen_q, keywords, page):
    """Head dims of whole vectors (64), where the cpu backend's decoding reads K and V where they
    lie, in their own dtype (converted as its products load them), a page run at a time, asking for
    rows ahead as it goes; over many key blocks and splits (caches of up to 1000 keys), with a
    window that starts steps mid-block, against float64."""
    batch, heads_q, heads_kv, dim, capacity = 3, 8, 2, 64, 1000
    k_cache, v_cache = (torch.randn(batch, capacity, heads_kv, dim, dtype=dtype, device=DEVICE) for _ in range(2))
    cached = torch.tensor([capacity, 517, 1], dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, seqlen_q, heads_q, dim, dtype=dtype, device=DEVICE)
    caches, table = (k_cache, v_cache), None
    if page is not None:
        *caches, table = paged_copy(k_cache, v_cache, page)
    out = fused_attn.attention_with_kvcache(q, *caches, cached, block_table=table, backend=kvcache_backend,
                                            **keywords)
    for b in range(batch):
        length = int(cached[b])
        args = (q[b:b + 1].transpose(1, 2), k_cache[b:b + 1, :length].transpose(1, 2),
                v_cache[b:b + 1, :length].transpose(1, 2))
        ref_keywords = dict(causal=keywords.get("causal", False), window=keywords.get("window", (-1, -1)),
                            bottom_right=True)
        exact_out, _ = naive_attention(*args, dtype=torch.float64, **ref_keywords)
        low_out, _ = naive_attention(*args, **ref_keywords)
        assert_accurate(f"out[{b}]", out[b], exact_out[0].transpose(0, 1), low_out[0].transpose(0, 1), dtype)


@pytest.mark.parametrize("page", [None, 48], ids=["contiguous", "pages-of-48"])
@pytest.mark.parametrize("seqlen_q", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decoding_many_key_value_heads(kvcache_backend, dtype, seqlen_q, page):
    """Hq = 32 and Hkv = 8, the GPU sweep's heads: the cpu backend's tasks then read every key/value
    head's rows of a key, side by side in the cache, key after key, several heads' queries to a
    vector (binding.cpp, decoding_kv_heads); ALiBi slopes differ per head, so a head's scores that
    met another head's queries would show."""
    batch, heads_q, heads_kv, dim, capacity = 2, 32, 8, 64, 300
    k_cache, v_cache = (torch.randn(batch, capacity, heads_kv, dim, dtype=dtype, device=DEVICE) for _ in range(2))
    cached = torch.tensor([capacity, 133], dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, seqlen_q, heads_q, dim, dtype=dtype, device=DEVICE)
    slopes = torch.rand(heads_q, device=DEVICE)
    caches, table = (k_cache, v_cache), None
    if page is not None:
        *caches, table = paged_copy(k_cache, v_cache, page)
    out = fused_attn.attention_with_kvcache(q, *caches, cached, block_table=table, causal=True, alibi_slopes=slopes,
                                            backend=kvcache_backend)
    for b in range(batch):
        length = int(cached[b])
        args = (q[b:b + 1].transpose(1, 2), k_cache[b:b + 1, :length].transpose(1, 2),
                v_cache[b:b + 1, :length].transpose(1, 2))
        ref_keywords = dict(causal=True, bottom_right=True, alibi_slopes=slopes)
        exact_out, _ = naive_attention(*args, dtype=torch.float64, **ref_keywords)
        low_out, _ = naive_attention(*args, **ref_keywords)
        assert_accurate(f"out[{b}]", out[b], exact_out[0].transpose(0, 1), low_out[0].transpose(0, 1), dtype)
    if page is None:  # the same reads in a dense call on (B, H, L, D) views of the caches, no backward to follow
        args = (q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2))
        dense = fused_attn.attention(*args, causal=True, causal_alignment="bottom_right", alibi_slopes=slopes,
                                     backend=kvcache_backend)
        exact_out, _ = naive_attention(*args, dtype=torch.float64, causal=True, bottom_right=True, alibi_slopes=slopes)
        low_out, _ = naive_attention(*args, causal=True, bottom_right=True, alibi_slopes=slopes)
        assert_accurate("dense out", dense, exact_out, low_out, dtype)


def write_and_attend(q, k_cache, v_cache, cached, k_new, v_new, table, backend):
    return fused_attn.attention_with_kvcache(q, k_cache, v_cache, cached, k=k_new, v=v_new, block_table=table,
                                             causal=True, backend=backend)


@pytest.mark.parametrize("backend", [name for name in KVCACHE_GPU_BACKENDS if name in BACKENDS])
def test_unchecked_missing_pages_outside_a_window_are_never_read(monkeypatch, backend):
    """Unchecked, with a window: a missing page that holds only keys before the window may sit in a
    key block the loop loads for the window's first keys. It is never read past the cache (the
    interpreter's bounds checks and the sanitized emulator would say): the sequence gets NaN rows
    or, where the kernel loads no key of that page, its window's attention."""
    from fused_attn import host_checks

    monkeypatch.setattr(host_checks, "skipped", lambda device: True)
    k_cache, v_cache = make_cache(torch.float32)
    k_pages, v_pages, table = paged_copy(k_cache, v_cache)
    cached = torch.tensor([90, 40, 70], dtype=torch.int32, device=DEVICE)
    for b, page in ((0, 4), (1, 0), (2, 3)):  # keys 64..79 of 90, 0..15 of 40, 48..63 of 70
        table[b, page] = k_pages.shape[0] + 10 ** 6
    q = torch.randn(B, 1, HQ, D, device=DEVICE)
    out = fused_attn.attention_with_kvcache(q, k_pages, v_pages, cached, block_table=table, window=(5, 0),
                                            backend=backend)
    for b in range(B):
        length = int(cached[b])
        expected = fused_attn.attention(q[b:b + 1].transpose(1, 2), k_cache[b:b + 1, :length].transpose(1, 2),
                                        v_cache[b:b + 1, :length].transpose(1, 2), window=(5, 0), causal=True,
                                        causal_alignment="bottom_right", backend="reference").transpose(1, 2)
        if not out[b].isnan().all():
            torch.testing.assert_close(out[b:b + 1], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", [name for name in KVCACHE_GPU_BACKENDS if name in BACKENDS])
def test_unchecked_new_tokens_past_the_capacity_are_written_nowhere(monkeypatch, backend, paged):
    """Unchecked, sequence 0 holds capacity - 1 keys and gets 2 new tokens: the one at position
    capacity is written nowhere (one row further lies sequence 1's first row, or the page its
    table names next; the one before it may land in the cache's last row); sequence 1's tokens
    land where they belong and nothing else changes."""
    from fused_attn import host_checks

    monkeypatch.setattr(host_checks, "skipped", lambda device: True)
    capacity, page = 32, 16
    k_cache, v_cache = (torch.randn(2, capacity, 2, 32, device=DEVICE) for _ in range(2))
    table = None
    if paged:
        k_cache, v_cache, table = paged_copy(k_cache, v_cache, page)
    before = k_cache.clone(), v_cache.clone()
    k_new, v_new = (torch.randn(2, 2, 2, 32, device=DEVICE) for _ in range(2))
    fused_attn.attention_with_kvcache(torch.randn(2, 1, 4, 32, device=DEVICE), k_cache, v_cache,
                                      torch.tensor([capacity - 1, 5], dtype=torch.int32, device=DEVICE), k=k_new,
                                      v=v_new, block_table=table, backend=backend)
    for cache, old, new in zip((k_cache, v_cache), before, (k_new, v_new)):
        last = (table[0, 1], page - 1) if paged else (0, capacity - 1)
        expected = old.clone()
        expected[(table[1, 0], slice(5, 7)) if paged else (1, slice(5, 7))] = new[1]
        assert torch.equal(cache[last], old[last]) or torch.equal(cache[last], new[0, 0])
        expected[last] = cache[last]
        assert torch.equal(cache, expected)


@pytest.mark.parametrize("backend", [name for name in KVCACHE_GPU_BACKENDS if name in BACKENDS])
def test_unchecked_missing_page_past_a_blocks_causal_reach_is_never_read(monkeypatch, backend):
    """Unchecked, causal, with several blocks of query rows: a block whose rows see keys only up to
    80 of 86 loads a key block that runs past 80, onto the page of keys 80..95, which is missing.
    Pages are checked as far as the loop loads, not as far as the rows see, so nothing is read
    past the cache (the interpreter's bounds checks would say): each row is NaN or, where its
    block loads no key of that page, its attention; the last rows, which see it, are NaN."""
    from fused_attn import host_checks

    monkeypatch.setattr(host_checks, "skipped", lambda device: True)
    k_cache, v_cache = make_cache(torch.float32)
    k_pages, v_pages, table = paged_copy(k_cache, v_cache)
    table[0, 5] = k_pages.shape[0] + 10 ** 6
    q = torch.randn(1, 70, HQ, D, device=DEVICE)
    out = fused_attn.attention_with_kvcache(q, k_pages, v_pages, torch.tensor([86], dtype=torch.int32, device=DEVICE),
                                            block_table=table[:1], causal=True, backend=backend)
    expected = fused_attn.attention(q.transpose(1, 2), k_cache[:1, :86].transpose(1, 2),
                                    v_cache[:1, :86].transpose(1, 2), causal=True, causal_alignment="bottom_right",
                                    backend="reference").transpose(1, 2)
    assert out[:, -1].isnan().all()
    for row in range(70):
        if not out[:, row].isnan().all():
            torch.testing.assert_close(out[:, row], expected[:, row], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype, strided", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16-strided-new-tokens"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_new_tokens_are_written_in_place_and_nothing_else(kvcache_backend, paged, dtype, strided, compiled):
    """Eager calls may write the new tokens inside the backend's op (the cpu one does); traced ones
    write them with indexed assignments that torch.compile functionalizes. Both change the
    caches in place, at the new tokens' positions only."""
    k_cache, v_cache = make_cache(dtype)
    caches, table = [k_cache.clone(), v_cache.clone()], None
    if paged:
        *caches, table = paged_copy(k_cache, v_cache)
    before = [c.clone() for c in caches]
    cached = torch.tensor([3, 0, 90], dtype=torch.int32, device=DEVICE)
    if strided:  # (B, 4, Hkv, D) views whose heads are further apart than their positions
        k_new = torch.randn(B, HKV, 4, D, dtype=dtype, device=DEVICE).transpose(1, 2)
        v_new = torch.randn(B, HKV, 4, 2 * DV, dtype=dtype, device=DEVICE).transpose(1, 2)[..., ::2]
    else:
        k_new = torch.randn(B, 4, HKV, D, dtype=dtype, device=DEVICE)
        v_new = torch.randn(B, 4, HKV, DV, dtype=dtype, device=DEVICE)
    q = torch.randn(B, 4, HQ, D, dtype=dtype, device=DEVICE)
    call = write_and_attend
    if compiled:
        torch._dynamo.reset()  # each parametrization traces anew instead of piling up recompilations
        call = torch.compile(write_and_attend, fullgraph=True, backend="aot_eager")
    out = call(q, *caches, cached, k_new, v_new, table, kvcache_backend)
    expected_out = fused_attn.attention(q.transpose(1, 2), k_new.transpose(1, 2), v_new.transpose(1, 2),
                                        causal=True, causal_alignment="bottom_right", backend="reference")
    # Sequence 1 had an empty cache: it attends to exactly the new tokens.
    torch.testing.assert_close(out[1], expected_out[1].transpose(0, 1), rtol=2e-2, atol=2e-2)
    for cache, old, new in zip(caches, before, (k_new, v_new)):
        expected = old.clone()
        for b in range(B):
            for t in range(4):
                position = int(cached[b]) + t
                if table is None:
                    expected[b, position] = new[b, t]
                else:
                    expected[table[b, position // PAGE], position % PAGE] = new[b, t]
        assert torch.equal(cache, expected)


@pytest.mark.parametrize("seqlen_q", [1, 2])
def test_decoding_windows_at_key_block_edges(kvcache_backend, seqlen_q):
    """The decoding kernels start at the key block that holds a window's first key: left bounds
    that put that key one either side of a block edge (blocks of 16, 32 or 64 keys), through a
    KV-cache call and through a dense call, which takes the same kernels."""
    keys = 100
    k_cache = torch.randn(1, keys, HKV, D, device=DEVICE)
    v_cache = torch.randn(1, keys, HKV, DV, device=DEVICE)
    q = torch.randn(1, seqlen_q, HQ, D, device=DEVICE)
    as_bhld = [t.transpose(1, 2) for t in (q, k_cache, v_cache)]
    for left in (left for left in range(keys) if (keys - 1 - left) % 16 in (0, 1, 15)):
        keywords = dict(window=(left, 0), causal=True)
        expected = fused_attn.attention(*as_bhld, causal_alignment="bottom_right", backend="reference", **keywords)
        out = fused_attn.attention_with_kvcache(q, k_cache, v_cache, keys, backend=kvcache_backend, **keywords)
        torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-4, atol=1e-4, msg=f"window {left}")
        dense = fused_attn.attention(*as_bhld, causal_alignment="bottom_right", backend=kvcache_backend, **keywords)
        torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-4, msg=f"dense, window {left}")


@pytest.mark.parametrize("capacity", [20, 300], ids=["one-split", "several-splits"])
def test_split_kv_matches_one_pass(kvcache_backend, capacity):
    """Split-KV partial results merged by their lse (or a single split taken as is) equal one pass."""
    k_cache = torch.randn(1, capacity, HKV, D, device=DEVICE)
    v_cache = torch.randn(1, capacity, HKV, DV, device=DEVICE)
    q = torch.randn(1, 1, HQ, D, device=DEVICE)
    out = fused_attn.attention_with_kvcache(q, k_cache, v_cache, capacity, backend=kvcache_backend)
    ref = fused_attn.attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                               backend="reference").transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def qkv_cache():
    q = torch.randn(B, 1, HQ, D, device=DEVICE)
    k_cache, v_cache = make_cache(torch.float32)
    return q, k_cache, v_cache


@pytest.mark.parametrize("change, error, message", [
    (dict(cache_seqlens=torch.tensor([1, 2, 101], dtype=torch.int32)), ValueError, r"exceeds the cache capacity \(100\)"),
    (dict(cache_seqlens=torch.tensor([1, 2, 3])), TypeError, r"cache_seqlens must be an int or an int32 tensor"),
    (dict(cache_seqlens=torch.tensor([1, 2], dtype=torch.int32)), ValueError, r"cache_seqlens must have shape \(3,\)"),
    (dict(k_cache=torch.randn(B, CAPACITY, 3, D), v_cache=torch.randn(B, CAPACITY, 3, DV)), ValueError,
     r"must be a multiple of the number of key/value heads"),
    (dict(k_cache=torch.randn(B, CAPACITY, 1, D)), ValueError, r"k_cache and v_cache must have the same number of heads"),
    (dict(q=torch.randn(B, 1, HQ, D + 1)), ValueError, r"q and k_cache must have the same head dim"),
    (dict(k=torch.randn(B, 1, HKV, D)), ValueError, r"k and v must be given together"),
    (dict(k=torch.randn(B, 1, HKV, D), v=torch.randn(B, 2, HKV, DV)), ValueError, r"k and v must be \(B, Lnew, Hkv, D\)"),
    (dict(dropout_p=0.1), ValueError, r"dropout_p must be 0 for KV-cache attention"),
    (dict(causal_alignment="top_left"), ValueError, r"causal_alignment must be 'bottom_right'"),
    (dict(block_table=torch.zeros(B, 7, dtype=torch.int64)), TypeError, r"block_table must be an int32 tensor"),
    (dict(block_table=torch.zeros(B, 1, dtype=torch.int32), v_cache=torch.randn(B, CAPACITY, 1, DV)), ValueError,
     r"k_cache and v_cache must have the same number of heads"),
    (dict(k_cache=torch.randn(B, CAPACITY, HKV, D, dtype=torch.float64)), TypeError,
     r"q, k_cache and v_cache must share one dtype"),
    (dict(cache_seqlens=2 ** 40), ValueError, r"cache_seqlens must fit int32"),
    (dict(k_cache=torch.randn(3, 0, HKV, D), v_cache=torch.randn(3, 0, HKV, DV), cache_seqlens=0,
          block_table=torch.zeros(B, 2, dtype=torch.int32)), ValueError, r"a paged cache's pages must hold at least one"),
    (dict(k=1.0, v=torch.randn(B, 1, HKV, DV)), TypeError, r"k and v must be tensors"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_kvcache_bad_input(change, error, message):
    q, k_cache, v_cache = qkv_cache()
    arguments = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32))
    arguments.update({key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
                      for key, value in change.items()})
    with pytest.raises(error, match=message):
        fused_attn.attention_with_kvcache(arguments.pop("q"), arguments.pop("k_cache"), arguments.pop("v_cache"),
                                          arguments.pop("cache_seqlens"), **arguments)


def test_caches_sharing_memory_across_elements_take_no_new_tokens(kvcache_backend):
    """New tokens are written in place, so an expand()ed cache (one batch row's memory for all) is
    refused with them, also after a call of the same shapes on a cache of its own (strides are not
    part of a remembered plan), and attended to without them."""
    q, k_cache, v_cache = qkv_cache()
    shared_k, shared_v = (cache[:1].expand(cache.shape) for cache in (k_cache, v_cache))
    lengths = torch.tensor([1, 2, 3], dtype=torch.int32, device=DEVICE)
    k_new, v_new = torch.randn(B, 1, HKV, D, device=DEVICE), torch.randn(B, 1, HKV, DV, device=DEVICE)
    fused_attn.attention_with_kvcache(q, k_cache, v_cache, lengths, k=k_new, v=v_new, backend=kvcache_backend)
    before = shared_k.clone(), shared_v.clone()
    for caches, name in (((shared_k, v_cache), "k_cache"), ((k_cache, shared_v), "v_cache")):
        with pytest.raises(ValueError, match=rf"{name} of strides \(0, .*share memory"):
            fused_attn.attention_with_kvcache(q, *caches, lengths, k=k_new, v=v_new, backend=kvcache_backend)
    assert torch.equal(shared_k, before[0]) and torch.equal(shared_v, before[1])
    out = fused_attn.attention_with_kvcache(q, shared_k, shared_v, lengths, backend=kvcache_backend)
    expected = fused_attn.attention_with_kvcache(q, *(t.contiguous() for t in (shared_k, shared_v)), lengths,
                                                 backend=kvcache_backend)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("width", [4, 2100], ids=["small-table", "large-table"])
def test_block_table_past_the_pages(width):
    """Small host tables are checked in Python, large ones (and device ones) with tensor ops;
    entries past the pages each sequence uses are never read, so they are not checked."""
    q = torch.randn(B, 1, HQ, D, device=DEVICE)
    k_pages = torch.randn(10, PAGE, HKV, D, device=DEVICE)
    v_pages = torch.randn(10, PAGE, HKV, DV, device=DEVICE)
    table = torch.full((B, width), 3, dtype=torch.int32, device=DEVICE)
    table[:, 2:] = 99
    out = fused_attn.attention_with_kvcache(q, k_pages, v_pages, 20, block_table=table)
    assert out.isfinite().all()
    table[1, 1] = 10
    with pytest.raises(ValueError, match="block_table points past the 10 pages of k_cache"):
        fused_attn.attention_with_kvcache(q, k_pages, v_pages, 20, block_table=table)
    table[1, 1] = -1
    with pytest.raises(ValueError, match=r"block_table has a negative page index \(-1\) among the pages"):
        fused_attn.attention_with_kvcache(q, k_pages, v_pages, 20, block_table=table)


@pytest.mark.parametrize("batch, seqlen_q", [(0, 1), (B, 0)], ids=["no-sequences", "no-queries"])
@pytest.mark.parametrize("appended", [False, True], ids=["cache-only", "append"])
def test_kvcache_without_query_rows_still_appends(kvcache_backend, batch, seqlen_q, appended):
    """A call without query rows returns empty outputs and still writes its new tokens."""
    k_cache, v_cache = (c[:batch] for c in make_cache(torch.float32))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q = torch.randn(batch, seqlen_q, HQ, D, device=DEVICE)
    k_new, v_new = (torch.randn(batch, 2, HKV, dim, device=DEVICE) if appended else None for dim in (D, DV))
    lengths = torch.arange(3, 3 + batch, dtype=torch.int32, device=DEVICE)
    out, lse = fused_attn.attention_with_kvcache(q, k_cache, v_cache, lengths, k=k_new, v=v_new, return_lse=True,
                                                 backend=kvcache_backend)
    assert out.shape == (batch, seqlen_q, HQ, DV) and lse.shape == (batch, HQ, seqlen_q)
    for b in range(batch):
        n = int(lengths[b])
        if appended:
            k_before[b, n:n + 2], v_before[b, n:n + 2] = k_new[b], v_new[b]
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


def test_kvcache_takes_strided_lengths(kvcache_backend):
    """cache_seqlens may be any int32 view, e.g. every other entry of a longer tensor."""
    q, k_cache, v_cache = qkv_cache()
    every_other = torch.tensor([5, -7, 17, -7, 40, -7], dtype=torch.int32, device=DEVICE)[::2]
    out = fused_attn.attention_with_kvcache(q, k_cache, v_cache, every_other, backend=kvcache_backend)
    expected = fused_attn.attention_with_kvcache(q, k_cache, v_cache, every_other.contiguous(),
                                                 backend=kvcache_backend)
    assert torch.equal(out, expected)


def test_kvcache_rejects_inputs_that_require_grad():
    q, k_cache, v_cache = qkv_cache()
    with pytest.raises(ValueError, match="inference only"):
        fused_attn.attention_with_kvcache(q.requires_grad_(), k_cache, v_cache, 5)


def test_lengths_known_on_the_host_are_not_read_back(monkeypatch):
    """An int cache_seqlens is checked as it is: the device copy of the lengths is not read back
    (a sync on GPUs). host_checks.read, the one place values are read, refuses here."""
    from fused_attn import host_checks, kvcache

    def refuse(t):
        raise AssertionError("read back")

    monkeypatch.setattr(host_checks, "read", refuse)
    k_cache, _ = make_cache(torch.float32)
    on_device = torch.full((B,), CAPACITY - 1, dtype=torch.int32, device=DEVICE)
    kvcache._check_capacity(on_device, 1, k_cache, None, [CAPACITY - 1] * B)
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        kvcache._check_capacity(on_device, 2, k_cache, None, [CAPACITY - 1] * B)
    with pytest.raises(AssertionError, match="read back"):  # without the host lengths, the tensor is read
        kvcache._check_capacity(on_device, 1, k_cache, None)


# Dense calls (fused_attn.attention) that the triton backend serves with its decoding kernel
# (backends/base.py, takes_decoding_kernel), with whether they qualify.
DENSE_DECODING_CASES = [
    pytest.param(1, dict(causal=True, causal_alignment="bottom_right", window=(40, 0)), True, id="one-query-window"),
    pytest.param(3, dict(alibi_slopes="per-head", softcap=5.0, causal_alignment="bottom_right"), True,
                 id="three-queries-alibi-softcap"),
    pytest.param(5, dict(), True, id="five-queries-plain"),
    pytest.param(3, dict(causal=True), False, id="top-left-causal-plain-kernel"),
]


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name in ("triton", "cpu")])
@pytest.mark.parametrize("seqlen_q, keywords, decoding", DENSE_DECODING_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_few_query_rows_take_the_decoding_kernel(monkeypatch, backend, dtype, seqlen_q, keywords, decoding):
    """A dense call with few query rows per key/value head runs the decoding kernel (split-KV, a
    GQA group's heads sharing each key) exactly where its semantics allow and no backward follows
    (which recomputes the scores as the plain kernels do), with the same answers (against float64)
    as the plain kernels; with gradients, the plain kernels run. The cpu backend's forward op
    takes decoding's path itself (csrc/binding.cpp, cpu_forward), whatever the alignment: where
    the KV-cache call can express the call, the two agree bit for bit."""
    calls = []
    if backend == "triton":
        from fused_attn.triton import decode

        real = decode.decode_forward
        monkeypatch.setattr(decode, "decode_forward", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    q, k, v = random_qkv(2, 8, 2, seqlen_q, 150, 32, 24, dtype, DEVICE, sequence_major=True)
    if keywords.get("alibi_slopes") == "per-head":
        keywords = dict(keywords, alibi_slopes=torch.rand(8, device=DEVICE))
    naive = dict(causal=keywords.get("causal", False), window=keywords.get("window", (-1, -1)),
                 bottom_right=keywords.get("causal_alignment") == "bottom_right",
                 alibi_slopes=keywords.get("alibi_slopes"), softcap=keywords.get("softcap", 0.0))
    out = fused_attn.attention(q, k, v, backend=backend, **keywords)
    if backend == "triton":
        assert len(calls) == (1 if decoding else 0)
    elif decoding:
        cache_keywords = {name: value for name, value in keywords.items() if name != "causal_alignment"}
        as_cache = fused_attn.attention_with_kvcache(*(t.transpose(1, 2) for t in (q, k, v)), k.shape[2],
                                                     backend="cpu", **cache_keywords)
        assert torch.equal(out, as_cache.transpose(1, 2))
    exact, low = (naive_attention(q, k, v, **naive, **dtype_)[0] for dtype_ in (dict(dtype=torch.float64), {}))
    assert_accurate("out", out, exact, low, dtype)

    calls.clear()
    for t in (q, k, v):
        t.requires_grad_()
    out = fused_attn.attention(q, k, v, backend=backend, **keywords)
    assert calls == []
    exact, low = (naive_attention(q, k, v, **naive, **dtype_)[0] for dtype_ in (dict(dtype=torch.float64), {}))
    assert_accurate("out", out, exact, low, dtype)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    exact_grads = torch.autograd.grad(exact, (q, k, v), grad_out.double())
    low_grads = torch.autograd.grad(low, (q, k, v), grad_out)
    for name, grad, exact_grad, low_grad in zip("qkv", grads, exact_grads, low_grads):
        assert_accurate(f"d{name}", grad, exact_grad, low_grad, dtype)


# Where sequence 2 of unchecked_call's paged cache names a page the cache does not have: a middle
# page (keys 16..31, in the first key split), its last one (keys 32..47, partly filled, where its
# new tokens go), or that one exactly one past the pool (page id == num_pages).
BAD_PAGES = ("middle", "last", "one-past-the-pool")


def unchecked_call(paged, strided=False, bad_page="middle"):
    """A KV-cache call of which only sequence 0 lies in its cache: sequence 1's length is negative
    (paged: its first page too), sequence 2's with its new tokens past the cache (paged: it fits,
    but one of its pages is not a page of the cache, BAD_PAGES); a missing page of sequence 0's
    lies past its length. Returns the call's arguments, and a check of its outputs and writes:
    sequence 0 as the reference computes it, NaN rows and lse for the others, new tokens written
    only where they fit."""
    k_cache, v_cache = make_cache(torch.float32)
    caches, table = (k_cache.clone(), v_cache.clone()), None
    cached = torch.tensor([60, -7, CAPACITY + 50], dtype=torch.int32, device=DEVICE)
    if paged:
        *caches, table = paged_copy(k_cache, v_cache)
        pages = caches[0].shape[0]
        cached[2] = 40
        table[2, 1 if bad_page == "middle" else 2] = pages if bad_page == "one-past-the-pool" else pages + 1000
        table[1, 0] = -5
        table[0, 5] = -1  # keys 80..95: past sequence 0's 62
    if strided:
        caches = tuple(with_strided_last_dim(t) for t in caches)
    before = tuple(t.clone() for t in caches)
    k_new, v_new = torch.randn(B, 2, HKV, D, device=DEVICE), torch.randn(B, 2, HKV, DV, device=DEVICE)
    q = torch.randn(B, 1, HQ, D, device=DEVICE)

    def check_writes(or_none=False):
        written = [sorted(before[i].ne(caches[i]).any(dim=(2, 3)).nonzero().tolist()) for i in range(2)]
        assert written[0] == written[1]
        if paged:  # sequence 0's tokens 60, 61 went to its page 3; sequence 2's 40, 41 to its page 2 where
            # that page exists; 1's nowhere
            expected = [[int(table[0, 3]), 60 % PAGE], [int(table[0, 3]), 61 % PAGE]]
            if bad_page == "middle":
                expected += [[int(table[2, 2]), 40 % PAGE], [int(table[2, 2]), 41 % PAGE]]
            expected = sorted(expected)
        else:  # only sequence 0's, the one that fits
            expected = [[0, 60], [0, 61]]
        assert written[0] == expected or (or_none and written[0] == [])

    def check(out, lse):
        valid_keys = torch.cat([k_cache[0, :60], k_new[0]]), torch.cat([v_cache[0, :60], v_new[0]])
        expected, expected_lse = fused_attn.attention(q[:1].transpose(1, 2),
                                                      *(t.transpose(0, 1)[None] for t in valid_keys),
                                                      backend="reference", return_lse=True)
        torch.testing.assert_close(out[:1], expected.transpose(1, 2), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lse[:1], expected_lse, rtol=1e-4, atol=1e-4)
        assert out[1:].isnan().all() and lse[1:].isnan().all()
        check_writes()

    return (q, *caches, cached, k_new, v_new, table), check, check_writes


def unchecked_write_and_attend(q, k_cache, v_cache, cached, k_new, v_new, table, backend):
    return fused_attn.attention_with_kvcache(q, k_cache, v_cache, cached, k=k_new, v=v_new, block_table=table,
                                             return_lse=True, backend=backend)


@pytest.mark.parametrize("strided", [False, True], ids=["rows", "strided-last-dim"])
@pytest.mark.parametrize("backend, paged, bad_page", [
    (name, paged, bad_page) for name in KVCACHE_GPU_BACKENDS if name in BACKENDS
    for paged, bad_page in [(False, None)] + [(True, bad) for bad in BAD_PAGES]])
def test_unchecked_lengths_and_pages_give_nan_rows(monkeypatch, backend, paged, bad_page, strided):
    """With the host checks off (CUDA graphs, inference-mode tensors after their first check,
    FUSED_ATTN_HOST_CHECKS=0) the kernels judge lengths and pages themselves: a sequence whose
    length (with its new tokens) is below 0 or past the cache, or one of whose pages is not a page
    of the cache, reads nothing (the interpreter's bounds checks and the sanitized emulator would
    say) and gets NaN rows and lse; new tokens are never written outside the cache; a valid
    sequence of the same call, whose table row names a missing page only past its length, is
    unaffected. Sequence 2's missing page lies in the first of the key splits, so the merge of
    splits carries the NaN. Caches whose last dim is not contiguous (`strided`; the cuda kernels
    read them through copies) are judged alike."""
    from fused_attn import host_checks, layout

    monkeypatch.setattr(host_checks, "skipped", lambda device: True)
    # Outputs start finite (not the NaN of FUSED_ATTN_POISON_OUTPUTS): the NaN must be written.
    monkeypatch.setattr(layout, "new_output", lambda like, shape, dtype: like.new_full(shape, 7.0, dtype=dtype))
    arguments, check, _ = unchecked_call(paged, strided, bad_page)
    check(*unchecked_write_and_attend(*arguments, backend))


@pytest.mark.parametrize("paged, bad_page", [(False, None)] + [(True, bad) for bad in BAD_PAGES],
                         ids=["contiguous"] + [f"paged-{bad}" for bad in BAD_PAGES])
def test_traced_calls_judge_lengths_and_pages(kvcache_backend, paged, bad_page):
    """torch.compile traces the append as indexed writes and checks no lengths or pages on the
    host (it cannot read them): the writes judge them as the kernels do (a negative length
    wrapped around to the cache's last slots, one past the cache raised IndexError after
    writing what fit), and so does the reference backend's decoding. The cpu backend's op checks
    what it is given and raises (the compiled graph then may or may not have applied the writes it
    traced: the functionalized graph writes its inputs back at its end)."""
    torch._dynamo.reset()
    call = torch.compile(unchecked_write_and_attend, fullgraph=True, backend="aot_eager")
    arguments, check, check_writes = unchecked_call(paged, bad_page=bad_page)
    if kvcache_backend == "cpu":
        with pytest.raises(RuntimeError, match=r"cache_seqlens .* must lie within \[0, \d+\], got -1"):
            call(*arguments, kvcache_backend)
        check_writes(or_none=True)
    else:
        check(*call(*arguments, kvcache_backend))
