"""Behaviour promised beyond accuracy: fully masked rows, layouts, purity, determinism, empties."""
import pytest
import torch

from conftest import DEVICE, INTERPRETED
from oracle import naive_attention, random_qkv

import fused_attn


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_fully_masked_rows_give_zero_output_and_finite_zero_gradients(backend, dtype):
    # Bottom-right causal with Lq > Lk: the first Lq - Lk query rows see no key at all.
    seqlen_q, seqlen_k = 90, 40
    q, k, v = random_qkv(1, 2, 1, seqlen_q, seqlen_k, 32, 32, dtype, DEVICE, requires_grad=True)
    out, lse = fused_attn.attention(q, k, v, causal=True, causal_alignment="bottom_right", return_lse=True,
                                    backend=backend)
    masked = slice(0, seqlen_q - seqlen_k)
    assert torch.all(out[:, :, masked] == 0)
    assert torch.all(lse[:, :, masked] == float("-inf"))
    assert torch.isfinite(lse[:, :, seqlen_q - seqlen_k:]).all()
    out.backward(torch.randn_like(out))
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
    assert torch.all(q.grad[:, :, masked] == 0)
    assert q.grad[:, :, seqlen_q - seqlen_k:].abs().sum() > 0


def test_outputs_follow_the_input_layout(backend):
    q, k, v = random_qkv(2, 4, 2, 33, 45, 32, 48, torch.float32, DEVICE, sequence_major=True, requires_grad=True)
    out = fused_attn.attention(q, k, v, backend=backend)
    assert out.shape == (2, 4, 33, 48)
    assert out.transpose(1, 2).is_contiguous(), "a (B, L, H, D) view in should give a (B, L, H, D) view out"
    out.backward(torch.randn_like(out))
    for grad, like in ((q.grad, q), (k.grad, k), (v.grad, v)):
        assert grad.stride() == like.stride()


def test_any_strides(backend):
    """Inputs that are slices with a non-unit last stride give the same result as contiguous copies."""
    wide = torch.randn(1, 2, 40, 64, device=DEVICE)
    q, k, v = wide[..., ::2], wide.flip(2)[..., 1::2], wide[:, :, :, :32]
    expected = fused_attn.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, backend=backend)
    torch.testing.assert_close(fused_attn.attention(q, k, v, causal=True, backend=backend), expected)


def test_inputs_are_not_modified(backend):
    q, k, v = random_qkv(1, 4, 2, 50, 60, 40, 40, torch.float16, DEVICE, requires_grad=True)
    before = [t.detach().clone() for t in (q, k, v)]
    out, lse = fused_attn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    dout = torch.randn_like(out)
    dout_before = dout.clone()
    out.backward(dout)
    for t, saved in zip((q, k, v, dout), (*before, dout_before)):
        assert torch.equal(t.detach(), saved)


def test_gradients_are_bitwise_reproducible(backend):
    q, k, v = random_qkv(1, 4, 1, 130, 70, 64, 64, torch.float16, DEVICE, requires_grad=True)
    dout = torch.randn(1, 4, 130, 64, dtype=torch.float16, device=DEVICE)
    runs = []
    for _ in range(2):
        out = fused_attn.attention(q, k, v, causal=True, deterministic=True, backend=backend)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_gqa_equals_repeated_heads(backend):
    q, k, v = random_qkv(2, 6, 2, 40, 50, 32, 32, torch.float32, DEVICE, requires_grad=True)
    out = fused_attn.attention(q, k, v, causal=True, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    k_rep, v_rep = (t.detach().repeat_interleave(3, dim=1).requires_grad_() for t in (k, v))
    q_copy = q.detach().clone().requires_grad_()
    out_rep = fused_attn.attention(q_copy, k_rep, v_rep, causal=True, backend=backend)
    grads_rep = torch.autograd.grad(out_rep, (q_copy, k_rep, v_rep), dout)
    torch.testing.assert_close(out, out_rep)
    torch.testing.assert_close(grads[0], grads_rep[0])
    for grad, grad_rep in zip(grads[1:], grads_rep[1:]):  # shared heads: gradients summed over the group
        torch.testing.assert_close(grad, grad_rep.unflatten(1, (2, 3)).sum(2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 5), (1, 2, 2, 0, 5), (1, 2, 2, 5, 0), (1, 0, 0, 5, 5), (1, 0, 2, 5, 5)],
                         ids=["no-batch", "no-queries", "no-keys", "no-heads", "no-query-heads"])
def test_empty_inputs(backend, shape):
    batch, heads_q, heads_kv, seqlen_q, seqlen_k = shape
    q, k, v = random_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, 16, 16, torch.float32, DEVICE,
                         requires_grad=True)
    out, lse = fused_attn.attention(q, k, v, return_lse=True, backend=backend)
    assert out.shape == (batch, heads_q, seqlen_q, 16) and lse.shape == (batch, heads_q, seqlen_q)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert torch.all(q.grad == 0) and torch.all(k.grad == 0) and torch.all(v.grad == 0)


def test_causal_alignments_agree_when_square(backend):
    q, k, v = random_qkv(1, 2, 2, 65, 65, 32, 32, torch.float32, DEVICE)
    top = fused_attn.attention(q, k, v, causal=True, causal_alignment="top_left", backend=backend)
    bottom = fused_attn.attention(q, k, v, causal=True, causal_alignment="bottom_right", backend=backend)
    assert torch.equal(top, bottom)


def test_backends_agree(backend):
    """Every backend against the reference backend, an independent blockwise implementation."""
    q, k, v = random_qkv(2, 4, 2, 100, 75, 48, 48, torch.float32, DEVICE)
    for causal in (False, True):
        ours = fused_attn.attention(q, k, v, causal=causal, causal_alignment="bottom_right", backend=backend)
        ref = fused_attn.attention(q, k, v, causal=causal, causal_alignment="bottom_right", backend="reference")
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_autocast_changes_nothing_but_the_inputs_dtype(backend):
    """Inside torch.autocast the entry points cast float32 inputs to its dtype (tests/test_sdpa.py)
    and nothing else: a backend's arithmetic stays its own (the reference backend's float32 matmuls
    had run in bf16 under the caller's autocast, with 10x the error), and KV caches are never cast.
    So calls on inputs already in that dtype, and KV-cache calls on float32 caches, give the same
    bits inside autocast as outside."""
    q, k, v = random_qkv(1, 4, 2, 20, 37, 32, 32, torch.bfloat16, DEVICE, requires_grad=True)
    bias = torch.randn(1, 4, 20, 37, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    cache_q = torch.randn(2, 1, 4, 32, device=DEVICE)
    k_cache, v_cache = (torch.randn(2, 50, 2, 32, device=DEVICE) for _ in range(2))
    seqlens = torch.tensor([30, 50], dtype=torch.int32, device=DEVICE)
    dout = torch.randn(1, 4, 20, 32, dtype=torch.bfloat16, device=DEVICE)

    def calls():
        out, lse = fused_attn.attention(q, k, v, attn_mask=bias, causal=True, return_lse=True, backend=backend)
        grads = torch.autograd.grad((out * dout).sum() + lse.sum(), (q, k, v, bias))
        decoded = []
        if backend in fused_attn.available_backends() and backend != "cuda":  # (KV-cache backends on CPU)
            decoded = fused_attn.attention_with_kvcache(cache_q, k_cache, v_cache, seqlens, return_lse=True,
                                                        backend=backend)
        return (out, lse, *grads, *decoded)

    expected = calls()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        results = calls()
    for name, result, outside in zip(("out", "lse", "dq", "dk", "dv", "dbias", "cache out", "cache lse"),
                                     results, expected):
        assert result.dtype == outside.dtype, name
        assert torch.equal(result, outside), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_bias_at_the_float_minimum_hides_its_key(backend, dtype):
    """Float mask values at or below -2^127 (torch.finfo(dtype).min, Hugging Face's padding value)
    hide their keys as -inf does, in every backend: a row they hide entirely gives out 0, lse -inf
    and zero gradients (Triton's base-2 scores overflowed to -inf there while the other backends
    averaged v, with backward probabilities exp(S - lse) of 1 for every key: lse lost log(sum));
    rows they hide in part are as if those keys were masked."""
    q, k, v = random_qkv(2, 2, 1, 12, 20, 16, 16, dtype, DEVICE, requires_grad=True)
    bias = torch.randn(2, 1, 12, 20, device=DEVICE).to(dtype)
    lowest = torch.finfo(dtype).min
    bias[:, :, 3] = lowest  # row 3 hidden entirely
    bias[0, :, 5, ::2] = lowest
    bias[1, :, 7] = -2.0 ** 127  # the line itself hides
    bias[1, :, 8, :10] = -2.0 ** 126  # a finite score below it does not
    bias.requires_grad_()
    out, lse = fused_attn.attention(q, k, v, attn_mask=bias, return_lse=True, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum() + lse.sum() * 0.5, (q, k, v, bias))
    exact = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    exact_out, exact_lse = naive_attention(*exact[:3], attn_mask=exact[3], dtype=torch.float64)
    exact_grads = torch.autograd.grad((exact_out * dout.double()).sum() + exact_lse.sum() * 0.5, exact)
    assert torch.all(out[:, :, 3] == 0) and torch.all(lse[:, :, 3] == float("-inf")) and torch.all(out[1, :, 7] == 0)
    assert torch.isfinite(lse[1, :, 8]).all()
    for grad in grads:
        assert torch.isfinite(grad).all()
    assert torch.all(grads[0][:, :, 3] == 0) and torch.all(grads[3][bias.detach() <= -2.0 ** 127] == 0)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
    visible = torch.isfinite(exact_lse)
    torch.testing.assert_close(lse[visible].double(), exact_lse[visible], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(out.double(), exact_out, rtol=tolerance, atol=tolerance)
    for grad, exact_grad in zip(grads, exact_grads):
        torch.testing.assert_close(grad.double(), exact_grad.nan_to_num(0.0), rtol=tolerance, atol=tolerance)


def test_bf16_probabilities_are_rounded_without_bias(backend, monkeypatch):
    """With v = 1 every output is 1 whatever the scores: out = sum(p v) / sum(p). Where the
    probabilities go to bf16 matrix products (the cpu backend's bf16 products, every kind it has),
    they are rounded to nearest, not truncated: truncation biased every output low by ~0.4%, inside
    the accuracy rule's bf16 allowance, yet it turns 1 into 0.99609375 here."""
    from fused_attn.backends import cpu_backend

    q, k, _ = random_qkv(2, 4, 2, 300, 300, 128, 128, torch.bfloat16, DEVICE)
    v = torch.ones(2, 2, 300, 128, dtype=torch.bfloat16, device=DEVICE)
    kinds = ["amx", "dot", "fp32"] if backend == "cpu" else [None]
    for kind in kinds:
        if kind is not None:
            monkeypatch.setenv("FUSED_ATTN_CPU_BF16", kind)
            if cpu_backend.bf16_products() != kind and kind != "fp32":
                continue  # (this CPU has none of that kind)
        out = fused_attn.attention(q, k, v, causal=True, backend=backend)
        if backend == "triton" and INTERPRETED:  # its fp32 -> bf16 casts truncate (FACTS.md): a bf16 ulp
            assert (out.float() - 1).abs().max() <= 2.0 ** -7
            continue
        assert torch.equal(out, torch.ones_like(out)), f"bf16 products: {kind}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_rows_past_the_sequence_are_never_read(backend, dtype, device=DEVICE):
    """q, k, v and dout as views of longer storage whose rows past Lq and Lk are NaN: a kernel that
    loads a row past a ragged last block, even to multiply it by p = 0, gives NaN. The results are
    those of contiguous copies, bit for bit."""
    def view(length):
        storage = torch.randn(1, 2, length + 8, 32, device=device).to(dtype)
        storage[:, :, length:] = float("nan")
        return storage[:, :, :length]

    def outputs_and_gradients(q, k, v):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fused_attn.attention(*leaves, causal=True, causal_alignment="bottom_right", backend=backend)
        return (out, *torch.autograd.grad(out, leaves, dout))

    q, k, v, dout = view(37), view(70), view(70), view(37)
    of_views = outputs_and_gradients(q, k, v)
    assert all(torch.isfinite(t).all() for t in of_views)
    for a, b in zip(of_views, outputs_and_gradients(*(t.contiguous() for t in (q, k, v)))):
        assert torch.equal(a, b)
