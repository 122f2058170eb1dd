"""Calls captured in CUDA graphs and replayed give what the same calls give eagerly (GPU only).

Serving loops capture a whole decoding step, new tokens' writes and the lengths' increment
included, and training loops capture forward and backward (torch.compile's "reduce-overhead", or
torch.cuda.make_graphed_callables). A capture forbids host reads (the lengths' and boundaries'
host checks are skipped then: fused_attn/host_checks.py) and new allocations outside the graph's
pool, and a replay reruns the recorded kernels on whatever the static tensors hold. Each test
replays several steps with new values and compares with eager calls on copies of the same state:
the same kernels on the same inputs, so the results are equal bit for bit.
"""
import pytest
import torch

from conftest import KVCACHE_BACKENDS, VARLEN_BACKENDS

import fused_attn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

CUDA = torch.device("cuda")
GPU_KERNELS = ("triton", "cuda")  # the reference backend reads lengths on the host: never captured
STEPS = 3


def captured(call):
    """call() captured in a CUDA graph (after a warm-up on a side stream, as torch's docs ask, which
    compiles the kernels and chooses the tiles outside the capture), and the outputs it returned."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = call()
    return graph, outputs


def refill(*tensors):
    for t in tensors:
        t.copy_(torch.randn_like(t))


@pytest.mark.parametrize("backend", [b for b in GPU_KERNELS if b in KVCACHE_BACKENDS])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decoding_steps_replayed(backend, paged):
    """A step writes one token per sequence and attends to the cache, then counts the token."""
    batch, capacity, heads_q, heads_kv, dim, page = 3, 96, 8, 2, 64, 16
    k_cache = torch.randn(batch * capacity // page if paged else batch, page if paged else capacity, heads_kv, dim,
                          dtype=torch.float16, device=CUDA)
    v_cache = torch.randn_like(k_cache)
    table = (torch.randperm(batch * capacity // page, device=CUDA).view(batch, capacity // page).to(torch.int32)
             if paged else None)
    seqlens = torch.tensor([5, 40, 77], dtype=torch.int32, device=CUDA)
    q = torch.randn(batch, 1, heads_q, dim, dtype=torch.float16, device=CUDA)
    k_new = torch.randn(batch, 1, heads_kv, dim, dtype=torch.float16, device=CUDA)
    v_new = torch.randn_like(k_new)

    def step(k_cache=k_cache, v_cache=v_cache, seqlens=seqlens):
        out = fused_attn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k_new, v=v_new, block_table=table,
                                                causal=True, backend=backend)
        seqlens += 1
        return out

    state = [t.clone() for t in (k_cache, v_cache, seqlens)]
    graph, out = captured(step)
    for t, saved in zip((k_cache, v_cache, seqlens), state):  # undo the warm-up's and capture's writes
        t.copy_(saved)
    eager_state = [t.clone() for t in state]
    for _ in range(STEPS):
        refill(q, k_new, v_new)
        graph.replay()
        expected = step(*eager_state)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for t, mirrored in zip((k_cache, v_cache, seqlens), eager_state):
            assert torch.equal(t, mirrored)


@pytest.mark.parametrize("backend", [b for b in GPU_KERNELS if b in KVCACHE_BACKENDS])
def test_a_replayed_step_past_the_cache_gives_nan_rows(backend):
    """A replay runs no host check: a sequence whose lengths outgrew its cache (a serving loop that
    forgot to stop it) gets NaN rows from the kernels, and the other sequences their own rows."""
    batch, capacity, heads_q, heads_kv, dim = 2, 64, 8, 2, 64
    k_cache = torch.randn(batch, capacity, heads_kv, dim, dtype=torch.bfloat16, device=CUDA)
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.tensor([10, 20], dtype=torch.int32, device=CUDA)
    q = torch.randn(batch, 1, heads_q, dim, dtype=torch.bfloat16, device=CUDA)

    def call():
        return fused_attn.attention_with_kvcache(q, k_cache, v_cache, seqlens, causal=True, backend=backend)

    graph, out = captured(call)
    seqlens.copy_(torch.tensor([capacity + 1, 30], dtype=torch.int32, device=CUDA))
    graph.replay()
    assert out[0].isnan().all()
    valid = torch.tensor([10, 30], dtype=torch.int32, device=CUDA)
    expected = fused_attn.attention_with_kvcache(q, k_cache, v_cache, valid, causal=True, backend=backend)
    torch.testing.assert_close(out[1], expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", [b for b in GPU_KERNELS if b in VARLEN_BACKENDS])
def test_packed_forward_replayed(backend):
    """varlen forward (inference) with device-side boundaries that change between replays."""
    heads, dim = 4, 64
    q = torch.randn(200, heads, dim, dtype=torch.bfloat16, device=CUDA)
    k, v = torch.randn_like(q), torch.randn_like(q)
    cu_seqlens = torch.tensor([0, 50, 120, 200], dtype=torch.int32, device=CUDA)

    def call():
        return fused_attn.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, 80, 80, causal=True, backend=backend)

    graph, out = captured(call)
    for lengths in ([0, 80, 150, 200], [0, 10, 90, 170]):
        refill(q, k, v)
        cu_seqlens.copy_(torch.tensor(lengths, device=CUDA))
        graph.replay()
        expected = call()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # rows past the last sequence are 0 in both


@pytest.mark.parametrize("backend", [b for b in GPU_KERNELS if b in fused_attn.available_backends()])
def test_training_step_graphed(backend):
    """Forward and backward through torch.cuda.make_graphed_callables, with a learnable bias."""
    batch, heads, length, dim = 2, 4, 128, 64

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(1, heads, length, length, device=CUDA) / 4)

        def forward(self, q, k, v):
            return fused_attn.attention(q, k, v, attn_mask=self.bias, causal=True, backend=backend)

    eager = Attention()
    graphed_module = Attention()
    graphed_module.load_state_dict(eager.state_dict())

    def inputs():
        return [torch.randn(batch, heads, length, dim, dtype=torch.float16, device=CUDA, requires_grad=True)
                for _ in range(3)]

    graphed = torch.cuda.make_graphed_callables(graphed_module, tuple(inputs()))
    for _ in range(STEPS):
        q, k, v = inputs()
        dout = torch.randn(batch, heads, length, dim, dtype=torch.float16, device=CUDA)
        graphed_module.zero_grad()
        eager.zero_grad()
        out = graphed(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v, graphed_module.bias), dout)
        twin = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        expected = eager(*twin)
        expected_grads = torch.autograd.grad(expected, (*twin, eager.bias), dout)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
