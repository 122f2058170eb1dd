"""Output, lse and every gradient against float64 math, by the peers' rule (oracle.py).

The shapes name the bug classes they guard: single rows and keys, ragged tails that are not
multiples of any block, Lq > Lk and Lq < Lk (where the two causal alignments differ and rows can
be fully masked), GQA and MQA, head dims that are not powers of two (1 to 256), Dv != D.
"""
import pytest
import torch

from conftest import DEVICE
from oracle import assert_accurate, naive_attention, random_qkv

import fused_attn

# (batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v)
SHAPES = [
    pytest.param((1, 2, 2, 1, 1, 16, 16), id="one-query-one-key"),
    pytest.param((2, 3, 3, 1, 37, 40, 40), id="one-query-hd40"),
    pytest.param((1, 2, 2, 37, 1, 59, 59), id="one-key-hd59"),
    pytest.param((1, 4, 2, 113, 97, 80, 80), id="gqa-lq>lk-hd80"),
    pytest.param((1, 4, 1, 97, 113, 96, 64), id="mqa-lq<lk-dv64"),
    pytest.param((2, 2, 2, 64, 64, 128, 128), id="even-hd128"),
    pytest.param((1, 2, 1, 70, 130, 111, 111), id="gqa-hd111"),
    pytest.param((1, 1, 1, 45, 50, 256, 256), id="hd256"),
    pytest.param((1, 2, 2, 33, 20, 1, 3), id="hd1-dv3"),
]
MASKS = [
    pytest.param(dict(causal=False), id="full"),
    pytest.param(dict(causal=True, causal_alignment="top_left"), id="causal-top-left"),
    pytest.param(dict(causal=True, causal_alignment="bottom_right"), id="causal-bottom-right"),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def check_against_oracle(backend, shape, dtype, mask, scale=None, sequence_major=False):
    q, k, v = random_qkv(*shape, dtype=dtype, device=DEVICE, sequence_major=sequence_major, requires_grad=True)
    out, lse = fused_attn.attention(q, k, v, scale=scale, return_lse=True, backend=backend, **mask)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    # The loss uses lse too, so its gradient path is checked; fully masked rows (lse = -inf) drop out.
    loss = lambda o, l: (o.double() * dout.double()).sum() + torch.where(torch.isfinite(l), l.double() * dlse.double(), 0).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(out, lse), (q, k, v))

    naive_kw = dict(causal=mask["causal"], bottom_right=mask.get("causal_alignment") == "bottom_right", scale=scale)
    results = {}
    for precision in (torch.float64, dtype):
        leaves = [t.detach().to(precision).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = naive_attention(*leaves, **naive_kw)
        results[precision] = (ref_out, ref_lse, torch.autograd.grad(loss(ref_out, ref_lse), leaves))
    (exact_out, exact_lse, exact_grads), (low_out, low_lse, low_grads) = results[torch.float64], results[dtype]

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_accurate("out", out, exact_out, low_out, dtype)
    assert_accurate("lse", lse, exact_lse, low_lse.to(torch.float32), torch.float32)
    for name, grad, exact, low in zip(("dq", "dk", "dv"), grads, exact_grads, low_grads):
        assert grad.dtype == dtype
        assert_accurate(name, grad, exact, low, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(backend, shape, mask, dtype):
    check_against_oracle(backend, shape, dtype, mask)


@pytest.mark.parametrize("mask", MASKS)
def test_non_default_scale(backend, mask):
    check_against_oracle(backend, (1, 2, 1, 50, 70, 64, 64), torch.float16, mask, scale=0.37)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_major_inputs(backend, dtype):
    """Transposed views of (B, L, H, D) tensors: the common layout of real models."""
    check_against_oracle(backend, (2, 4, 2, 77, 77, 64, 64), dtype, dict(causal=True), sequence_major=True)


def test_longer_sequences(backend):
    """Several key and query blocks in every program, both causal stages exercised."""
    check_against_oracle(backend, (1, 2, 1, 300, 260, 64, 64), torch.float16,
                         dict(causal=True, causal_alignment="bottom_right"))
