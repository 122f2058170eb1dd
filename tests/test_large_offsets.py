"""Tensors whose elements lie more than 2^31 elements apart: every backend addresses them in 64 bits.

A (B, L, H, D) tensor of a long sequence passes 2^31 elements within one batch entry: at H = 32,
D = 128, from position 524288 on (a 4 GiB bf16 tensor, a long context or a packed batch on one
GPU). Offsets computed in 32 bits there wrap around: a kernel then reads or writes the wrong
memory (a fault, or a silently wrong answer). The tests make that happen at small sizes: positions
ROW_STRIDE = 2^24 elements apart, so position 128 starts 2^31 elements in, while any 128
positions (a tile) span less than 2^31. The tensors are views of an anonymous mapping reserved
without memory (MAP_NORESERVE): only the pages the test writes and the kernels read take any.

Each call must give exactly what the same backend gives on compact copies of its inputs (the
kernels compute the same products in the same order; only the addresses differ). Under Triton's
interpreter a wrapped offset fails as OutOfBounds (interpreter_checks.py); the CUDA emulator and
the CPU kernels read wherever it points.
"""
import mmap

import pytest
import torch

from conftest import BACKENDS, KVCACHE_BACKENDS, VARLEN_BACKENDS

import fused_attn

ROW_STRIDE = 2 ** 24
LENGTH = 160  # positions 128 .. 159 lie past 2^31 elements
DTYPES = [torch.float16, torch.float32]


def far_apart(shape, dim, dtype, requires_grad=False):
    """A tensor of random values, compact but along `dim`, whose consecutive indices there lie
    ROW_STRIDE elements apart (the dims inside it must fit in ROW_STRIDE elements)."""
    strides, step = [0] * len(shape), 1
    for d in reversed(range(len(shape))):
        if d == dim:
            assert step <= ROW_STRIDE
            step = ROW_STRIDE
        strides[d] = step
        step *= shape[d]
    elements = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    memory = mmap.mmap(-1, elements * itemsize, flags=flags)
    t = torch.frombuffer(memory, dtype=dtype).as_strided(shape, strides)  # keeps the mapping alive
    with torch.no_grad():
        t.copy_(torch.rand(shape) < 0.7 if dtype == torch.bool else torch.randn(shape, dtype=dtype))
    return t.requires_grad_(requires_grad)


def compact(t):
    """A compact copy of t, a leaf requiring grad where t does."""
    return t.detach().contiguous().requires_grad_(t.requires_grad)


def assert_same(name, got, expected):
    assert got.shape == expected.shape, name
    assert torch.equal(got, expected), f"{name}: max |diff| {(got.double() - expected.double()).abs().max().item()}"


def run_both(call, far):
    """call(*tensors) on the far-apart tensors and on compact copies: the outputs, and the gradients
    of the tensors that require grad (from a far-apart dout and its compact copy), must be the same."""
    near = [compact(t) for t in far]
    results = []
    dout = None
    for tensors in (far, near):
        out = call(*tensors)
        leaves = [t for t in tensors if t.requires_grad]
        if dout is None:  # positions far apart: a packed (total, H, Dv) one, or a (B, L, H, Dv) one's view
            if out.dim() == 3:
                dout = far_apart(tuple(out.shape), 0, out.dtype)
            else:
                batch, heads, length, dim_v = out.shape
                dout = far_apart((batch, length, heads, dim_v), 1, out.dtype).transpose(1, 2)
        grads = torch.autograd.grad(out, leaves, dout if tensors is far else compact(dout)) if leaves else ()
        results.append((out.detach(), grads))
    (out, grads), (expected_out, expected_grads) = results
    assert_same("out", out, expected_out)
    for index, (grad, expected) in enumerate(zip(grads, expected_grads)):
        assert_same(f"gradient {index}", grad, expected)


def cuda_or(backend_fixture):
    """The backends of a fixture list, plus the emulated cuda backend (the `cuda` fixture)."""
    return backend_fixture + ["cuda-emulated"]


@pytest.fixture
def target(request):
    """A backend name for the test's calls: the emulated cuda backend registered where asked for."""
    name = request.param
    if name == "cuda-emulated":
        return request.getfixturevalue("emulated").name
    return name


@pytest.mark.parametrize("target", cuda_or(BACKENDS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keywords", [{}, dict(causal=True, window=(40, 0))], ids=["plain", "causal-window"])
def test_long_sequences_forward_and_backward(target, dtype, keywords):
    """q, k, v (B, L, H, D) with positions 2^24 elements apart, read as (B, H, L, D) views; GQA."""
    q = far_apart((1, LENGTH, 4, 16), 1, dtype, requires_grad=True)
    k = far_apart((1, LENGTH + 9, 2, 16), 1, dtype, requires_grad=True)
    v = far_apart((1, LENGTH + 9, 2, 8), 1, dtype, requires_grad=True)

    def call(q, k, v):
        return fused_attn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=target,
                                    **keywords)

    run_both(call, [q, k, v])


@pytest.mark.parametrize("target", cuda_or(BACKENDS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_caches_read_by_the_decoding_kernel(target, dtype):
    """Few query rows against a long k and v without gradients: the decoding kernels' addressing."""
    q = far_apart((2, 2, 4, 16), 1, dtype)
    k = far_apart((2, LENGTH, 1, 16), 1, dtype)
    v = far_apart((2, LENGTH, 1, 16), 1, dtype)
    run_both(lambda q, k, v: fused_attn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  causal=True, causal_alignment="bottom_right", backend=target),
             [q, k, v])


@pytest.mark.parametrize("target", cuda_or(BACKENDS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_masks_and_biases(target, dtype):
    """A bool mask and a learnable float bias whose query rows lie 2^24 elements apart."""
    q = far_apart((1, 2, LENGTH, 16), 2, dtype, requires_grad=True)
    k = far_apart((1, 2, LENGTH, 16), 2, dtype, requires_grad=True)
    v = far_apart((1, 2, LENGTH, 16), 2, dtype, requires_grad=True)
    mask = far_apart((1, 1, LENGTH, LENGTH), 2, torch.bool)
    mask[..., :1] = True  # every row sees a key
    bias = far_apart((1, 2, LENGTH, LENGTH), 2, dtype, requires_grad=True)
    run_both(lambda q, k, v, mask: fused_attn.attention(q, k, v, attn_mask=mask, backend=target), [q, k, v, mask])
    run_both(lambda q, k, v, bias: fused_attn.attention(q, k, v, attn_mask=bias, backend=target), [q, k, v, bias])


@pytest.mark.parametrize("target", cuda_or(VARLEN_BACKENDS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_sequences_starting_past_2_31_elements(target, dtype):
    """varlen: the second sequence's rows start 140 (queries) and 130 (keys) positions in."""
    q = far_apart((170, 4, 16), 0, dtype, requires_grad=True)
    k = far_apart((175, 2, 16), 0, dtype, requires_grad=True)
    v = far_apart((175, 2, 8), 0, dtype, requires_grad=True)
    cu_q = torch.tensor([0, 140, 170], dtype=torch.int32)
    cu_k = torch.tensor([0, 130, 175], dtype=torch.int32)
    run_both(lambda q, k, v: fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 140, 130, causal=True, backend=target),
             [q, k, v])


@pytest.mark.parametrize("target", cuda_or(KVCACHE_BACKENDS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_long_kv_caches_appended_and_read(target, dtype, paged):
    """New tokens written at positions past 2^31 elements, then every cached key read: a
    contiguous cache (B, capacity, Hkv, D), or pages of 16 positions (page 8 on starts 2^31 in)."""
    batch, capacity, page_size = 2, LENGTH, 16
    if paged:
        pages = batch * capacity // page_size
        k_cache = far_apart((pages, page_size, 2, 16), 1, dtype)
        v_cache = far_apart((pages, page_size, 2, 8), 1, dtype)
        table = torch.randperm(pages, dtype=torch.int32).reshape(batch, capacity // page_size)
    else:
        k_cache = far_apart((batch, capacity, 2, 16), 1, dtype)
        v_cache = far_apart((batch, capacity, 2, 8), 1, dtype)
        table = None
    q = torch.randn(batch, 1, 4, 16, dtype=dtype)
    k_new = torch.randn(batch, 2, 2, 16, dtype=dtype)
    v_new = torch.randn(batch, 2, 2, 8, dtype=dtype)
    seqlens = torch.tensor([capacity - 2, 137], dtype=torch.int32)
    near_k, near_v = k_cache.contiguous(), v_cache.contiguous()
    results = [fused_attn.attention_with_kvcache(q, kc, vc, seqlens, k=k_new, v=v_new, block_table=table,
                                                 causal=True, backend=target)
               for kc, vc in ((k_cache, v_cache), (near_k, near_v))]
    assert_same("out", *results)
    assert_same("k cache", k_cache, near_k)
    assert_same("v cache", v_cache, near_v)


def test_only_slices_past_2_31_elements_take_int64_offsets():
    """The triton kernels' int64 variant (common.needs_int64_offsets) serves exactly the calls that
    need it: a slice's span is judged along L and D, not B and H (those offsets are int64 always)."""
    pytest.importorskip("triton")
    from fused_attn.triton.common import INT32_MAX, needs_int64_offsets

    def strided(shape, strides):
        return torch.empty_strided(shape, strides, device="meta")  # shapes and strides, no memory

    heads, dim = 32, 128
    longest = INT32_MAX // (heads * dim)  # a (1, L, H, D) layout's last position with an int32 offset
    within = strided((1, heads, longest + 1, dim), (0, dim, heads * dim, 1))  # span INT32_MAX - (H - 1) * D
    assert not needs_int64_offsets(within, None)
    past = strided((1, heads, longest + 2, dim), (0, dim, heads * dim, 1))
    assert needs_int64_offsets(within, past)
    # batch and head strides past 2^31 do not count; a packed (total, H, D) one is judged by total
    assert not needs_int64_offsets(strided((64, 64, 1024, 128), (2 ** 33, 2 ** 27, 128, 1)))
    assert needs_int64_offsets(strided((longest + 2, heads, dim), (heads * dim, dim, 1)))
    assert not needs_int64_offsets(strided((longest + 1, heads, dim), (heads * dim, dim, 1)))
