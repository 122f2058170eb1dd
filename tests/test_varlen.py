"""Packed variable-length batches against float64 math run sequence by sequence."""
import pytest
import torch

from conftest import DEVICE, VARLEN_BACKENDS
from oracle import assert_accurate, naive_attention

import fused_attn

HQ, HKV, D, DV = 4, 2, 32, 24
# Sequence lengths chosen for their bug classes: empty queries, single row, Lq > Lk, Lq < Lk, a
# multi-block one, queries without keys.
LENGTHS_Q = [5, 1, 0, 40, 33, 70, 6]
LENGTHS_K = [9, 1, 7, 40, 20, 3, 0]


def cumulative(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def packed_inputs(dtype):
    q = torch.randn(sum(LENGTHS_Q), HQ, D, dtype=dtype, device=DEVICE, requires_grad=True)
    k = torch.randn(sum(LENGTHS_K), HKV, D, dtype=dtype, device=DEVICE, requires_grad=True)
    v = torch.randn(sum(LENGTHS_K), HKV, DV, dtype=dtype, device=DEVICE, requires_grad=True)
    return q, k, v


def as_batch(t):
    return t.transpose(0, 1).unsqueeze(0)


def check_varlen(varlen_backend, dtype, **keywords):
    q, k, v = packed_inputs(dtype)
    cu_q, cu_k = cumulative(LENGTHS_Q), cumulative(LENGTHS_K)
    state = torch.random.get_rng_state() if DEVICE.type == "cpu" else torch.cuda.get_rng_state()
    out, lse = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, max(LENGTHS_Q), max(LENGTHS_K), return_lse=True,
                                           backend=varlen_backend, **keywords)
    assert out.shape == (q.shape[0], HQ, DV) and lse.shape == (HQ, q.shape[0])
    dropout_p = keywords.pop("dropout_p", 0.0)
    keep = None
    if dropout_p:
        (torch.random.set_rng_state if DEVICE.type == "cpu" else torch.cuda.set_rng_state)(state)
        keep = fused_attn.dropout_keep_mask(len(LENGTHS_Q), HQ, max(LENGTHS_Q), max(LENGTHS_K), dropout_p, DEVICE)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)

    def loss(o, l):
        return (o.double() * dout.double()).sum() + torch.where(torch.isfinite(l), l.double() * dlse.double(), 0).sum()

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))

    slopes = keywords.pop("alibi_slopes", None)
    naive_keywords = dict(causal=keywords.get("causal", False), window=keywords.get("window", (-1, -1)),
                          bottom_right=keywords.get("causal_alignment") == "bottom_right",
                          softcap=keywords.get("softcap", 0.0), dropout_p=dropout_p)
    references = {}
    for precision in (torch.float64, dtype):
        leaves = [t.detach().to(precision).requires_grad_() for t in (q, k, v)]
        ref_out = torch.zeros(out.shape, dtype=precision, device=DEVICE)
        ref_lse = torch.full(lse.shape, float("-inf"), dtype=torch.float64 if precision == torch.float64 else torch.float32,
                             device=DEVICE)
        for b, (lq, lk) in enumerate(zip(LENGTHS_Q, LENGTHS_K)):
            rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            if lq == 0 or lk == 0:
                continue
            seq_slopes = None if slopes is None else slopes.expand(len(LENGTHS_Q), HQ)[b:b + 1]
            seq_keep = None if keep is None else keep[b:b + 1, :, :lq, :lk]
            o, l = naive_attention(as_batch(leaves[0][rows]), as_batch(leaves[1][keys]), as_batch(leaves[2][keys]),
                                   alibi_slopes=seq_slopes, dropout_keep=seq_keep, dtype=precision, **naive_keywords)
            ref_out[rows] = o[0].transpose(0, 1)
            ref_lse[:, rows] = l[0]
        references[precision] = (ref_out, ref_lse, torch.autograd.grad(loss(ref_out, ref_lse), leaves,
                                                                        allow_unused=True, materialize_grads=True))
    (exact_out, exact_lse, exact_grads), (low_out, low_lse, low_grads) = references[torch.float64], references[dtype]
    assert_accurate("out", out, exact_out, low_out, dtype)
    assert_accurate("lse", lse, exact_lse, low_lse, torch.float32)
    for name, grad, exact, low in zip(("dq", "dk", "dv"), grads, exact_grads, low_grads):
        assert_accurate(name, grad, exact, low, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("keywords", [
    pytest.param(dict(), id="full"),
    pytest.param(dict(causal=True), id="causal-top-left"),
    pytest.param(dict(causal=True, causal_alignment="bottom_right"), id="causal-bottom-right"),
    pytest.param(dict(window=(4, 2), causal_alignment="bottom_right", softcap=5.0), id="window-softcap"),
])
def test_varlen_matches_per_sequence_reference(varlen_backend, dtype, keywords):
    check_varlen(varlen_backend, dtype, **keywords)


def test_varlen_alibi_per_sequence_slopes(varlen_backend):
    check_varlen(varlen_backend, torch.float32, causal=True, alibi_slopes=torch.rand(len(LENGTHS_Q), HQ, device=DEVICE))


def test_varlen_dropout(varlen_backend):
    check_varlen(varlen_backend, torch.float32, dropout_p=0.25, causal=True)


def test_varlen_compiles(varlen_backend):
    q, k, v = packed_inputs(torch.float32)
    cu_q, cu_k = cumulative(LENGTHS_Q), cumulative(LENGTHS_K)
    fn = lambda q, k, v: fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 70, 40, causal=True, backend=varlen_backend)  # noqa: E731
    torch._dynamo.reset()
    eager = torch.autograd.grad(fn(q, k, v).square().sum(), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(fn, fullgraph=True)(q, k, v).square().sum(), (q, k, v))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_varlen_opcheck(varlen_backend):
    q, k, v = packed_inputs(torch.float32)
    args = (q, k, v, None, None, None, cumulative(LENGTHS_Q), cumulative(LENGTHS_K),
            0.2, True, True, -1, -1, 0.0, 0.0, False, max(LENGTHS_Q), max(LENGTHS_K), varlen_backend)
    torch.library.opcheck(torch.ops.fused_attn.forward.default, args)


@pytest.mark.parametrize("change, error, message", [
    (dict(cu_seqlens_q=lambda c: c.long()), TypeError, r"cu_seqlens_q must be int32, got torch.int64"),
    (dict(cu_seqlens_k=lambda c: c[:-1]), ValueError, r"cu_seqlens_k must have 8 entries like cu_seqlens_q"),
    (dict(cu_seqlens_q=lambda c: c.flip(0)), ValueError, r"cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=lambda c: torch.cat([c[:2], c[1:2] - 1, c[3:]])), ValueError, r"must be non-decreasing"),
    (dict(cu_seqlens_k=lambda c: c + torch.arange(8, dtype=torch.int32, device=c.device)), ValueError,
     r"cu_seqlens_k ends at 87, past the 80 packed tokens"),
    (dict(cu_seqlens_q=lambda c: c[None]), ValueError, r"cu_seqlens_q must have shape \(batch \+ 1,\)"),
    (dict(max_seqlen_q=lambda m: 69), ValueError, r"max_seqlen_q \(69\) is shorter than the longest sequence \(70\)"),
    (dict(max_seqlen_k=lambda m: 4.0), TypeError, r"max_seqlen_k must be an int"),
    (dict(max_seqlen_q=lambda m: -1), ValueError, r"max_seqlen_q must be >= 0, got -1"),
    (dict(q=lambda q: q[None]), ValueError, r"q must have 3 dimensions \(total_tokens, heads, head_dim\)"),
    (dict(k=lambda k: k[:, :1].expand(-1, 3, -1)), ValueError, r"k and v must have the same number of heads"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_varlen_bad_input(change, error, message):
    q, k, v = packed_inputs(torch.float32)
    arguments = dict(q=q, k=k, v=v, cu_seqlens_q=cumulative(LENGTHS_Q), cu_seqlens_k=cumulative(LENGTHS_K),
                     max_seqlen_q=max(LENGTHS_Q), max_seqlen_k=max(LENGTHS_K))
    for name, edit in change.items():
        arguments[name] = edit(arguments[name])
    with pytest.raises(error, match=message):
        fused_attn.varlen_attention(**arguments)


def test_varlen_rows_after_the_last_sequence(varlen_backend):
    """Packed tensors may be longer than cu_seqlens[-1] (a preallocated buffer): those rows belong
    to no sequence and come back as an empty sequence's (out 0, lse -inf, zero gradients), not as
    whatever memory the outputs were allocated from."""
    extra_q, extra_k = 3, 2
    q, k, v = (torch.randn(t.shape[0] + extra, *t.shape[1:], device=DEVICE, requires_grad=True)
               for t, extra in zip(packed_inputs(torch.float32), (extra_q, extra_k, extra_k)))
    cu_q, cu_k = cumulative(LENGTHS_Q), cumulative(LENGTHS_K)
    out, lse = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, max(LENGTHS_Q), max(LENGTHS_K), causal=True,
                                           return_lse=True, backend=varlen_backend)
    dq, dk, dv = torch.autograd.grad((out * torch.randn_like(out)).sum() + lse[:, :-extra_q].sum(), (q, k, v))
    assert torch.equal(out[-extra_q:], torch.zeros_like(out[-extra_q:]))
    assert torch.equal(lse[:, -extra_q:], torch.full_like(lse[:, -extra_q:], float("-inf")))
    for grad, extra in ((dq, extra_q), (dk, extra_k), (dv, extra_k)):
        assert torch.equal(grad[-extra:], torch.zeros_like(grad[-extra:]))
    # The rows inside the sequences are the ones of the exact-length call.
    exact = fused_attn.varlen_attention(q[:-extra_q], k[:-extra_k], v[:-extra_k], cu_q, cu_k, max(LENGTHS_Q),
                                        max(LENGTHS_K), causal=True, backend=varlen_backend)
    torch.testing.assert_close(out[:-extra_q], exact, rtol=0, atol=0)


VARLEN_GPU_BACKENDS = ("triton", "cuda")  # the backends a CUDA graph can capture, where nothing is checked


@pytest.mark.parametrize("backend", [name for name in VARLEN_GPU_BACKENDS if name in VARLEN_BACKENDS])
def test_unchecked_boundaries_stay_inside_the_tensors(monkeypatch, backend):
    """Where the host checks are skipped (a CUDA graph captured, torch.compile, FUSED_ATTN_HOST_CHECKS=0)
    the kernels clamp the boundaries they read into the packed tensors: a boundary below 0, one
    that decreases and an end past the tensors are never followed outside them (the interpreter's
    bounds checks and the sanitized emulator would say); and the call, judging them on the device,
    gives NaN out, lse and gradients rather than the clamped sequences' rows. Valid boundaries
    unchecked give the checked call's bits."""
    from fused_attn import host_checks

    q, k, v = packed_inputs(torch.float32)
    cu_q, cu_k = cumulative(LENGTHS_Q), cumulative(LENGTHS_K)
    checked = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, max(LENGTHS_Q), max(LENGTHS_K), causal=True,
                                          backend=backend)
    monkeypatch.setattr(host_checks, "skipped", lambda device: True)
    unchecked = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, max(LENGTHS_Q), max(LENGTHS_K), causal=True,
                                            backend=backend)
    assert torch.equal(unchecked, checked)

    total_q, total_k = q.shape[0], k.shape[0]
    invalid = {
        "below 0, decreasing, past the end": ([0, -4, 5, total_q + 30], [0, -1, 9, total_k + 50], total_q, total_k),
        "longer than max_seqlen": (cumulative(LENGTHS_Q).tolist(), cumulative(LENGTHS_K).tolist(),
                                   max(LENGTHS_Q) - 1, max(LENGTHS_K)),
        "not starting at 0": ([2] + cumulative(LENGTHS_Q).tolist()[1:], cumulative(LENGTHS_K).tolist(),
                              max(LENGTHS_Q), max(LENGTHS_K)),
    }
    for bounds_q, bounds_k, max_q, max_k in invalid.values():
        cu_q = torch.tensor(bounds_q, dtype=torch.int32, device=DEVICE)
        cu_k = torch.tensor(bounds_k, dtype=torch.int32, device=DEVICE)
        out, lse = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, return_lse=True,
                                               backend=backend)
        grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
        assert out.isnan().all() and lse.isnan().all()
        assert all(grad.isnan().any() for grad in grads)


def test_generous_max_seqlen(varlen_backend):
    """max_seqlen may be any bound at least the longest sequence (flash-attn's callers often pass
    the model's context length): the same result as the exact longest, forward and backward."""
    q, k, v = packed_inputs(torch.float32)
    cu_q, cu_k = cumulative(LENGTHS_Q), cumulative(LENGTHS_K)
    dout = torch.randn(q.shape[0], HQ, DV, device=DEVICE)
    results = []
    for max_q, max_k in ((max(LENGTHS_Q), max(LENGTHS_K)), (4096, 100_000)):
        out = fused_attn.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, backend=varlen_backend)
        results.append((out, *torch.autograd.grad((out * dout).sum(), (q, k, v))))
    for exact, generous in zip(*results):
        torch.testing.assert_close(generous, exact, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.0, -0.37])
def test_zero_scale_with_softcap_gives_finite_gradients(varlen_backend, scale):
    """A zero scale with a softcap, causal, packed sequences of 42, 1, 0 and 1 tokens (a fuzzed case
    of the cpu backend): 0 * q.k had been NaN where a banded product leaves -inf for keys past the
    diagonal, and the softcap's tanh kept for the backward carried it into dq (0 * NaN). Against
    the reference backend, forward and gradients."""
    lengths = [42, 1, 0, 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    total = sum(lengths)
    results = []
    q, k, v = (torch.randn(total, heads, dim, device=DEVICE) for heads, dim in ((6, 80), (2, 80), (2, 16)))
    dout = torch.randn(total, 6, 16, device=DEVICE)
    for backend in (varlen_backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fused_attn.varlen_attention(*leaves, cu, cu, 42, 42, causal=True, softcap=26.4, scale=scale,
                                          backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
    for name, got, expected in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)
