"""Output, lse and every gradient against float64 math, by the peers' rule (oracle.py).

The shapes name the bug classes they guard: single rows and keys, ragged tails that are not
multiples of any block, Lq > Lk and Lq < Lk (where the two causal alignments differ and rows can
be fully masked), GQA and MQA, head dims that are not powers of two (1 to 256), Dv != D.
"""
import pytest
import torch

import oracle
from conftest import DEVICE

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
    oracle.check_against_oracle(backend, shape, dtype, DEVICE, sequence_major=sequence_major, scale=scale, **mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(backend, shape, mask, dtype):
    check_against_oracle(backend, shape, dtype, mask)


@pytest.mark.parametrize("mask", MASKS)
def test_non_default_scale(backend, mask):
    check_against_oracle(backend, (1, 2, 1, 50, 70, 64, 64), torch.float16, mask, scale=0.37)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [0.0, -0.37])
def test_zero_and_negative_scales(backend, dtype, scale):
    """scale = 0 (every visible key weighs the same) and negative scales are legal: a kernel must not
    take the largest raw score as the largest scaled one (after a negative scale it is the
    smallest, and exp overflows) nor scale the -inf of hidden keys (0 * -inf is NaN). Blocks of
    many queries, which a backward follows, then a decoding-shaped call that none does."""
    check_against_oracle(backend, (1, 2, 1, 70, 90, 64, 64), dtype, dict(window=(20, 5)), scale=scale)
    q, k, v = oracle.random_qkv(1, 4, 2, 1, 90, 64, 64, dtype=dtype, device=DEVICE)
    keywords = dict(window=(40, -1), scale=scale)  # bottom-right aligned: what the decoding kernels take
    with torch.no_grad():
        out = fused_attn.attention(q, k, v, causal_alignment="bottom_right", backend=backend, **keywords)
    exact, _ = oracle.naive_attention(q, k, v, bottom_right=True, dtype=torch.float64, **keywords)
    lowprec, _ = oracle.naive_attention(q, k, v, bottom_right=True, **keywords)
    oracle.assert_accurate("out", out, exact, lowprec, dtype)


@pytest.mark.parametrize("shape", [(1, 2, 2, 9, 12, 16, 16), (1, 4, 2, 9, 40, 64, 64), (2, 2, 1, 70, 70, 32, 32)],
                         ids=["few-queries", "few-queries-gqa", "ragged-last-block"])
@pytest.mark.parametrize("scale", [0.37, 4.0, 10.0])
def test_float32_gradients_at_large_scales(backend, shape, scale):
    """The backward recomputes P = exp(S - lse) against the forward's lse: with scores of ~50, any
    difference between the two passes' S is a large error in P. The cpu backend rounds S alike in
    both (a scale applied to q in one pass and to q.k in the other, or few queries' dot products
    summed in another order, once made dV's error ~10x that of fp32 math here). Larger scales are
    not held to the rule: there the fp32 lse's own rounding alone gives P ~2.5x fp32 math's error
    (torch's CPU flash kernel's too, which ours then equals). Triton's passes
    multiply blocks of other shapes, whose sums run in other orders (under the interpreter numpy's
    too), as flash-attn's do: it is held to the rule at ordinary scales only (README, Accuracy)."""
    if backend == "triton" and scale > 1:
        scale = 1.0  # still the rule at ordinary scales
    check_against_oracle(backend, shape, torch.float32, dict(causal=True, causal_alignment="bottom_right"),
                         scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_major_inputs(backend, dtype):
    """Transposed views of (B, L, H, D) tensors: the common layout of real models."""
    check_against_oracle(backend, (2, 4, 2, 77, 77, 64, 64), dtype, dict(causal=True), sequence_major=True)


def test_longer_sequences(backend):
    """Several key and query blocks in every program, both causal stages exercised."""
    check_against_oracle(backend, (1, 2, 1, 300, 260, 64, 64), torch.float16,
                         dict(causal=True, causal_alignment="bottom_right"))
