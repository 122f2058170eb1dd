"""Masks, learnable biases, windows, ALiBi, softcap and dropout: every keyword against float64 math,
alone and combined, with GQA, both alignments and ragged shapes."""
import sys

import pytest
import torch

from conftest import DEVICE, INTERPRETED
from oracle import assert_accurate, check_against_oracle, corner_mask, naive_attention, random_qkv, tile_sparse_mask

import fused_attn

B, HQ, HKV, LQ, LK, D = 2, 4, 2, 45, 70, 32
SHAPE = (B, HQ, HKV, LQ, LK, D, D)


@pytest.mark.parametrize("bias_shape", [
    (1, HQ, LQ, LK), (B, 1, 1, LK), (1, 1, LQ, LK), (B, HQ, LQ, LK), (LQ, LK), (B, HQ, LQ, 1), (1,),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_learnable_bias_gradient_has_the_bias_shape(variant_backend, bias_shape, dtype):
    bias = torch.randn(bias_shape, dtype=dtype, device=DEVICE, requires_grad=True)
    check_against_oracle(variant_backend, SHAPE, dtype, DEVICE, attn_mask=bias, causal=True)


@pytest.mark.parametrize("keywords", [
    dict(causal=True, causal_alignment="bottom_right"), dict(softcap=2.0), dict(dropout_p=0.3),
    dict(window=(9, 4), alibi_slopes="per-head"),
], ids=["bottom-right", "softcap", "dropout", "window-alibi"])
def test_learnable_bias_gradient_with_each_variant(variant_backend, keywords):
    """The bias gradient with each variant on its own, so that a failure names the interaction (the
    diagonal's shift, the softcap's derivative coming before the bias's, the dropout counter's
    batch and head): the bias-shape test above is causal top-left only."""
    keywords = dict(keywords)
    if keywords.get("alibi_slopes") == "per-head":
        keywords["alibi_slopes"] = torch.rand(HQ, device=DEVICE)
    bias = torch.randn(B, 1, LQ, LK, device=DEVICE, requires_grad=True)
    check_against_oracle(variant_backend, SHAPE, torch.float32, DEVICE, attn_mask=bias, **keywords)


def test_float32_bias_with_bfloat16_inputs(variant_backend):
    bias = torch.randn(1, HQ, LQ, LK, device=DEVICE, requires_grad=True)
    check_against_oracle(variant_backend, SHAPE, torch.bfloat16, DEVICE, attn_mask=bias)


def test_bool_mask_showing_one_pair_of_a_tile(variant_backend):
    """Tiles hidden but for one pair at a corner (oracle.corner_mask): each must be computed, forward
    and gradients (a tile judged by all but its last key was skipped)."""
    mask = corner_mask(1, 2, 70, 200, DEVICE)
    check_against_oracle(variant_backend, (1, 2, 1, 70, 200, 32, 32), torch.float32, DEVICE, attn_mask=mask)


@pytest.mark.parametrize("keywords", [
    dict(alibi_slopes="per-head", causal=True, causal_alignment="bottom_right"), dict(softcap=3.0, window=(20, 5)),
    dict(attn_mask="bias", alibi_slopes="per-head"),
], ids=["alibi-causal", "softcap-window", "bias-alibi"])
@pytest.mark.parametrize("seqlen_q", [3, LQ])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_variants_without_gradients(variant_backend, keywords, seqlen_q, dtype):
    """Calls no backward follows take other paths (the cpu backend's decoding path for few queries
    without a mask, its bf16 products, the decoding kernels): each variant there, against float64."""
    keywords = dict(keywords)
    if keywords.get("alibi_slopes") == "per-head":
        keywords["alibi_slopes"] = torch.rand(HQ, device=DEVICE)
    if keywords.get("attn_mask") == "bias":
        keywords["attn_mask"] = torch.randn(B, HQ, seqlen_q, LK, device=DEVICE)
    q, k, v = random_qkv(B, HQ, HKV, seqlen_q, LK, 64, 64, dtype, DEVICE)
    out, lse = fused_attn.attention(q, k, v, return_lse=True, backend=variant_backend, **keywords)
    naive = dict(keywords, bottom_right=keywords.pop("causal_alignment", None) == "bottom_right")
    exact_out, exact_lse = naive_attention(q, k, v, dtype=torch.float64, **naive)
    low_out, low_lse = naive_attention(q, k, v, **naive)
    assert_accurate("out", out, exact_out, low_out, dtype)
    assert_accurate("lse", lse, exact_lse, low_lse.float(), torch.float32)


@pytest.mark.parametrize("mask_shape", [(B, 1, 1, LK), (1, 1, LQ, LK), (B, HQ, LQ, LK)], ids=str)
def test_bool_mask(variant_backend, mask_shape):
    mask = torch.rand(mask_shape, device=DEVICE) > 0.3
    check_against_oracle(variant_backend, SHAPE, torch.float16, DEVICE, attn_mask=mask)


def test_bool_mask_with_fully_masked_rows(variant_backend):
    mask = torch.rand(B, HQ, LQ, LK, device=DEVICE) > 0.5
    mask[:, :, ::3] = False  # every third query row sees nothing
    check_against_oracle(variant_backend, SHAPE, torch.float32, DEVICE, attn_mask=mask)
    q, k, v = random_qkv(*SHAPE, torch.float32, DEVICE, requires_grad=True)
    out, lse = fused_attn.attention(q, k, v, attn_mask=mask, return_lse=True, backend=variant_backend)
    assert torch.all(out[:, :, ::3] == 0) and torch.all(lse[:, :, ::3] == float("-inf"))
    out.backward(torch.randn_like(out))
    assert torch.all(q.grad[:, :, ::3] == 0) and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_bool_mask_hiding_whole_tiles(variant_backend):
    """Tiles a bool mask hides entirely are skipped (forward, dq and dk/dv passes) without changing
    anything: key padding, a head that sees nothing, per-head hidden key blocks (oracle.py)."""
    mask = tile_sparse_mask(B, HQ, 70, 200, DEVICE)
    check_against_oracle(variant_backend, (B, HQ, HKV, 70, 200, D, D), torch.float32, DEVICE, attn_mask=mask)


@pytest.mark.parametrize("window", [(5, 3), (0, 0), (16, -1), (-1, 7), (100, 100)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_sliding_window(variant_backend, window, causal, alignment):
    check_against_oracle(variant_backend, SHAPE, torch.float16, DEVICE, window=window, causal=causal,
                         causal_alignment=alignment)


# Window bounds that put a window's edge one key either side of a key tile's edge: 32 keys (the
# interpreter's tiles), 64 and 128 (the GPU's). There the kernels' tile skipping errs by one if it
# errs at all: the last visible tile skipped, or a partly visible one taken as whole (unmasked).
# (Interpreted, the bounds past 66 repeat those below them modulo 32, and cost a minute.)
EDGE_BOUNDS = [0, 1, 2, 30, 31, 32, 33, 34, 62, 63, 64, 65, 66] + ([] if INTERPRETED else [127, 128, 129])
EDGE_KEYS = 100 if INTERPRETED else 140


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape, alignment", [((1, 2, 1, EDGE_KEYS, EDGE_KEYS, 16, 16), "top_left"),
                                              ((1, 2, 1, EDGE_KEYS - 64, EDGE_KEYS, 16, 16), "bottom_right")],
                         ids=["square", "bottom-right"])
def test_window_edges_at_key_tile_edges(variant_backend, shape, alignment, side):
    """Forward and gradients for every bound of EDGE_BOUNDS on one side (the other unbounded); in
    the bottom-right case the diagonal's shift, 64, keeps the edges' residues."""
    for bound in EDGE_BOUNDS:
        window = (bound, -1) if side == "left" else (-1, bound)
        check_against_oracle(variant_backend, shape, torch.float32, DEVICE, window=window, causal_alignment=alignment)


def test_window_with_more_queries_than_keys(variant_backend):
    """Bottom-right windows with Lq > Lk leave early rows without keys."""
    check_against_oracle(variant_backend, (1, 2, 1, 90, 33, 64, 64), torch.float32, DEVICE, window=(4, 2),
                         causal_alignment="bottom_right")


@pytest.mark.parametrize("huge, bounded", [((sys.maxsize, 2 ** 70), (-1, -1)), ((2 ** 64, 0), (-1, 0)),
                                           ((3, LQ + LK), (3, -1))], ids=["both", "left", "right"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_window_bounds_past_every_key_are_unbounded(variant_backend, huge, bounded, alignment):
    """A bound of Lq + Lk or more reaches every key: the same call as -1 (sys.maxsize once overflowed
    the kernels' index arithmetic and hid every key)."""
    q, k, v = random_qkv(*SHAPE, torch.float32, DEVICE)
    for call in (fused_attn.attention, packed(fused_attn.varlen_attention)):
        out = call(q, k, v, window=huge, causal_alignment=alignment, backend=variant_backend)
        assert torch.equal(out, call(q, k, v, window=bounded, causal_alignment=alignment, backend=variant_backend))


def packed(varlen_attention):
    """varlen_attention called like attention on (B, H, L, D) tensors: each batch row one sequence."""
    def call(q, k, v, **keywords):
        def pack(t):
            return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])
        cu_q, cu_k = (torch.arange(0, (q.shape[0] + 1) * n, n, dtype=torch.int32, device=q.device)
                      for n in (q.shape[2], k.shape[2]))
        out = varlen_attention(pack(q), pack(k), pack(v), cu_q, cu_k, q.shape[2], k.shape[2], **keywords)
        return out.view(q.shape[0], q.shape[2], q.shape[1], -1).transpose(1, 2)
    return call


@pytest.mark.parametrize("slopes_shape", [(HQ,), (B, HQ)], ids=str)
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_alibi(variant_backend, slopes_shape, alignment):
    slopes = torch.rand(slopes_shape, device=DEVICE)
    check_against_oracle(variant_backend, SHAPE, torch.float16, DEVICE, alibi_slopes=slopes, causal_alignment=alignment)
    check_against_oracle(variant_backend, SHAPE, torch.float32, DEVICE, alibi_slopes=slopes, causal=True,
                         causal_alignment=alignment)


@pytest.mark.parametrize("softcap", [0.5, 30.0])
def test_softcap(variant_backend, softcap):
    check_against_oracle(variant_backend, SHAPE, torch.float16, DEVICE, softcap=softcap, causal=True, scale=0.8)


@pytest.mark.parametrize("softcap", [1e3, 1e6])
def test_large_softcap_is_as_exact_as_the_math(variant_backend, softcap):
    """softcap * tanh(s / softcap) ~ s for a large softcap: tanh must be exact relative to its small
    arguments, not only to ~1e-7 absolute (which, times 1e6, was an error of 0.1 in every score)."""
    check_against_oracle(variant_backend, SHAPE, torch.float32, DEVICE, softcap=softcap, scale=0.8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dropout_matches_reference_with_the_materialized_mask(variant_backend, dtype):
    check_against_oracle(variant_backend, SHAPE, dtype, DEVICE, dropout_p=0.3, causal=True)


def test_everything_at_once(variant_backend):
    bias = torch.randn(B, 1, LQ, LK, device=DEVICE, requires_grad=True)
    check_against_oracle(
        variant_backend, (B, HQ, 1, LQ, LK, 40, 24), torch.float16, DEVICE, sequence_major=True,
        attn_mask=bias, window=(20, 5), causal=True, causal_alignment="bottom_right",
        alibi_slopes=torch.rand(HQ, device=DEVICE), softcap=10.0, dropout_p=0.2,
    )


def run_with_dropout(backend, seed, p=0.25, dtype=torch.float32):
    torch.manual_seed(1234)  # the same inputs every call
    q, k, v = random_qkv(1, 2, 2, 50, 60, 32, 32, dtype, DEVICE, requires_grad=True)
    torch.manual_seed(seed)
    out = fused_attn.attention(q, k, v, dropout_p=p, backend=backend)
    out.backward(torch.ones_like(out))
    return out, q.grad, k.grad, v.grad


def test_dropout_is_reproducible_from_the_seed(variant_backend):
    first, second, other = (run_with_dropout(variant_backend, seed) for seed in (7, 7, 8))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_dropout_mask_is_the_same_in_every_backend(variant_backend):
    ours = run_with_dropout(variant_backend, 11)
    ref = run_with_dropout("reference", 11)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropout_keep_rate_and_unbiased_output(variant_backend):
    p = 0.3
    keep = fused_attn.dropout_keep_mask(4, 8, 256, 256, p, DEVICE)
    kept = keep.double().mean().item()
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(kept - (1 - p)) < 6 * sigma
    # With v = 1 every output element is sum_j p_ij keep_ij / (1 - p), whose expectation is 1.
    q, k, _ = random_qkv(2, 4, 4, 64, 256, 16, 16, torch.float32, DEVICE)
    out = fused_attn.attention(q, k, torch.ones_like(k), dropout_p=p, backend=variant_backend)
    assert abs(out.mean().item() - 1) < 0.02


def test_dropout_float64_gradcheck():
    q, k, v = random_qkv(1, 2, 1, 5, 7, 4, 3, torch.float64, DEVICE, requires_grad=True)

    def fn(q, k, v):
        torch.manual_seed(3)  # the same mask on every evaluation
        return fused_attn.attention(q, k, v, dropout_p=0.4, causal=True, backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_bias_gradient_float64_gradcheck():
    q, k, v = random_qkv(2, 2, 1, 5, 7, 4, 3, torch.float64, DEVICE, requires_grad=True)
    bias = torch.randn(2, 1, 5, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fn = lambda q, k, v, bias: fused_attn.attention(q, k, v, attn_mask=bias, softcap=2.0, window=(2, 1),  # noqa: E731
                                                    backend="reference")
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def qkv():
    return random_qkv(2, 4, 2, 8, 10, 16, 16, torch.float32, DEVICE)


@pytest.mark.parametrize("keywords, error, message", [
    (dict(attn_mask=torch.ones(3, 8, 10, dtype=torch.bool)), ValueError, r"attn_mask of shape \(3, 8, 10\) does not broadcast to \(B, Hq, Lq, Lk\) = \(2, 4, 8, 10\)"),
    (dict(attn_mask=torch.ones(8, 11)), ValueError, r"attn_mask of shape \(8, 11\) does not broadcast"),
    (dict(attn_mask=torch.ones(1, 1, 1, 2, 8, 10)), ValueError, r"does not broadcast"),
    (dict(attn_mask=torch.ones(8, 10, dtype=torch.int64)), TypeError, r"attn_mask must be bool, torch.float32 \(q's dtype\) or float32"),
    (dict(attn_mask=[[True]]), TypeError, r"attn_mask must be a torch.Tensor or None"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0.0, 1.0\), got 1.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0.0, 1.0\)"),
    (dict(window=(-2, 3)), ValueError, r"window bounds must be >= 0, or -1 for unbounded, got \(-2, 3\)"),
    (dict(window=(3,)), TypeError, r"window must be a pair of ints"),
    (dict(window=(1.5, 2)), TypeError, r"window must be a pair of ints"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(4,\) or \(2, 4\), got \(3,\)"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), TypeError, r"alibi_slopes must be float32"),
    (dict(alibi_slopes=torch.ones(4, requires_grad=True)), ValueError, r"alibi_slopes are not differentiated"),
    (dict(softcap=-1.0), ValueError, r"softcap must be in \[0.0, inf\)"),
    (dict(softcap=None), TypeError, r"softcap must be a number"),
], ids=lambda x: "" if not isinstance(x, str) else x[:30])
def test_bad_keywords(keywords, error, message):
    keywords = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in keywords.items()}
    with pytest.raises(error, match=message):
        fused_attn.attention(*qkv(), **keywords)
