"""The cuda backend's forward kernels (csrc/cuda/) run on the CPU emulator (tests/cuda_emulator/):
the backend class on the emulated ops (torch.ops.fused_attn_emulated, CPU tensors), called through
fused_attn.attention like any backend, against float64 math with the peers' accuracy rule
(tests/oracle.py). Outputs start as NaN (conftest), so an element the kernels forget fails.
Where the real backend is available (a GPU, and the extension built with the CUDA kernels), the
same matrix also runs on it with CUDA tensors.

Shapes are small (the emulator runs every CUDA thread as a fiber) but cross every block boundary:
64 query rows per block on tensor cores, 32 in fp32; 64 keys per block (32 for head dims > 128).
"""
import math

import pytest
import torch

import test_kvcache as kvcache_tests
from oracle import assert_accurate, naive_attention, random_qkv, tile_sparse_mask

import fused_attn
from fused_attn.backends import BACKENDS, cuda_backend
from fused_attn.options import AttentionOptions, AttentionTensors

CPU = torch.device("cpu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_forward(target, shape, dtype, sequence_major=False, qkv=None, **keywords):
    """attention(**keywords) on `target` vs float64 math: out and lse (dropout replayed from
    torch's generator). shape: (B, Hq, Hkv, Lq, Lk, D, Dv). Returns (out, lse)."""
    device = target.device
    q, k, v = qkv or random_qkv(*shape, dtype=dtype, device=device, sequence_major=sequence_major)
    keywords = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in keywords.items()}
    generator = torch.random if device.type == "cpu" else torch.cuda
    state = generator.get_rng_state()
    out, lse = fused_attn.attention(q, k, v, return_lse=True, backend=target.name, **keywords)
    dropout_p = keywords.get("dropout_p", 0.0)
    keep = None
    if dropout_p > 0:
        generator.set_rng_state(state)
        keep = fused_attn.dropout_keep_mask(shape[0], shape[1], shape[3], shape[4], dropout_p, device)
    naive = dict(causal=keywords.get("causal", False), bottom_right=keywords.get("causal_alignment") == "bottom_right",
                 scale=keywords.get("scale"), window=keywords.get("window", (-1, -1)),
                 softcap=keywords.get("softcap", 0.0), alibi_slopes=keywords.get("alibi_slopes"),
                 attn_mask=keywords.get("attn_mask"), dropout_keep=keep, dropout_p=dropout_p)
    exact_out, exact_lse = naive_attention(q, k, v, dtype=torch.float64, **naive)
    low_out, low_lse = naive_attention(q, k, v, **naive)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == exact_out.shape
    assert_accurate("out", out, exact_out, low_out, dtype)
    assert_accurate("lse", lse, exact_lse, low_lse.to(torch.float32), torch.float32)
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(16, 16), (40, 40), (64, 64), (128, 128), (256, 256), (64, 24), (24, 72), (200, 8),
                                  (17, 59), (1, 3)])
def test_head_dims(cuda, dtype, dims):
    """Every head-dim bucket (32, 64, 128, 256), zero-padded columns, Dv != D, rows that are not
    whole 16-byte chunks (copied element by element); 70 keys cross a block."""
    check_forward(cuda, (1, 2, 1, 19, 70, *dims), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_rows(cuda, dtype):
    """Views starting one element into their storage: rows not 16-byte aligned, read without cp.async."""
    q, k, v = (torch.randn(2, 2, length, 41, device=cuda.device).to(dtype)[..., 1:] for length in (23, 66, 66))
    check_forward(cuda, (2, 2, 2, 23, 66, 40, 40), dtype, qkv=(q, k, v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [(1, 1), (1, 129), (17, 63), (63, 17), (129, 129), (65, 33)])
@pytest.mark.parametrize("alignment", [None, "top_left", "bottom_right"])
def test_lengths_and_causal(cuda, dtype, lengths, alignment):
    """Ragged Lq/Lk on both sides of the blocks; causal both ways (bottom-right with Lq > Lk leaves
    rows that see no key: out 0, lse -inf)."""
    keywords = {} if alignment is None else dict(causal=True, causal_alignment=alignment)
    check_forward(cuda, (1, 1, 1, *lengths, 32, 32), dtype, **keywords)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(6, 2), (4, 1)])
def test_gqa_and_sequence_major(cuda, dtype, heads):
    """GQA and MQA (shared heads read in place), (B, L, H, D) storage seen as (B, H, L, D)."""
    check_forward(cuda, (2, *heads, 33, 47, 64, 64), dtype, sequence_major=True, causal=True)


def test_strided_last_dim(cuda):
    """Inputs whose last dim is not contiguous are copied once by the backend; out keeps q's layout."""
    q, k, v = (torch.randn(2, 3, 21, 80, device=cuda.device)[..., ::2] for _ in range(3))
    out, _ = check_forward(cuda, (2, 3, 3, 21, 21, 40, 40), torch.float32, qkv=(q, k, v))
    assert out.stride(-1) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", [(2, 1, 37, 75), (1, 3, 1, 75), (37, 75), (75,)])
def test_bool_mask(cuda, dtype, mask_shape):
    """Bool masks read in place through broadcast strides; a row masked in full gives out 0, lse -inf."""
    mask = torch.rand(mask_shape) > 0.3
    if len(mask_shape) >= 2 and mask_shape[-2] > 1:
        mask[..., 5, :] = False
    out, lse = check_forward(cuda, (2, 3, 3, 37, 75, 32, 32), dtype, attn_mask=mask)
    if len(mask_shape) >= 2 and mask_shape[-2] > 1:
        assert torch.all(out[..., 5, :] == 0) and torch.all(lse[..., 5] == -math.inf)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_shape", [(2, 3, 37, 75), (1, 3, 37, 75), (2, 1, 1, 75), (37, 1)])
def test_float_bias(cuda, dtype, bias_shape):
    """Float masks are added to the scores (float32 read in place; a 16-bit one converted in its own shape)."""
    bias = torch.randn(bias_shape, dtype=dtype if dtype != torch.float32 else torch.float32)
    check_forward(cuda, (2, 3, 3, 37, 75, 32, 32), dtype, attn_mask=bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", [
    dict(window=(20, 5)),
    dict(window=(0, 0)),
    dict(window=(7, -1), causal=True, causal_alignment="bottom_right"),
    dict(softcap=2.0),
    dict(alibi_slopes="heads"),
    dict(alibi_slopes="batch_heads", causal=True, window=(40, -1)),
    dict(softcap=5.0, alibi_slopes="heads", window=(30, 30), scale=0.3),
    dict(window=(20, 5), scale=0.0),
    dict(window=(20, 5), scale=-0.37),
])
def test_variants(cuda, dtype, variant):
    """Sliding windows (blocks outside them skipped), softcap, ALiBi per head or per (batch, head), combined;
    a zero and a negative scale (scaled before the row maximum, hidden keys never scaled)."""
    variant = dict(variant)
    if variant.get("alibi_slopes") == "heads":
        variant["alibi_slopes"] = torch.rand(4)
    elif variant.get("alibi_slopes") == "batch_heads":
        variant["alibi_slopes"] = torch.rand(2, 4)
    check_forward(cuda, (2, 4, 2, 70, 100, 48, 48), dtype, **variant)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen_q, keywords, decoding", [
    (1, dict(causal=True, causal_alignment="bottom_right", window=(40, 0)), True),
    (3, dict(alibi_slopes="heads", softcap=5.0, causal_alignment="bottom_right"), True),
    (3, dict(causal=True), False),  # top-left with Lq < Lk: the diagonal is not the cache's
    (1, dict(causal=True, causal_alignment="bottom_right", window=(40, 0), scale=-0.37), True),
], ids=["one-query-window", "three-queries-alibi-softcap", "top-left-causal-plain-kernel", "one-query-negative-scale"])
def test_few_query_rows_take_the_decoding_kernel(cuda, monkeypatch, dtype, seqlen_q, keywords, decoding):
    """Dense calls with few query rows per key/value head run the KV-cache kernel (split-KV, a GQA
    group's heads sharing each key read) exactly where its semantics allow, as accurately."""
    backend = BACKENDS[cuda.name]
    calls = []
    real = backend._launch_kvcache
    monkeypatch.setattr(backend, "_launch_kvcache", lambda *args: calls.append(1) or real(*args))
    if keywords.get("alibi_slopes") == "heads":
        keywords = dict(keywords, alibi_slopes=torch.rand(8))
    check_forward(cuda, (2, 8, 2, seqlen_q, 300, 64, 64), dtype, sequence_major=True, **keywords)
    assert len(calls) == (1 if decoding else 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_matches_the_shared_philox_mask(cuda, dtype):
    """The kernels drop exactly fused_attn.dropout_keep_mask's elements (the bits every backend draws)."""
    check_forward(cuda, (2, 3, 1, 45, 77, 32, 32), dtype, dropout_p=0.3, causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_key_blocks_the_mask_hides_are_skipped(cuda, dtype):
    """A bool mask hiding whole tiles (oracle.tile_sparse_mask: key padding, a head that sees
    nothing, per-head hidden key blocks) against float64 math. Batch 0 sees 37 keys, and its values
    past key 64 (whole hidden key blocks) are made NaN: a kernel that computed those blocks would
    multiply p = 0 by NaN; one that skips them gives the same output bit for bit."""
    shape = (2, 6, 2, 70, 300, 32, 24)
    mask = tile_sparse_mask(2, 6, 70, 300, device=cuda.device)
    q, k, v = random_qkv(*shape, dtype=dtype, device=cuda.device)
    out, _ = check_forward(cuda, shape, dtype, qkv=(q, k, v), attn_mask=mask)
    poisoned = v.clone()
    poisoned[0, :, 64:] = math.nan
    assert torch.equal(fused_attn.attention(q, k, poisoned, attn_mask=mask, backend=cuda.name), out)


def test_dropout_agrees_with_the_cpu_backend(emulated):
    """Same seed, same bits: the emulated CUDA kernels and the C++ CPU kernels give the same output."""
    if "cpu" not in fused_attn.available_backends():
        pytest.fail("the cpu backend (fused_attn._native) is not built: " + str(BACKENDS["cpu"].unavailable_reason()))
    q, k, v = random_qkv(1, 2, 2, 30, 90, 32, 32, torch.float32, CPU)
    torch.manual_seed(7)
    ours = fused_attn.attention(q, k, v, dropout_p=0.5, backend=emulated.name)
    torch.manual_seed(7)
    theirs = fused_attn.attention(q, k, v, dropout_p=0.5, backend="cpu")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_rows_that_see_no_key(cuda):
    """A window that hides every key from some rows, and a mask hiding everything: 0 and -inf, never NaN."""
    out, lse = check_forward(cuda, (1, 2, 2, 80, 20, 32, 32), torch.float16, window=(0, 0))
    assert torch.all(out[:, :, 20:] == 0) and torch.all(lse[:, :, 20:] == -math.inf)
    out, lse = check_forward(cuda, (1, 2, 2, 9, 20, 32, 32), torch.bfloat16,
                             attn_mask=torch.zeros(9, 20, dtype=torch.bool))
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    # A float bias at or below -2^127 (torch.finfo(float32).min here) hides its key as -inf does.
    bias = torch.randn(9, 20)
    bias[4] = torch.finfo(torch.float32).min
    bias[6, ::3] = -2.0 ** 127
    out, lse = check_forward(cuda, (1, 2, 2, 9, 20, 32, 32), torch.bfloat16, attn_mask=bias)
    assert torch.all(out[:, :, 4] == 0) and torch.all(lse[:, :, 4] == -math.inf)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("seqlen_q, new_tokens, keywords", kvcache_tests.CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_kvcache(emulated, monkeypatch, dtype, seqlen_q, new_tokens, keywords, paged):
    """KV-cache decoding on the emulator: tests/test_kvcache.py's check (contiguous and paged caches,
    appending, empty and full caches, windows, ALiBi, softcap) with CPU tensors. On a GPU that file
    runs it on the real backend."""
    monkeypatch.setattr(kvcache_tests, "DEVICE", CPU)
    kvcache_tests.test_kvcache_matches_attention_on_the_prefix(emulated.name, dtype, seqlen_q, new_tokens, keywords,
                                                               paged)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype, strided", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16-strided-new-tokens"])
def test_new_tokens_are_written_in_place(emulated, monkeypatch, paged, dtype, strided):
    """The op's first kernel (append.cu) writes a step's new tokens at exactly their positions."""
    monkeypatch.setattr(kvcache_tests, "DEVICE", CPU)
    kvcache_tests.test_new_tokens_are_written_in_place_and_nothing_else(emulated.name, paged, dtype, strided, False)


@pytest.mark.parametrize("paged, bad_page", [(False, None)] + [(True, bad) for bad in kvcache_tests.BAD_PAGES],
                         ids=["contiguous"] + [f"paged-{bad}" for bad in kvcache_tests.BAD_PAGES])
@pytest.mark.parametrize("splits, strided", [(0, False), (3, False), (0, True)],
                         ids=["one-pass", "three-splits", "strided-last-dim"])
def test_unchecked_lengths_and_pages_give_nan_rows(emulated, monkeypatch, paged, bad_page, splits, strided):
    """tests/test_kvcache.py's check of the kernels' own judgement of lengths and pages, on the
    emulator (the sanitized run, make test-sanitized, reports any access past the cache), in one
    pass, with the keys split (the merge carries a split's NaN), and for caches read through
    copies (whose new tokens go back to the caller's cache)."""
    monkeypatch.setattr(kvcache_tests, "DEVICE", CPU)
    monkeypatch.setattr(BACKENDS[emulated.name], "decode_splits", splits)
    kvcache_tests.test_unchecked_lengths_and_pages_give_nan_rows(monkeypatch, emulated.name, paged, bad_page,
                                                                 strided)


def test_unchecked_missing_pages_outside_a_window_are_never_read(emulated, monkeypatch):
    """tests/test_kvcache.py's check that a missing page in a loaded key block before a window is
    never read, on the emulator."""
    monkeypatch.setattr(kvcache_tests, "DEVICE", CPU)
    kvcache_tests.test_unchecked_missing_pages_outside_a_window_are_never_read(monkeypatch, emulated.name)


def test_unchecked_missing_page_past_a_blocks_causal_reach_is_never_read(emulated, monkeypatch):
    """tests/test_kvcache.py's check that a missing page past a row block's causal reach, in a key
    block its loop loads, is never read, on the emulator."""
    monkeypatch.setattr(kvcache_tests, "DEVICE", CPU)
    kvcache_tests.test_unchecked_missing_page_past_a_blocks_causal_reach_is_never_read(monkeypatch, emulated.name)


@pytest.mark.parametrize("seqlen_q", [1, 2])
def test_decoding_windows_at_key_block_edges(emulated, monkeypatch, seqlen_q):
    """tests/test_kvcache.py's windows whose first key sits at a key block's edge, on the emulator."""
    monkeypatch.setattr(kvcache_tests, "DEVICE", CPU)
    kvcache_tests.test_decoding_windows_at_key_block_edges(emulated.name, seqlen_q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_more_than_sixteen_splits(emulated, monkeypatch, dtype):
    """20 key splits of 64 keys: the merge's maximum spans the whole warp (lanes 16.. hold splits
    too); the later keys score highest, so the largest split lse lies past split 16."""
    monkeypatch.setattr(BACKENDS[emulated.name], "decode_splits", 20)
    cached = torch.tensor([1280, 1100], dtype=torch.int32)
    q = torch.randn(2, 1, 4, 32).to(dtype)
    k_cache, v_cache = (torch.randn(2, 1280, 2, 32).to(dtype) for _ in range(2))
    k_cache[:, 1000:] += 0.3 * q[:, :, ::2].mean(dim=2, keepdim=True)
    out, lse = fused_attn.attention_with_kvcache(q, k_cache, v_cache, cached, return_lse=True, backend=emulated.name)
    for b, length in enumerate(cached.tolist()):
        inputs = (q[b:b + 1].transpose(1, 2), k_cache[b:b + 1, :length].transpose(1, 2),
                  v_cache[b:b + 1, :length].transpose(1, 2))
        exact_out, exact_lse = naive_attention(*inputs, dtype=torch.float64, bottom_right=True)
        low_out, low_lse = naive_attention(*inputs, bottom_right=True)
        assert_accurate("out", out[b:b + 1].transpose(1, 2), exact_out, low_out, dtype)
        assert_accurate("lse", lse[b:b + 1], exact_lse, low_lse.float(), torch.float32)


def test_unchecked_new_tokens_past_the_capacity_are_written_nowhere(emulated, monkeypatch):
    """tests/test_kvcache.py's new tokens at and past the capacity, on the emulator."""
    monkeypatch.setattr(kvcache_tests, "DEVICE", CPU)
    for paged in (False, True):
        kvcache_tests.test_unchecked_new_tokens_past_the_capacity_are_written_nowhere(monkeypatch, emulated.name,
                                                                                      paged)


def test_new_tokens_reach_a_cache_read_through_copies(emulated):
    """The kernels read a cache whose last dim is not contiguous through a copy; a step's new
    tokens must still land in the caller's cache, and be attended to."""
    k_cache, v_cache = (torch.randn(2, 16, 2, 64)[..., ::2] for _ in range(2))
    k_new, v_new = torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    q = torch.randn(2, 1, 4, 32)
    expected = [k_cache.clone(), v_cache.clone()]
    for cache, new in zip(expected, (k_new, v_new)):
        cache[0, 3], cache[1, 7] = new[0, 0], new[1, 0]
    cached = torch.tensor([3, 7], dtype=torch.int32)
    out = fused_attn.attention_with_kvcache(q, k_cache, v_cache, cached, k=k_new, v=v_new, backend=emulated.name)
    assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])
    reference = fused_attn.attention_with_kvcache(q, *expected, cached + 1, backend="reference")
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("seqlen_q, new_tokens, keywords", kvcache_tests.CASES)
def test_kvcache_split_kv(cuda, monkeypatch, seqlen_q, new_tokens, keywords, paged):
    """The same check with the keys cut into splits and merged by their lse (split-KV), which
    these small caches would not get by shape: 100 keys in two splits of 64, the query heads of a
    group sharing blocks; the emptiest cache's second split sees no key."""
    monkeypatch.setattr(kvcache_tests, "DEVICE", cuda.device)
    monkeypatch.setattr(BACKENDS[cuda.name], "decode_splits", 3)
    kvcache_tests.test_kvcache_matches_attention_on_the_prefix(cuda.name, torch.bfloat16, seqlen_q, new_tokens,
                                                               keywords, paged)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_cache_is_split_by_shape(cuda, dtype):
    """A decode step against a cache long enough for the GPU to want more blocks (the emulated one
    has 4 multiprocessors; an H100 132, which gives 3 splits too): the keys are split, and out and
    lse still match float64 attention on the prefix (GQA, ALiBi and a window; one sequence ends
    inside a split, one is empty past the first)."""
    heads_q, heads_kv, capacity, d = 4, 2, 1000, 32
    cached = torch.tensor([1000, 517, 3], dtype=torch.int32, device=cuda.device)
    q = torch.randn(3, 1, heads_q, d, dtype=dtype, device=cuda.device)
    k_cache = torch.randn(3, capacity, heads_kv, d, dtype=dtype, device=cuda.device)
    v_cache = torch.randn(3, capacity, heads_kv, d, dtype=dtype, device=cuda.device)
    slopes = torch.rand(heads_q, device=cuda.device)
    out, lse = fused_attn.attention_with_kvcache(q, k_cache, v_cache, cached, alibi_slopes=slopes, window=(700, -1),
                                                 return_lse=True, backend=cuda.name)
    for b, length in enumerate(cached.tolist()):
        args = (q[b:b + 1].transpose(1, 2), k_cache[b:b + 1, :length].transpose(1, 2),
                v_cache[b:b + 1, :length].transpose(1, 2))
        keywords = dict(alibi_slopes=slopes, window=(700, -1), bottom_right=True)
        exact_out, exact_lse = naive_attention(*args, dtype=torch.float64, **keywords)
        low_out, _ = naive_attention(*args, **keywords)
        assert_accurate(f"out[{b}]", out[b], exact_out[0].transpose(0, 1), low_out[0].transpose(0, 1), dtype)
        torch.testing.assert_close(lse[b].double(), exact_lse[0], rtol=1e-3, atol=1e-3)


def test_refusals_and_op_errors(emulated, emulated_ops):
    """What the backend leaves to others, and the op's own checks (before any kernel runs)."""
    backend = BACKENDS[emulated.name]
    q = torch.randn(1, 2, 4, 300)
    reasons = backend.unsupported_reasons(q, q, q, AttentionTensors(), AttentionOptions())
    assert any("head dim 300" in r for r in reasons)
    packed = torch.zeros(4, 2, 8)
    seqlens = torch.tensor([0, 4], dtype=torch.int32)
    reasons = backend.unsupported_reasons(packed, packed, packed, AttentionTensors(cu_seqlens_q=seqlens,
                                                                                   cu_seqlens_k=seqlens), AttentionOptions())
    assert reasons == []  # packed calls are served (tests/test_cuda_emulated_backward.py, test_varlen*)
    assert any("float64" in r for r in backend.unsupported_reasons(q.double(), q.double(), q.double(),
                                                                   AttentionTensors(), AttentionOptions()))
    q, k, v = random_qkv(1, 2, 1, 4, 5, 8, 8, torch.float16, CPU)
    out, lse = torch.empty(1, 2, 4, 8, dtype=torch.float16), torch.empty(1, 2, 4)
    with pytest.raises(RuntimeError, match="must be Half, got Float"):
        emulated_ops.cuda_forward(q, k.float(), v, out, lse, 1.0, -1, -1, False)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        big = torch.zeros(1, 1, 2, 264, dtype=torch.float16)
        emulated_ops.cuda_forward(big, big, big, torch.empty_like(big), torch.empty(1, 1, 2), 1.0, -1, -1, False)
    # Packed calls: cu_seqlens stay on the device, so the binding checks their form, not their values.
    packed_out, packed_lse = torch.empty_like(packed), torch.empty(2, 4)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be Int, got Long"):
        emulated_ops.cuda_forward(packed, packed, packed, packed_out, packed_lse, 1.0, -1, -1, False,
                                  cu_seqlens_q=seqlens, cu_seqlens_k=seqlens.long(), max_seqlen_q=4, max_seqlen_k=4)
    with pytest.raises(RuntimeError, match=r"max_seqlen_q and max_seqlen_k must be in \[0, packed rows\]"):
        emulated_ops.cuda_forward(packed, packed, packed, packed_out, packed_lse, 1.0, -1, -1, False,
                                  cu_seqlens_q=seqlens, cu_seqlens_k=seqlens, max_seqlen_q=5, max_seqlen_k=4)
    with pytest.raises(RuntimeError, match="packed inputs take no mask or bias"):
        emulated_ops.cuda_forward(packed, packed, packed, packed_out, packed_lse, 1.0, -1, -1, False,
                                  mask=torch.ones(1, 2, 4, 4, dtype=torch.bool), cu_seqlens_q=seqlens,
                                  cu_seqlens_k=seqlens, max_seqlen_q=4, max_seqlen_k=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks how a machine without a GPU reports the real backend")
def test_real_backend_says_why_it_is_unavailable():
    reason = BACKENDS["cuda"].unavailable_reason()
    assert reason is not None and "no CUDA GPU" in reason
    if torch.version.cuda is None and cuda_backend.native.load_error() is None:
        assert "CPU-only" in cuda_backend.cuda_build_error()
