"""Tensors whose elements lie more than 2^31 elements apart: every backend addresses them in 64 bits.

A (B, L, H, D) tensor of a long sequence passes 2^31 elements within one batch entry: at H = 32,
D = 128, from position 524288 on (a 4 GiB bf16 tensor, a long context or a packed batch on one
GPU). Offsets computed in 32 bits there wrap around: a kernel then reads or writes the wrong
memory (a fault, or a silently wrong answer). The tests make that happen at small sizes: positions
ROW_STRIDE = 2^24 elements apart, so position 128 starts 2^31 elements in, while any 128
positions (a tile) span less than 2^31. A test's tensors share one buffer of such rows, each in its
own columns (FarRows); on the CPU it is an anonymous mapping reserved without memory
(MAP_NORESERVE), so only the pages the test writes and the kernels read take any. On a GPU it is
real memory (6 GB in fp16, 12 in fp32): the tests run in one xdist group, one at a time.

Each call must give exactly what the same backend gives on compact copies of its inputs (the
kernels compute the same products in the same order; only the addresses differ). Under Triton's
interpreter a wrapped offset fails as OutOfBounds (interpreter_checks.py); the CUDA emulator and
the CPU kernels read wherever it points.
"""
import math
import mmap

import pytest
import torch

from conftest import BACKENDS, DEVICE, KVCACHE_BACKENDS, VARLEN_BACKENDS

import fused_attn

pytestmark = pytest.mark.xdist_group("large_offsets")

ROW_STRIDE = 2 ** 24
LENGTH = 160  # positions 128 .. 159 lie past 2^31 elements
ROWS = 176  # the longest tensor's positions, and the buffer's
DTYPES = [torch.float16, torch.float32]


class FarRows:
    """ROWS rows of ROW_STRIDE elements of one dtype on one device, from which `take` carves tensors
    whose positions are rows: each tensor gets the next free columns of every row."""

    def __init__(self, dtype, device):
        elements = ROWS * ROW_STRIDE
        if device.type == "cpu":
            itemsize = torch.empty(0, dtype=dtype).element_size()
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            self.buffer = torch.frombuffer(mmap.mmap(-1, elements * itemsize, flags=flags), dtype=dtype)
        else:
            self.buffer = torch.empty(elements, dtype=dtype, device=device)
        self.columns = 0

    def take(self, shape, dim, requires_grad=False):
        """A tensor of random values: dim `dim` (every dim before it of size 1) steps ROW_STRIDE
        elements, the dims after it are compact within a row."""
        assert all(size == 1 for size in shape[:dim]) and shape[dim] <= ROWS
        inner = math.prod(shape[dim + 1:])
        assert self.columns + inner <= ROW_STRIDE
        strides = [0] * len(shape)
        step = 1
        for d in reversed(range(dim + 1, len(shape))):
            strides[d] = step
            step *= shape[d]
        strides[dim] = ROW_STRIDE
        t = self.buffer.as_strided(shape, strides, self.columns)
        self.columns += inner
        values = torch.rand(shape) < 0.7 if t.dtype == torch.bool else torch.randn(shape, dtype=t.dtype)
        with torch.no_grad():
            t.copy_(values.to(t.device))
        return t.requires_grad_(requires_grad)


def compact(t):
    """A compact copy of t, a leaf requiring grad where t does."""
    return t.detach().contiguous().requires_grad_(t.requires_grad)


def assert_same(name, got, expected):
    assert got.shape == expected.shape, name
    assert torch.equal(got, expected), f"{name}: max |diff| {(got.double() - expected.double()).abs().max().item()}"


def run_both(call, far, dout=None):
    """call(*tensors) on the far-apart tensors and on compact copies: the outputs, and the gradients
    of the tensors that require grad (from dout, far apart too, and its compact copy), must be the
    same. (Every tensor of a FarRows is taken before the calls: writing to the buffer afterwards
    would count as changing the saved inputs, which share its version counter.)"""
    near = [compact(t) for t in far]
    results = []
    for tensors, gradient in ((far, dout), (near, None if dout is None else compact(dout))):
        out = call(*tensors)
        leaves = [t for t in tensors if t.requires_grad]
        grads = torch.autograd.grad(out, leaves, gradient) if leaves else ()
        results.append((out.detach(), grads))
    (out, grads), (expected_out, expected_grads) = results
    assert_same("out", out, expected_out)
    for index, (grad, expected) in enumerate(zip(grads, expected_grads)):
        assert_same(f"gradient {index}", grad, expected)


@pytest.fixture
def target(request):
    """(backend name, device) of the test's calls; "cuda-emulated" registers the emulated cuda
    backend, which takes CPU tensors."""
    if request.param == "cuda-emulated":
        return request.getfixturevalue("emulated")
    return request.param, DEVICE


def with_emulated(backends):
    return backends + ["cuda-emulated"]


@pytest.mark.parametrize("target", with_emulated(BACKENDS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keywords", [{}, dict(causal=True, window=(40, 0))], ids=["plain", "causal-window"])
def test_long_sequences_forward_and_backward(target, dtype, keywords):
    """q, k, v (1, L, H, D) with positions 2^24 elements apart, read as (B, H, L, D) views; GQA."""
    backend, device = target
    rows = FarRows(dtype, device)
    q = rows.take((1, LENGTH, 4, 16), 1, requires_grad=True)
    k = rows.take((1, LENGTH + 9, 2, 16), 1, requires_grad=True)
    v = rows.take((1, LENGTH + 9, 2, 8), 1, requires_grad=True)
    dout = rows.take((1, LENGTH, 4, 8), 1)

    def call(q, k, v):
        return fused_attn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=backend,
                                    **keywords).transpose(1, 2)

    run_both(call, [q, k, v], dout)


@pytest.mark.parametrize("target", with_emulated(BACKENDS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_keys_read_by_the_decoding_kernel(target, dtype):
    """Few query rows against a long k and v without gradients: the decoding kernels' addressing."""
    backend, device = target
    rows = FarRows(dtype, device)
    q = rows.take((1, 2, 4, 16), 1)
    k = rows.take((1, LENGTH, 1, 16), 1)
    v = rows.take((1, LENGTH, 1, 16), 1)
    run_both(lambda q, k, v: fused_attn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  causal=True, causal_alignment="bottom_right", backend=backend),
             [q, k, v])


@pytest.mark.parametrize("target", with_emulated(BACKENDS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_masks_and_biases(target, dtype):
    """A bool mask and a learnable float bias (1, H, Lq, Lk) whose query rows lie 2^24 elements apart."""
    backend, device = target
    rows = FarRows(dtype, device)
    q, k, v = (rows.take((1, LENGTH, 2, 16), 1, requires_grad=True) for _ in range(3))
    bias = rows.take((1, LENGTH, 2, LENGTH), 1, requires_grad=True)  # read as (1, H, Lq, Lk)
    dout = rows.take((1, LENGTH, 2, 16), 1)
    mask = FarRows(torch.bool, device).take((1, 1, LENGTH, LENGTH), 2)
    with torch.no_grad():
        mask[..., :1] = True  # every row sees a key

    def call(q, k, v, attn_mask):
        heads_first = [t.transpose(1, 2) for t in (q, k, v)]
        return fused_attn.attention(*heads_first, attn_mask=attn_mask, backend=backend).transpose(1, 2)

    run_both(call, [q, k, v, mask], dout)
    run_both(lambda q, k, v, bias: call(q, k, v, bias.transpose(1, 2)), [q, k, v, bias], dout)


@pytest.mark.parametrize("target", with_emulated(VARLEN_BACKENDS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_sequences_starting_past_2_31_elements(target, dtype):
    """varlen: the second sequence's rows start 140 (queries) and 130 (keys) positions in."""
    backend, device = target
    rows = FarRows(dtype, device)
    q = rows.take((170, 4, 16), 0, requires_grad=True)
    k = rows.take((175, 2, 16), 0, requires_grad=True)
    v = rows.take((175, 2, 8), 0, requires_grad=True)
    dout = rows.take((170, 4, 8), 0)
    cu_q = torch.tensor([0, 140, 170], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 130, 175], dtype=torch.int32, device=device)
    run_both(lambda q, k, v: fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 140, 130, causal=True, backend=backend),
             [q, k, v], dout)


@pytest.mark.parametrize("target", with_emulated(KVCACHE_BACKENDS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_long_kv_caches_appended_and_read(target, dtype, paged):
    """New tokens written at positions past 2^31 elements, then every cached key read: a
    contiguous cache (B, capacity, Hkv, D), or pages of 16 positions (page 8 on starts 2^31 in)."""
    backend, device = target
    rows = FarRows(dtype, device)
    batch, capacity, page_size = 2, LENGTH, 16
    if paged:
        pages = batch * capacity // page_size
        k_cache = rows.take((pages, page_size, 2, 16), 0)
        v_cache = rows.take((pages, page_size, 2, 8), 0)
        table = torch.randperm(pages, dtype=torch.int32, device=device).reshape(batch, capacity // page_size)
    else:  # (capacity, B, ...) rows read as (B, capacity, ...)
        k_cache = rows.take((capacity, batch, 2, 16), 0).transpose(0, 1)
        v_cache = rows.take((capacity, batch, 2, 8), 0).transpose(0, 1)
        table = None
    q = torch.randn(batch, 1, 4, 16, dtype=dtype, device=device)
    k_new = torch.randn(batch, 2, 2, 16, dtype=dtype, device=device)
    v_new = torch.randn(batch, 2, 2, 8, dtype=dtype, device=device)
    seqlens = torch.tensor([capacity - 2, 137], dtype=torch.int32, device=device)
    near_k, near_v = k_cache.contiguous(), v_cache.contiguous()
    results = [fused_attn.attention_with_kvcache(q, kc, vc, seqlens, k=k_new, v=v_new, block_table=table,
                                                 causal=True, backend=backend)
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
