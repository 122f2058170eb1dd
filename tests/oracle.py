"""The test oracle: attention materialized in full, and the accuracy rule of the peers.

`naive_attention` builds the whole score matrix, which is exactly what the kernels avoid, so it
shares no code with them. Run in float64 it is the ground truth; run in the input dtype it tells
how much error the same math has in that precision (FACTS.md: flash-attn's rule).
"""
from __future__ import annotations

import math

import torch

import fused_attn
from fused_attn.triton.common import INTERPRETING

# The documented float mask value at or below which a key is hidden as by -inf (README, attn_mask).
HIDING_BIAS = -2.0 ** 127


def naive_attention(q, k, v, *, causal=False, bottom_right=False, scale=None, attn_mask=None, window=(-1, -1),
                    alibi_slopes=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, dtype=None):
    """(out, lse) computed with the full (Lq, Lk) matrix in `dtype` (default: the inputs').

    Same keywords as fused_attn.attention, except dropout: `dropout_keep` is the materialized
    (B, Hq, Lq, Lk) keep-mask (fused_attn.dropout_keep_mask) applied with probability dropout_p.
    """
    dtype = dtype or q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    seqlen_q, seqlen_k = scores.shape[-2:]
    shift = seqlen_k - seqlen_q if bottom_right else 0
    rows = torch.arange(seqlen_q, device=q.device)[:, None]
    cols = torch.arange(seqlen_k, device=q.device)[None, :]
    distance = cols - rows - shift
    if alibi_slopes is not None:
        slopes = alibi_slopes.expand(q.shape[0], q.shape[1]).to(dtype)[:, :, None, None]
        scores = scores - slopes * distance.abs().to(dtype)
    hidden = torch.zeros_like(distance, dtype=torch.bool)
    left, right = window
    if causal:
        right = 0
    if left >= 0:
        hidden |= distance < -left
    if right >= 0:
        hidden |= distance > right
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        hidden = hidden | ~attn_mask
    elif attn_mask is not None:
        # -inf entries, and all at or below HIDING_BIAS (-2^127: torch.finfo(float32).min is one),
        # hide their pair like False does; adding them would also hide it, but a row that they
        # hide entirely would then send NaN (0 * exp(-inf + inf)) into the gradients.
        hiding = attn_mask <= HIDING_BIAS
        hidden = hidden | hiding
        scores = scores + attn_mask.to(dtype).masked_fill(hiding, 0.0)
    scores = scores.masked_fill(hidden, float("-inf"))
    visible_rows = (scores > float("-inf")).any(-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible_rows, 0.0)
    lse = torch.logsumexp(scores.float() if dtype != torch.float64 else scores, dim=-1)
    if dropout_keep is not None:
        probs = probs * dropout_keep.to(dtype) / (1 - dropout_p)
    return torch.matmul(probs, v), lse


# One unit of roundoff of the result's magnitude in the input dtype (flash-attn's tests use about
# twice that); fp32 and fp64 get a floor for accumulation-order noise.
FLOOR = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 1e-5, torch.float64: 1e-10}


def assert_accurate(name, actual, exact, lowprec, dtype, floor_scale=1.0, inherited=0.0):
    """max|actual - exact| <= 2 * max|lowprec - exact| + floor + inherited, finite everywhere it should be.

    exact: the float64 result. lowprec: the same math in the input dtype. The floor scales with
    the result's magnitude, times floor_scale for results that sum many terms (rounding of the
    terms walks like sqrt(count), and a sum that cancels is far smaller than its terms). Triton's
    interpreter truncates fp32 -> bf16 casts instead of rounding, so there one bf16 ulp of the
    result is allowed on top (FACTS.md). inherited: the error a gradient inherits, exactly, from
    the stored output (check_against_oracle's delta term).
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
    allowed = 2 * (lowprec - exact).abs().max().item() + FLOOR[dtype] * magnitude * floor_scale + inherited
    if INTERPRETING and dtype == torch.bfloat16:
        allowed += magnitude * 2.0**-7
    error = (actual - exact).abs().max().item()
    assert error <= allowed, f"{name}: max error {error:.3e} > allowed {allowed:.3e}"


def delta_error(dout, out, exact_out):
    """The error of the backward's delta = rowsum(dO * O), which reads the output as stored (rounded
    to the input dtype, as every flash kernel's backward does) where the references' softmax backward
    never reads O: e = rowsum(dO * (O_stored - O_exact)), float64, one per row. It enters
    dS = P (dP - delta) + P dlse as dlse - e would, so the exact gradients for dlse - e, less the
    exact ones, are what dq, dk and dbias inherit from it (large next to the math's own rounding
    where dq is small: a row that sees one key has dS = dP - delta = rounding alone, more so under
    dropout's 1 / (1 - p) scaling of O)."""
    return (dout.double() * (out.detach().double() - exact_out.detach().double())).sum(-1)


def largest_difference(a, b) -> float:
    """max|a - b| in float64, 0 for empty tensors."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


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


def check_against_oracle(backend, shape, dtype, device, sequence_major=False, **keywords):
    """fused_attn.attention(**keywords) vs float64 math: out, lse, dq, dk, dv and a learnable bias's grad.

    The loss uses lse too, so its gradient path is checked. With dropout, the keep-mask the call
    drew is materialized by replaying torch's generator.
    """
    q, k, v = random_qkv(*shape, dtype=dtype, device=device, sequence_major=sequence_major, requires_grad=True)
    leaves = [q, k, v]
    mask = keywords.get("attn_mask")
    if mask is not None and mask.requires_grad:
        leaves.append(mask)
    generator_state = torch.random.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state()
    out, lse = fused_attn.attention(q, k, v, return_lse=True, backend=backend, **keywords)
    dropout_p = keywords.get("dropout_p", 0.0)
    keep = None
    if dropout_p > 0:
        if device.type == "cpu":
            torch.random.set_rng_state(generator_state)
        else:
            torch.cuda.set_rng_state(generator_state)
        keep = fused_attn.dropout_keep_mask(shape[0], shape[1], shape[3], shape[4], dropout_p, device)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)

    def loss(o, l, dl=dlse):
        return (o.double() * dout.double()).sum() + torch.where(torch.isfinite(l), l.double() * dl.double(), 0).sum()

    grads = torch.autograd.grad(loss(out, lse), leaves)

    naive_keywords = dict(
        causal=keywords.get("causal", False), bottom_right=keywords.get("causal_alignment") == "bottom_right",
        scale=keywords.get("scale"), window=keywords.get("window", (-1, -1)), softcap=keywords.get("softcap", 0.0),
        alibi_slopes=keywords.get("alibi_slopes"), dropout_keep=keep, dropout_p=dropout_p,
    )
    def reference(precision, dl=dlse):
        ref_leaves = [t.detach().to(precision if t.dtype != torch.bool else t.dtype).requires_grad_() for t in leaves]
        ref_mask = ref_leaves[3] if len(leaves) > 3 else mask
        ref_out, ref_lse = naive_attention(*ref_leaves[:3], attn_mask=ref_mask, dtype=precision, **naive_keywords)
        return ref_out, ref_lse, torch.autograd.grad(loss(ref_out, ref_lse, dl), ref_leaves)

    exact_out, exact_lse, exact_grads = reference(torch.float64)
    low_out, low_lse, low_grads = reference(dtype)
    # What dq, dk and dbias inherit from delta reading the stored output (delta_error).
    inherited_grads = reference(torch.float64, dlse.double() - delta_error(dout, out, exact_out))[2]

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_accurate("out", out, exact_out, low_out, dtype)
    assert_accurate("lse", lse, exact_lse, low_lse.to(torch.float32), torch.float32)
    # Gradients that sum many terms get the floor times sqrt(terms): dbias over its broadcast dims;
    # in fp32, whose floor stands for accumulation-order noise, also dq over the keys and dk over the
    # query rows of a group. (It shows where a row sees one key: dS = dP - delta is then rounding
    # noise, summed over the rows into dk, while the fp32 reference's softmax backward gives 0.)
    batch, heads_q, seqlen_q, seqlen_k = out.shape[0], out.shape[1], out.shape[2], k.shape[2]
    summed = {}
    if dtype == torch.float32:
        summed = {0: math.sqrt(max(seqlen_k, 1)), 1: math.sqrt(max(seqlen_q * heads_q // k.shape[1], 1))}
    if len(leaves) > 3:
        summed[3] = math.sqrt(batch * heads_q * seqlen_q * seqlen_k / mask.numel())
    for index, (name, grad, exact, low, leaf, inherited) in enumerate(zip(
            ("dq", "dk", "dv", "dbias"), grads, exact_grads, low_grads, leaves, inherited_grads)):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, f"{name}: {grad.dtype} {tuple(grad.shape)}"
        assert_accurate(name, grad, exact, low, dtype, floor_scale=summed.get(index, 1.0),
                        inherited=largest_difference(inherited, exact))


def tile_sparse_mask(batch, heads, seqlen_q, seqlen_k, device="cpu"):
    """A bool mask that hides whole 64 x 64 tiles, which the kernels skip, and cuts others:
    per-batch key padding (batch 0 sees 37 keys: every later key block is hidden), head 1 seeing
    nothing at all, heads h >= 2 each missing their own key block [64 (h - 2), 64 (h - 1)) (the
    first one for head 2) and a pattern of 40 x 50 blocks, and a few random holes."""
    mask = torch.rand(batch, heads, seqlen_q, seqlen_k, device=device) > 0.05
    mask[0, :, :, 37:] = False
    mask[:, 1] = False
    rows = torch.arange(seqlen_q, device=device)[:, None] // 40
    cols = torch.arange(seqlen_k, device=device)[None] // 50
    for h in range(2, heads):
        mask[:, h, :, 64 * (h - 2):64 * (h - 1)] = False
        mask[:, h] &= (rows + cols + h) % 5 != 0
    return mask


def corner_mask(batch, heads, seqlen_q, seqlen_k, device="cpu"):
    """A bool mask under which tiles of 32 or 64 query rows x 32 or 64 keys are hidden but for
    one visible pair, at each of a tile's corners (the first or last row, the first or last key,
    the last key of a ragged last block): a kernel that judged a tile by all but its last row
    or key would skip a tile it must compute. Needs seqlen_q >= 70 and seqlen_k >= 200."""
    mask = torch.zeros(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    for row, key in ((0, 127), (63, 128), (63, 191), (64, seqlen_k - 1), (seqlen_q - 1, 0), (31, 63), (32, 64),
                     (5, 95), (40, 160)):
        mask[:, :, row, key] = True
    return mask
