"""What is specific to the C++ backend: it is built and loaded, its builds (portable, AVX2,
AVX-512) agree, bf16 products (AMX tiles, AVX512-BF16 dot products) match, thread count never changes a bit (dense, packed and KV-cache calls), the backward
schedules agree, the forward's tasks (one head's block, or several heads of a group packed into
one) cover every row, tiles the mask hides are skipped exactly, longer sequences match the reference backend, and its op errors are clear."""

import itertools

import pytest
import torch

from oracle import check_against_oracle, random_qkv, tile_sparse_mask

import fused_attn
from fused_attn.backends import cpu_backend

# These tests use CPU tensors on every machine: the extension is built on GPU machines too.


# FUSED_ATTN_CPU_BF16 values, and what cpu_backend.bf16_products() then says where the CPU has them.
BF16_PRODUCTS = {"amx": "amx", "dot": "avx512-bf16"}


@pytest.fixture(params=sorted(BF16_PRODUCTS))
def bf16_products(request, monkeypatch):
    """Runs the test with bf16 products of one kind (csrc/cpu/bf16.h); skipped on CPUs without them."""
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16", request.param)
    if cpu_backend.bf16_products() != BF16_PRODUCTS[request.param]:
        pytest.skip(f"this CPU (or the build picked for it) has no {BF16_PRODUCTS[request.param]} products")
    return request.param


def test_extension_is_built_and_loaded():
    """make test builds csrc/ (editable install); the backend must never silently drop out."""
    assert "cpu" in fused_attn.available_backends(), fused_attn.backends.get_backend("cpu").unavailable_reason()


def run(q, k, v, dout, function=fused_attn.attention, backend="cpu", **kw):
    """(out, lse, dq, dk, dv) from `function` (attention, or varlen_attention with its extra
    positional arguments in kw["args"]) on `backend`, the loss using lse too."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = function(q, k, v, *kw.pop("args", ()), return_lse=True, backend=backend, **kw)
    dlse = torch.linspace(-1, 1, lse.numel()).reshape(lse.shape)
    loss = (out.float() * dout.float()).sum() + torch.where(torch.isfinite(lse), lse * dlse, 0).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def results_per_thread_count(compute):
    """compute() with 1, 2 and 3 threads."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(0)  # the same dropout key every time
            results.append(compute())
    finally:
        torch.set_num_threads(threads)
    return results


def assert_close_each(ours, theirs, **tolerance):
    """(out, lse, dq, dk, dv) against another run's, naming the first that differs."""
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, theirs):
        torch.testing.assert_close(a, b, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


def assert_bitwise_equal(results):
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.fixture
def isa(monkeypatch):
    """Sets FUSED_ATTN_CPU_ISA (read by the extension at every call) for one test."""

    def set_isa(value):
        monkeypatch.setenv("FUSED_ATTN_CPU_ISA", value)
        return cpu_backend.active_isa()

    return set_isa


def test_isa_choice(isa):
    assert isa("portable") == "portable"
    assert isa("auto") in ("avx512", "avx2", "portable")
    with pytest.raises(RuntimeError, match="FUSED_ATTN_CPU_ISA must be auto, portable, avx2 or avx512"):
        isa("sse9")


def test_bf16_products_cap(monkeypatch):
    """FUSED_ATTN_CPU_BF16 caps the bf16 products: fp32 always gives the fp32 ones, dot never AMX,
    and an unknown value is an error before any kernel runs, the cache of a KV-cache call unwritten."""
    monkeypatch.delenv("FUSED_ATTN_CPU_BF16", raising=False)  # (the sanitized runs set it)
    best = cpu_backend.bf16_products()
    assert best in ("amx", "avx512-bf16", "fp32")
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16", "fp32")
    assert cpu_backend.bf16_products() == "fp32"
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16", "dot")
    assert cpu_backend.bf16_products() == ("fp32" if best == "fp32" else "avx512-bf16")
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16", "amx")
    assert cpu_backend.bf16_products() == best
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16", "AMX")
    with pytest.raises(RuntimeError, match="FUSED_ATTN_CPU_BF16 must be amx, dot or fp32"):
        cpu_backend.bf16_products()
    q = torch.randn(1, 1, 4, 64, dtype=torch.bfloat16)
    k_cache, v_cache = torch.randn(2, 1, 8, 2, 64, dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 1, 2, 64, dtype=torch.bfloat16)
    before = k_cache.clone()
    with pytest.raises(RuntimeError, match="FUSED_ATTN_CPU_BF16 must be amx, dot or fp32"):
        fused_attn.attention_with_kvcache(q, k_cache, v_cache, 3, k=k, v=v, backend="cpu")
    assert torch.equal(k_cache, before)


def vectorized_isas():
    """The vectorized builds this CPU can run: auto picks the widest, and avx512 CPUs run avx2 too."""
    return {"avx512": ["avx512", "avx2"], "avx2": ["avx2"], "portable": []}[cpu_backend.active_isa()]


def variant_keywords(heads_q, seqlen_q, seqlen_k):
    """Every variant the kernels have, cutting across block boundaries."""
    return dict(window=(70, 20), alibi_slopes=torch.rand(heads_q), softcap=5.0,
                attn_mask=torch.randn(seqlen_q, seqlen_k).masked_fill(torch.rand(seqlen_q, seqlen_k) < 0.2, -torch.inf))


@pytest.mark.parametrize("vectorized", ["avx512", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_portable_build_matches_vectorized(isa, dtype, vectorized):
    """The core and variant tests run the build auto picks; this checks every build this CPU has
    against the portable one, so the narrower ones are covered on a wider CPU too."""
    if vectorized not in vectorized_isas():
        pytest.skip(f"this CPU cannot run the {vectorized} kernels")
    q, k, v = random_qkv(2, 4, 2, 150, 130, 72, 40, dtype, "cpu", sequence_major=True)
    dout = torch.randn(2, 4, 150, 40, dtype=dtype)
    for keywords in (dict(causal=False), dict(causal=True), variant_keywords(4, 150, 130)):
        assert isa(vectorized) == vectorized
        vectorized_results = run(q, k, v, dout, causal_alignment="bottom_right", **keywords)
        isa("portable")
        portable = run(q, k, v, dout, causal_alignment="bottom_right", **keywords)
        tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), vectorized_results, portable):
            torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shape", [(2, 4, 2, 150, 130, 64, 64), (1, 2, 1, 70, 301, 128, 128), (1, 3, 3, 65, 64, 72, 48),
                                   (2, 8, 2, 9, 67, 64, 32), (2, 4, 2, 200, 1100, 64, 64), (1, 1, 1, 65, 33000, 128, 128)],
                         ids=["gqa", "head-dim-128", "head-dims-72-48", "heads-packed", "key-blocks", "uncached"])
def test_bf16_products_match_the_oracle(bf16_products, monkeypatch, shape):
    """bf16 forwards and backwards on bf16 products (csrc/cpu/bf16.h): operands packed, P and dS rounded
    to bf16, keys and query rows padded to even (odd counts here), head dims past one 64-column
    chunk, several heads' rows in one forward block, head dims the backward leaves to fp32 (72),
    several 512-key blocks whose packed copies tasks share, and a sequence too long to keep them
    (one block at a time). Against float64 math with every variant, and against the fp32 products."""
    keywords = dict(variant_keywords(shape[1], shape[3], shape[4]), causal=True, causal_alignment="bottom_right")
    check_against_oracle("cpu", shape, torch.bfloat16, torch.device("cpu"), sequence_major=True, **keywords)
    check_against_oracle("cpu", shape, torch.bfloat16, torch.device("cpu"), dropout_p=0.3)
    q, k, v = random_qkv(*shape, torch.bfloat16, "cpu")
    dout = torch.randn(*shape[:2], shape[3], shape[6], dtype=torch.bfloat16)
    on_bf16_products = run(q, k, v, dout, **keywords)
    # The backward on bf16 products takes the one-pass schedule whatever the thread count (the
    # two-pass one would compute dq in fp32), so thread count changes no bit here either.
    assert_bitwise_equal(results_per_thread_count(lambda: run(q, k, v, dout, **keywords)))
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16", "fp32")
    assert cpu_backend.bf16_products() == "fp32"
    assert_close_each(on_bf16_products, run(q, k, v, dout, **keywords), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(1, 2, 1, 130, 1100, 64, 64), (1, 1, 1, 65, 33000, 128, 128)],
                         ids=["blocks-kept", "one-block-at-a-time"])
@pytest.mark.parametrize("window", [(300, 0), (40, 500)], ids=["left", "right"])
def test_bf16_product_windows_across_packed_blocks(bf16_products, shape, window):
    """A forward step on bf16 products starts at the window's first chunk of 64 keys, not at a
    512-key block: its keys cross a block boundary (one operand when every block stays packed; two
    steps when the sequence is too long to keep them). Against float64 math, forward and backward."""
    check_against_oracle("cpu", shape, torch.bfloat16, torch.device("cpu"), window=window,
                         causal_alignment="bottom_right")


@pytest.mark.parametrize("keywords", [dict(), dict(window=(200, 0), causal_alignment="bottom_right")],
                         ids=["full", "window"])
def test_bf16_product_varlen_sequences_pack_their_own_keys(bf16_products, keywords):
    """Packed sequences of different lengths on bf16 products (head dims they take):
    each packs its own keys (odd lengths, one past a 512-key block; packing to the longest length
    would read the next sequence's rows and misshape a shorter one's last chunk). Forward and
    gradients against each sequence alone in float64."""
    lengths, H, D = [300, 77, 513, 131], 4, 64
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), H, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = fused_attn.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), backend="cpu", **keywords)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for b in range(len(lengths)):
        rows = slice(cu[b], cu[b + 1])
        dense = [t[rows].detach().double().transpose(0, 1)[None].requires_grad_() for t in (q, k, v)]
        exact = fused_attn.attention(*dense, backend="reference", **keywords)
        exact_grads = torch.autograd.grad(exact, dense, dout[rows].double().transpose(0, 1)[None])
        for name, ours, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (exact, *exact_grads)):
            torch.testing.assert_close(ours[rows].double(), ref[0].transpose(0, 1), rtol=2e-2, atol=3e-2,
                                       msg=lambda m: f"sequence {b} {name}: {m}")


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_bf16_product_kvcache_sequences_pack_their_own_keys(bf16_products, paged):
    """KV-cache calls with enough query rows for the bf16 products (a prefill into the cache): each
    sequence packs its own cached keys (odd lengths, one past a 512-key block), contiguous or through
    pages. Against the reference backend in float64."""
    B, Lq, Hq, Hkv, D, capacity, page = 3, 40, 8, 2, 64, 1024, 128
    q = torch.randn(B, Lq, Hq, D, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(B, capacity, Hkv, D, dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([101, 701, 513], dtype=torch.int32)
    exact = fused_attn.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(), seqlens, causal=True,
                                              backend="reference")
    table = None
    if paged:  # the pages of every sequence, shuffled
        pages = torch.randperm(B * capacity // page)
        table = pages.reshape(B, capacity // page).to(torch.int32)
        k_cache, v_cache = (torch.empty_like(c).view(-1, page, Hkv, D).index_copy_(0, pages, c.view(-1, page, Hkv, D))
                            for c in (k_cache, v_cache))
    out = fused_attn.attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table, causal=True,
                                            backend="cpu")
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bias_shape", [(2, 4, 150, 530), (1, 4, 150, 530), (2, 1, 1, 530), (150, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_biases_are_read_in_their_dtype(dtype, bias_shape):
    """A bias in q's 16-bit dtype is read as it is (no float32 copy of an L x L bias), and a full-shape
    one's gradient written in its dtype (one term per element, rounded once; a broadcast one's terms
    are summed in float32): against float64 math, and bit for bit what the same bias converted to
    float32 gives (the conversion is exact), forward and every gradient, the bias's own included."""
    shape = (2, 4, 2, 150, 530, 64, 64)
    bias = torch.randn(bias_shape, dtype=dtype, requires_grad=True)
    check_against_oracle("cpu", shape, dtype, torch.device("cpu"), attn_mask=bias, window=(300, 20))
    q, k, v = random_qkv(*shape, dtype, "cpu", requires_grad=True)
    dout = torch.randn(*shape[:2], shape[3], shape[6], dtype=dtype)
    results = []
    for b in (bias, bias.detach().float().requires_grad_()):
        out = fused_attn.attention(q, k, v, attn_mask=b, window=(300, 20), backend="cpu")
        results.append((out, *torch.autograd.grad(out, (q, k, v, b), dout)))
    assert_bitwise_equal([results[0][:4], results[1][:4]])
    assert torch.equal(results[0][4].float(), results[1][4].to(dtype).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nan_inputs_give_nan_rows(dtype):
    """A NaN in a query row makes that row's output NaN, and a NaN in a key row every row that
    sees it (with causal, the rows from its position on): never a finite answer from NaN input,
    whichever products and exp (16-bit inputs' fast one included) the call takes."""
    q, k, v = random_qkv(1, 2, 2, 150, 150, 64, 64, dtype, "cpu")
    q[0, 1, 5, 3] = float("nan")
    k[0, 0, 100, 7] = float("nan")
    out = fused_attn.attention(q, k, v, causal=True, backend="cpu")
    rows_with_nan = out.isnan().any(-1)[0]
    assert rows_with_nan[1].nonzero().flatten().tolist() == [5]
    assert rows_with_nan[0].nonzero().flatten().tolist() == list(range(100, 150))
    assert out[0, 0, :100].isfinite().all() and out[0, 1, :5].isfinite().all()


@pytest.mark.parametrize("products", ["amx", "dot", "fp32"], ids=["best-bf16-products", "dot-if-any", "fp32-products"])
@pytest.mark.parametrize("seqlen_k", [1, 700], ids=["one-key", "many-keys"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lse_is_float32_accurate(dtype, seqlen_k, products, monkeypatch):
    """The lse is as accurate as float32 math on the inputs: the probabilities' fast exp (tile.h,
    exp_by_powers_of_two) errs by < 4e-6 for 16-bit inputs and is exact at a row's maximum, so a
    one-key row's lse is its score. (ATen's fexp_u20 gave every 16-bit lse a bias of -5e-5, which the
    accuracy rule, against the score rounded to 16 bits, caught only when that rounding happened to
    be small.)"""
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16", products)
    q, k, v = random_qkv(2, 4, 2, 130, seqlen_k, 64, 64, dtype, "cpu")
    q = q * 2  # scores of a few units, as a trained model's
    _, lse = fused_attn.attention(q, k, v, return_lse=True, backend="cpu")
    scores = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2) / 8
    exact = scores.logsumexp(-1)
    assert ((lse.double() - exact).abs() / exact.abs().clamp_min(1)).max() <= 1e-5


@pytest.mark.parametrize("variants", [False, True], ids=["causal", "variants"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 300, 333), (2, 6, 2, 200, 150), (1, 4, 4, 129, 500)],
                         ids=["one-kv-head", "gqa", "mha"])
def test_thread_count_changes_no_bit(shape, variants):
    """Tasks own their outputs and sum in a fixed order. With B * Hkv = 1 one thread takes the
    one-pass backward and two threads the two-pass one, so this also checks that both schedules
    give identical bits."""
    batch, heads_q, heads_kv, seqlen_q, seqlen_k = shape
    q, k, v = random_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, 64, 64, torch.float32, "cpu")
    dout = torch.randn(batch, heads_q, seqlen_q, 64)
    keywords = variant_keywords(heads_q, seqlen_q, seqlen_k) if variants else dict(causal=True)
    assert_bitwise_equal(results_per_thread_count(
        lambda: run(q, k, v, dout, causal_alignment="bottom_right", **keywords)))


def packed(lengths_q, lengths_k, heads_q, heads_kv, dim, dtype=torch.float32):
    """Packed q, k, v, dout and the arguments of varlen_attention after them."""
    q, dout = (torch.randn(sum(lengths_q), heads_q, dim, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(sum(lengths_k), heads_kv, dim, dtype=dtype) for _ in range(2))
    cu = [torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32) for n in (lengths_q, lengths_k)]
    return q, k, v, dout, (*cu, max(lengths_q), max(lengths_k))


def test_thread_count_changes_no_bit_varlen():
    """Sequences of very different sizes: one thread takes the one-pass backward, two threads the
    two-pass one (the first sequence is most of the work), so this also checks they agree."""
    q, k, v, dout, args = packed([300, 0, 70, 1, 5], [250, 40, 0, 1, 130], 3, 1, 32)
    keywords = {"causal": True, "causal_alignment": "bottom_right", "window": (90, 3), "softcap": 5.0,
                "dropout_p": 0.2, "alibi_slopes": torch.rand(5, 3)}
    assert_bitwise_equal(results_per_thread_count(
        lambda: run(q, k, v, dout, fused_attn.varlen_attention, args=args, **keywords)))


def kv_cache(batch, capacity, heads_kv, dim, paged, page=16, dtype=torch.float32):
    """(k_cache, v_cache, block_table): a contiguous cache, or the same rows as shuffled pages."""
    k_cache, v_cache = torch.randn(2, batch, capacity, heads_kv, dim, dtype=dtype)
    if not paged:
        return k_cache, v_cache, None
    per_sequence = -(-capacity // page)
    table = torch.randperm(batch * per_sequence, dtype=torch.int32).view(batch, per_sequence)
    pages = torch.zeros(2, batch * per_sequence, page, heads_kv, dim, dtype=dtype)
    padded = torch.nn.functional.pad(torch.stack([k_cache, v_cache]), (0, 0, 0, 0, 0, per_sequence * page - capacity))
    pages[:, table.flatten().long()] = padded.view(2, batch * per_sequence, page, heads_kv, dim)
    return pages[0], pages[1], table


@pytest.mark.parametrize("capacity", [200, 2500], ids=["one-pass", "split-kv"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_thread_count_changes_no_bit_kvcache(paged, capacity):
    """Long caches with few tasks are split (split-KV, params.h): the split depends on the call,
    never on the thread count."""
    q = torch.randn(3, 2, 8, 32)
    k_cache, v_cache, table = kv_cache(3, capacity, 2, 32, paged)
    lengths = torch.tensor([capacity, 0, capacity * 13 // 25], dtype=torch.int32)
    results = results_per_thread_count(lambda: fused_attn.attention_with_kvcache(
        q, k_cache, v_cache, lengths, block_table=table, causal=True, alibi_slopes=torch.rand(8), return_lse=True,
        backend="cpu"))
    assert_bitwise_equal(results)


@pytest.mark.parametrize("keywords", [dict(), dict(causal=True, window=(700, -1), alibi_slopes="per-head"),
                                      dict(softcap=3.0)], ids=["plain", "window-alibi", "softcap"])
@pytest.mark.parametrize("seqlen_q", [1, 3, 70])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_split_kv_decoding_matches_the_reference_backend(paged, seqlen_q, keywords):
    """Caches long enough to be split (2 or 3 splits here) merge to the unsplit result: every
    split length, GQA rows packed in a task (1 and 3 queries) or not (70), a window that leaves
    whole splits out, empty sequences."""
    keywords = dict(keywords)
    if keywords.get("alibi_slopes") == "per-head":
        keywords["alibi_slopes"] = torch.rand(4, 4)
    q = torch.randn(4, seqlen_q, 4, 32)
    k_cache, v_cache, table = kv_cache(4, 3100, 1, 32, paged)
    lengths = torch.tensor([3100, 0, 2049, 1500], dtype=torch.int32)
    ours, reference = (fused_attn.attention_with_kvcache(q, k_cache, v_cache, lengths, block_table=table,
                                                         return_lse=True, backend=backend, **keywords)
                       for backend in ("cpu", "reference"))
    assert_close_each(ours, reference, rtol=1e-4, atol=1e-5)
    assert (ours[0][1] == 0).all() and (ours[1][1] == -torch.inf).all()


@pytest.mark.parametrize("keywords", [dict(), dict(causal=True, causal_alignment="bottom_right", window=(900, -1)),
                                      dict(causal=True), dict(alibi_slopes="per-head", softcap=3.0)],
                         ids=["plain", "bottom-right-window", "top-left-causal", "alibi-softcap"])
@pytest.mark.parametrize("seqlen_q", [1, 3, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_calls_without_backward_split_long_keys(dtype, seqlen_q, keywords):
    """A dense call that no backward follows splits keys as the KV-cache op does (split-KV: few
    tasks, 3100 keys: 3 splits), whatever its alignment: bit for bit the KV-cache call where that
    can express it, the thread count changes no bit, and with a gradient wanted (no split: the
    backward recomputes whole blocks' scores) the same answer within rounding."""
    keywords = dict(keywords)
    if keywords.get("alibi_slopes") == "per-head":
        keywords["alibi_slopes"] = torch.rand(4)
    q, k, v = random_qkv(1, 4, 1, seqlen_q, 3100, 32, 32, dtype, "cpu", sequence_major=True)
    ours = results_per_thread_count(lambda: fused_attn.attention(q, k, v, return_lse=True, backend="cpu", **keywords))
    assert_bitwise_equal(ours)
    reference = fused_attn.attention(q, k, v, return_lse=True, backend="reference", **keywords)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    assert_close_each(ours[0], reference, **tolerance)
    cache_keywords = {name: value for name, value in keywords.items() if name != "causal_alignment"}
    if keywords.get("causal_alignment") == "bottom_right" or not cache_keywords.keys() & {"causal", "alibi_slopes"}:
        as_cache = fused_attn.attention_with_kvcache(*(t.transpose(1, 2) for t in (q, k, v)), 3100, return_lse=True,
                                                     backend="cpu", **cache_keywords)
        assert torch.equal(ours[0][0], as_cache[0].transpose(1, 2)) and torch.equal(ours[0][1], as_cache[1])
    with_grad = fused_attn.attention(*(t.detach().requires_grad_() for t in (q, k, v)), return_lse=True,
                                     backend="cpu", **keywords)
    assert_close_each([t.detach() for t in with_grad], reference, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group, seqlen_q", [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (4, 2), (2, 3), (1, 8), (3, 3)],
                         ids=lambda x: str(x))
def test_blocks_of_few_queries_match_the_oracle(group, seqlen_q, dtype):
    """Blocks of at most 8 query columns (decoding, short sequences: params.h query_tiling) take
    their scores as dot products (tile.h scores_of_few_queries): every column count from 1 to 8
    (3 x 3 = 9 takes the matrix product), 77 keys so that the last step is short, head dims a
    multiple of 8 (fp32 keys and values read in place) or not (copied, padded), and keys and
    values whose columns are strided (copied)."""
    shape = (2, 2 * group, 2, seqlen_q, 77)
    for dim, dim_v in ((64, 64), (24, 20), (20, 24)):
        check_against_oracle("cpu", (*shape, dim, dim_v), dtype, torch.device("cpu"), sequence_major=True,
                             causal=True, causal_alignment="bottom_right", softcap=5.0)
    q, k, v = random_qkv(*shape, 32, 32, dtype, "cpu")
    strided_k, strided_v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (k, v))
    ours, same = (fused_attn.attention(q, k_, v_, window=(30, 10), return_lse=True, backend="cpu")
                  for k_, v_ in ((k, v), (strided_k, strided_v)))
    assert_close_each(ours, same, rtol=0, atol=0)


@pytest.mark.parametrize("page", [None, 16, 80, 128], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decoding_reads_pages_in_place_or_copied(page, dtype):
    """fp32 key blocks that lie within one page are read where they are; blocks that cross pages
    (pages of 16, some of 80) are gathered. Both match the reference backend."""
    q = torch.randn(3, 1, 8, 64, dtype=dtype)
    k_cache, v_cache, table = kv_cache(3, 700, 2, 64, page is not None, page or 16, dtype)
    lengths = torch.tensor([700, 333, 1], dtype=torch.int32)
    ours, reference = (fused_attn.attention_with_kvcache(q, k_cache, v_cache, lengths, block_table=table,
                                                         return_lse=True, backend=backend)
                       for backend in ("cpu", "reference"))
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_close_each(ours, reference, **tolerance)


@pytest.mark.parametrize("seqlen_q", [1, 5, 21, 30, 64, 65])
def test_forward_tasks_cover_every_row_of_every_head(seqlen_q):
    """Short sequences pack the rows of several query heads of a group into one task (here 3, 3,
    3, 2 + 1, then 1 head per task); each head keeps its own slope, mask row, dropout bits."""
    heads_q, heads_kv, seqlen_k = 6, 2, 90
    q, k, v = random_qkv(2, heads_q, heads_kv, seqlen_q, seqlen_k, 40, 24, torch.float32, "cpu", sequence_major=True)
    dout = torch.randn(2, heads_q, seqlen_q, 24)
    keywords = {"causal": True, "causal_alignment": "bottom_right", "alibi_slopes": torch.rand(2, heads_q),
                "softcap": 5.0, "attn_mask": torch.rand(2, heads_q, seqlen_q, seqlen_k) > 0.2, "dropout_p": 0.2}
    results = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        results.append(run(q, k, v, dout, backend=backend, **keywords))
    assert_close_each(*results, rtol=1e-4, atol=1e-5)


def test_packed_rows_after_the_last_sequence_belong_to_none():
    """Tokens after cu_seqlens[-1] belong to no sequence: out 0, lse -inf, gradients 0 (as the
    reference backend gives), never uninitialised memory."""
    q, k, v, dout, (cu_q, cu_k, *maxima) = packed([5, 7], [6, 9], 2, 2, 16)
    ours = run(q, k, v, dout, fused_attn.varlen_attention, args=(cu_q[:-1], cu_k[:-1], *maxima))
    reference = run(q, k, v, dout, fused_attn.varlen_attention, "reference", args=(cu_q[:-1], cu_k[:-1], *maxima))
    assert_close_each(ours, reference, rtol=1e-5, atol=1e-6)
    assert (ours[0][5:] == 0).all() and (ours[1][:, 5:] == -torch.inf).all() and (ours[3][6:] == 0).all()


@pytest.mark.parametrize("bias_shape", [(1,), (2, 1, 1, 150), (1, 6, 200, 150), (2, 6, 200, 1), (2, 6, 200, 150),
                                        (2, 6, 1, 150)], ids=str)
def test_bias_gradient_is_bitwise_independent_of_thread_count(bias_shape):
    """dbias is summed over broadcast dims in a fixed order by tasks that own its elements. The
    last two shapes are not broadcast across (batch, key/value head) pairs, so one thread takes
    the one-pass backward and three threads the two-pass one: both schedules sum alike."""
    q, k, v = random_qkv(2, 6, 2, 200, 150, 32, 32, torch.float32, "cpu")
    bias = torch.randn(bias_shape)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            leaf = bias.clone().requires_grad_()
            out = fused_attn.attention(q, k, v, attn_mask=leaf, causal=True, backend="cpu")
            grads.append(torch.autograd.grad(out.square().sum(), leaf)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seqlen_q", [21, 150], ids=["heads-packed", "one-head-blocks"])
def test_tiles_hidden_by_the_mask_are_skipped_exactly(seqlen_q, dtype):
    """Against float64 math, with GQA; with 21 queries the forward packs the rows of three heads
    into a task, and a key block is skipped only where the mask hides it from all three (bf16 on
    AMX tiles: hidden 64-key chunks cut from either end of a step). Fully masked rows (head 1) keep
    out 0, lse -inf and zero gradients; no thread count changes a bit."""
    shape = (2, 6, 2, seqlen_q, 300, 32, 32)
    keywords = dict(attn_mask=tile_sparse_mask(2, 6, seqlen_q, 300))
    check_against_oracle("cpu", shape, dtype, torch.device("cpu"), **keywords)
    q, k, v = random_qkv(*shape, dtype, "cpu")
    dout = torch.randn(2, 6, seqlen_q, 32, dtype=dtype)
    results = results_per_thread_count(lambda: run(q, k, v, dout, **keywords))
    assert_bitwise_equal(results)
    out, lse, dq = results[0][:3]
    assert (out[:, 1] == 0).all() and (lse[:, 1] == -torch.inf).all() and (dq[:, 1] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_sequences_match_reference_backend(dtype, causal):
    """Many query and key blocks per head, ragged ends, GQA, Dv != D."""
    q, k, v = random_qkv(1, 4, 2, 1100, 1300, 64, 48, dtype, "cpu", sequence_major=True)
    dout = torch.randn(1, 4, 1100, 48, dtype=dtype)
    ours = run(q, k, v, dout, causal=causal, causal_alignment="bottom_right")
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = fused_attn.attention(q64, k64, v64, causal=causal, causal_alignment="bottom_right",
                                    return_lse=True, backend="reference")
    dlse = torch.linspace(-1, 1, lse.numel(), dtype=torch.float64).reshape(lse.shape)
    loss = (out * dout.double()).sum() + torch.where(torch.isfinite(lse), lse * dlse, 0).sum()
    exact = (out, lse, *torch.autograd.grad(loss, (q64, k64, v64)))
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, exact):
        torch.testing.assert_close(a.double(), b, **tolerance, msg=lambda m: f"{name}: {m}")


def test_native_op_checks_its_arguments():
    ops = torch.ops.fused_attn_native
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    out, lse = torch.empty(1, 2, 8, 16), torch.empty(1, 2, 8)
    with pytest.raises(RuntimeError, match="lse must be Float"):
        ops.cpu_forward(q, k, v, out, lse.double(), 0.25, -1, -1, False)
    with pytest.raises(RuntimeError, match="out must have shape"):
        ops.cpu_forward(q, k, v, out[:, :1], lse, 0.25, -1, -1, False)
    with pytest.raises(RuntimeError, match="dtype Double"):
        ops.cpu_forward(q.double(), k.double(), v.double(), out.double(), lse, 0.25, -1, -1, False)


def test_native_backward_takes_value_head_dims_past_one_chunk():
    """The op itself (the public API stops at 256) computes delta = rowsum(dO * O) in chunks, so a
    value head dim of 300 is two chunks, not an overrun: gradients against float64 autograd."""
    ops = torch.ops.fused_attn_native
    q, k, v = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 7, 8), torch.randn(1, 1, 7, 300)
    out, lse = torch.full((1, 1, 5, 300), float("nan")), torch.full((1, 1, 5), float("nan"))
    ops.cpu_forward(q, k, v, out, lse, 0.3, -1, -1, False)
    dout = torch.randn_like(out)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    ops.cpu_backward(dout, torch.zeros_like(lse), q, k, v, out, lse, dq, dk, dv, 0.3, -1, -1, False)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    o = torch.softmax(exact[0] @ exact[1].transpose(-1, -2) * 0.3, -1) @ exact[2]
    for name, ours, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), torch.autograd.grad(o, exact, dout.double())):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_native_op_checks_packed_arguments():
    ops = torch.ops.fused_attn_native
    q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
    out, lse = torch.empty(8, 2, 16), torch.empty(2, 8)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="packed .* inputs come with cu_seqlens_q and cu_seqlens_k"):
        ops.cpu_forward(q, k, v, out, lse, 0.25, -1, -1, False)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be Int"):
        ops.cpu_forward(q, k, v, out, lse, 0.25, -1, -1, False, cu_seqlens_q=cu, cu_seqlens_k=cu.long())
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be non-decreasing"):
        ops.cpu_forward(q, k, v, out, lse, 0.25, -1, -1, False, cu_seqlens_q=cu.flip(0).roll(1), cu_seqlens_k=cu)
    with pytest.raises(RuntimeError, match="cu_seqlens_k goes past the 8 rows of its tensor"):
        ops.cpu_forward(q, k, v, out, lse, 0.25, -1, -1, False, cu_seqlens_q=cu, cu_seqlens_k=cu + cu.sign())
    with pytest.raises(RuntimeError, match="lse must have shape \\[2, 8\\]"):
        ops.cpu_forward(q, k, v, out, lse.T, 0.25, -1, -1, False, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_native_kvcache_op_checks_its_arguments():
    ops = torch.ops.fused_attn_native
    q, out, lse = torch.randn(2, 1, 4, 16), torch.empty(2, 1, 4, 16), torch.empty(2, 4, 1)
    pages = torch.randn(5, 8, 2, 16)
    lengths = torch.tensor([9, 3], dtype=torch.int32)
    table = torch.tensor([[0, 4], [1, 2]], dtype=torch.int32)
    ops.cpu_kvcache_forward(q, pages, pages, lengths, table, out, lse, 0.25, -1, -1)
    with pytest.raises(RuntimeError, match=r"cache_seqlens \(the cache's capacity less the new tokens\) must lie "
                                           r"within \[0, 16\], got 18"):
        ops.cpu_kvcache_forward(q, pages, pages, lengths * 2, table, out, lse, 0.25, -1, -1)
    with pytest.raises(RuntimeError, match=r"must lie within \[0, 16\], got -1"):
        ops.cpu_kvcache_forward(q, pages, pages, lengths.neg().clamp(min=-1), table, out, lse, 0.25, -1, -1)
    with pytest.raises(RuntimeError, match=r"block_table\[0, 1\] = 5 is not a page of k_cache \(5 pages\)"):
        ops.cpu_kvcache_forward(q, pages, pages, lengths, table + 1, out, lse, 0.25, -1, -1)
    with pytest.raises(RuntimeError, match="a contiguous cache must have B = 2 rows"):
        ops.cpu_kvcache_forward(q, pages, pages, lengths, None, out, lse, 0.25, -1, -1)
    with pytest.raises(RuntimeError, match="v_cache must have shape"):
        ops.cpu_kvcache_forward(q, pages, pages[..., :8].transpose(1, 2), lengths, table, out, lse, 0.25, -1, -1)


def test_missing_extension_is_reported_not_fatal(monkeypatch):
    """A package without its extension still imports; the backend says why and dispatch moves on."""
    from fused_attn.backends import native

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_load", lambda: "fused_attn._native is not built (test)")
    with pytest.warns(UserWarning, match=r"C\+\+ extension is unavailable"):
        assert "cpu" not in fused_attn.available_backends()
    report = fused_attn.explain(*(torch.randn(1, 1, 4, 8) for _ in range(3)))
    assert not report.startswith("would run: cpu")
    assert "cpu: not available: fused_attn._native is not built (test)" in report
