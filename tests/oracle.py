"""The test oracle: attention materialized in full, and the accuracy rule of the peers.

`naive_attention` builds the whole score matrix, which is exactly what the kernels avoid, so it
shares no code with them. Run in float64 it is the ground truth; run in the input dtype it tells
how much error the same math has in that precision (FACTS.md: flash-attn's rule).
"""
from __future__ import annotations

import math

import torch

from fused_attn.triton.common import INTERPRETING


def naive_attention(q, k, v, *, causal=False, bottom_right=False, scale=None, dtype=None):
    """(out, lse) computed with the full (Lq, Lk) matrix in `dtype` (default: the inputs')."""
    dtype = dtype or q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    seqlen_q, seqlen_k = scores.shape[-2:]
    if causal:
        offset = seqlen_k - seqlen_q if bottom_right else 0
        rows = torch.arange(seqlen_q, device=q.device)[:, None]
        cols = torch.arange(seqlen_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + offset, float("-inf"))
    visible_rows = (scores > float("-inf")).any(-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible_rows, 0.0)
    lse = torch.logsumexp(scores.float() if dtype != torch.float64 else scores, dim=-1)
    return torch.matmul(probs, v), lse


FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-10}


def assert_accurate(name, actual, exact, lowprec, dtype):
    """max|actual - exact| <= 2 * max|lowprec - exact| + floor, finite everywhere it should be.

    exact: the float64 result. lowprec: the same math in the input dtype. The floor scales with
    the result's magnitude. Triton's interpreter truncates fp32 -> bf16 casts instead of rounding,
    so there one bf16 ulp of the result is allowed on top (FACTS.md).
    """
    actual = actual.double()
    exact = exact.double()
    lowprec = lowprec.double()
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: non-finite values where the reference is finite (or the reverse)"
    assert torch.equal(actual[~finite], exact[~finite]), f"{name}: differs from the reference at its infinities"
    actual, exact, lowprec = actual[finite], exact[finite], lowprec[finite]
    if exact.numel() == 0:
        return
    magnitude = max(1.0, exact.abs().max().item())
    allowed = 2 * (lowprec - exact).abs().max().item() + FLOOR[dtype] * magnitude
    if INTERPRETING and dtype == torch.bfloat16:
        allowed += magnitude * 2.0**-7
    error = (actual - exact).abs().max().item()
    assert error <= allowed, f"{name}: max error {error:.3e} > allowed {allowed:.3e}"


def random_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v, dtype, device,
               sequence_major=False, requires_grad=False):
    """Fresh normal q, k, v; sequence_major gives transposed views of (B, L, H, D) tensors."""

    def make(heads, length, dim):
        if sequence_major:
            t = torch.randn(batch, length, heads, dim, dtype=dtype, device=device).transpose(1, 2)
        else:
            t = torch.randn(batch, heads, length, dim, dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    return (make(heads_q, seqlen_q, head_dim), make(heads_kv, seqlen_k, head_dim),
            make(heads_kv, seqlen_k, head_dim_v))
