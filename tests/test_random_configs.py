"""Random combinations of the keywords, shapes and layouts, against float64 math.

The other files check each feature on a matrix chosen by hand. This one draws configurations that
no one chose: GQA with a window and a broadcast bias in bf16, a padding mask with ALiBi and dropout
on sequence-major views, lengths that cross block boundaries anywhere; packed batches with empty
sequences and rows past the last one; KV caches, contiguous or paged with odd page sizes, with new
tokens, full or empty. A fresh seed each run (printed with a failure, as `torch.manual_seed(...)`)
draws both the configuration and the inputs, and the failure message names the configuration.
Dense calls are checked against oracle.py's float64 math; packed and KV-cache calls against the
`reference` backend in float64 (itself checked against that math, sequence by sequence, in
tests/test_varlen.py and tests/test_kvcache.py), with its input-dtype run setting the tolerance.
"""
import math
import random

import pytest
import torch

from conftest import DEVICE
from oracle import assert_accurate, check_against_oracle, delta_error, largest_difference

import fused_attn

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Longest sequences drawn: the interpreter runs every program of a Triton kernel in Python.
MAX_LENGTH = {"triton": 160} if DEVICE.type == "cpu" else {}


def draw_mask(rng: random.Random, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dtype: torch.dtype):
    """None, a bool mask (key padding runs, or scattered flags) or a float bias (learnable or not),
    each of a shape broadcastable to (B, Hq, Lq, Lk)."""
    shape = [rng.choice([1, batch]), rng.choice([1, heads]), rng.choice([1, seqlen_q]), rng.choice([1, seqlen_k])]
    kind = rng.choice(["none", "none", "padding", "flags", "bias"])
    if kind == "padding":
        lengths = torch.randint(0, seqlen_k + 1, (shape[0], 1, 1, 1), device=DEVICE)
        return (torch.arange(seqlen_k, device=DEVICE) < lengths).expand(shape[0], shape[1], 1, seqlen_k).clone()
    if kind == "flags":
        return torch.rand(*shape, device=DEVICE) < rng.uniform(0.05, 0.95)
    if kind == "bias":
        bias = torch.randn(*shape, dtype=rng.choice([torch.float32, dtype]), device=DEVICE)
        return bias.requires_grad_(rng.random() < 0.6)
    return None


def draw_keywords(rng: random.Random, batch: int, heads_q: int, longest: int, alignments=("top_left", "bottom_right")):
    """Keywords every entry point takes: alignment, causal, window (bounds up to `longest`),
    softcap, ALiBi (per head or per sequence), scale."""
    keywords = {"causal_alignment": rng.choice(alignments)}
    if rng.random() < 0.4:
        keywords["causal"] = True
    if rng.random() < 0.35:
        keywords["window"] = (rng.choice([-1, rng.randint(0, longest)]), rng.choice([-1, rng.randint(0, longest)]))
    if rng.random() < 0.2:
        keywords["softcap"] = rng.uniform(2.0, 30.0)
    if rng.random() < 0.2:
        keywords["alibi_slopes"] = torch.rand(*rng.choice([(heads_q,), (batch, heads_q)]), device=DEVICE)
    if rng.random() < 0.15:
        # Zero and negative scales are legal too: then the largest raw score is not the largest scaled one.
        keywords["scale"] = rng.choice([rng.uniform(0.05, 0.5), rng.uniform(0.05, 0.5), -rng.uniform(0.05, 0.5), 0.0])
    return keywords


def draw_config(rng: random.Random, max_length: int) -> tuple[tuple, torch.dtype, bool, dict]:
    """(shape (B, Hq, Hkv, Lq, Lk, D, Dv), dtype, sequence-major, keywords of fused_attn.attention)."""
    batch, heads_kv = rng.choice([1, 2]), rng.choice([1, 2])
    heads_q = heads_kv * rng.choice([1, 2, 3])
    longest = max_length if rng.random() < 0.5 else 40
    seqlen_q, seqlen_k = rng.randint(1, longest), rng.randint(1, longest)
    head_dim = rng.choice([8, 24, 32, 64, 64, 96, 128])
    head_dim_v = rng.choice([head_dim, head_dim, 16, 80])
    dtype = rng.choice(DTYPES)
    keywords = draw_keywords(rng, batch, heads_q, max_length)
    if rng.random() < 0.15:
        keywords["dropout_p"] = rng.uniform(0.05, 0.4)
    mask = draw_mask(rng, batch, heads_q, seqlen_q, seqlen_k, dtype)
    if mask is not None:
        keywords["attn_mask"] = mask
    shape = (batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v)
    return shape, dtype, rng.random() < 0.3, keywords


def describe(**parts) -> str:
    """A drawn configuration as a failure message names it: tensors by dtype and shape."""
    def value(v):
        if isinstance(v, torch.Tensor):
            return f"{v.dtype} {tuple(v.shape)}" + (" learnable" if v.requires_grad else "")
        return f"{v:.3g}" if isinstance(v, float) else repr(v)

    return ", ".join(f"{key}={value(v)}" for key, v in parts.items())


@pytest.mark.parametrize("draw", range(6))
def test_random_configuration_matches_float64_math(variant_backend, draw, fresh_seed):
    rng = random.Random(fresh_seed * 8 + draw)
    shape, dtype, sequence_major, keywords = draw_config(rng, MAX_LENGTH.get(variant_backend, 300))
    try:
        check_against_oracle(variant_backend, shape, dtype, DEVICE, sequence_major=sequence_major, **keywords)
    except AssertionError as error:
        context = describe(**{"(B, Hq, Hkv, Lq, Lk, D, Dv)": shape}, dtype=dtype, sequence_major=sequence_major,
                           **keywords)
        raise AssertionError(f"{context}: {error}") from error


@pytest.mark.parametrize("draw", range(4))
def test_random_packed_batch_matches_float64_math(varlen_backend, draw, fresh_seed):
    """varlen_attention on a random packed batch: sequences of any length, empty ones included,
    rows past the last sequence, max_seqlen above the longest, dropout: out, lse, dq, dk, dv."""
    rng = random.Random(fresh_seed * 8 + draw)
    longest = min(MAX_LENGTH.get(varlen_backend, 300) // 2, 100)
    batch, heads_kv = rng.randint(1, 4), rng.choice([1, 2])
    heads_q = heads_kv * rng.choice([1, 2, 3])
    head_dim = rng.choice([8, 16, 32, 64, 80, 128])
    head_dim_v = rng.choice([head_dim, head_dim, 16, 64])
    lengths_q = [rng.choice([0, 1, rng.randint(1, longest)]) for _ in range(batch)]
    lengths_k = list(lengths_q) if rng.random() < 0.4 else [rng.choice([0, 1, rng.randint(1, longest)])
                                                              for _ in range(batch)]
    keywords = draw_keywords(rng, batch, heads_q, longest)
    if rng.random() < 0.15:
        keywords["dropout_p"] = rng.uniform(0.05, 0.4)
    dtype = rng.choice(DTYPES)
    unused_q, unused_k, slack = rng.choice([0, 0, 3]), rng.choice([0, 0, 2]), rng.choice([0, 0, 5])
    q = torch.randn(sum(lengths_q) + unused_q, heads_q, head_dim, device=DEVICE)
    k = torch.randn(sum(lengths_k) + unused_k, heads_kv, head_dim, device=DEVICE)
    v = torch.randn(k.shape[0], heads_kv, head_dim_v, device=DEVICE)
    dout = torch.randn(q.shape[0], heads_q, head_dim_v, device=DEVICE)
    dlse = torch.randn(heads_q, q.shape[0], device=DEVICE)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
                  for n in (lengths_q, lengths_k))
    max_q, max_k = max(lengths_q) + slack, max(lengths_k) + slack
    seed = rng.randrange(2**31)

    def run(backend, precision, dl=dlse):
        leaves = [t.to(precision).requires_grad_() for t in (q, k, v)]
        torch.manual_seed(seed)  # the same dropout mask in every run
        out, lse = fused_attn.varlen_attention(*leaves, cu_q, cu_k, max_q, max_k, return_lse=True, backend=backend,
                                               **keywords)
        loss = (out.double() * dout.double()).sum() + torch.where(torch.isfinite(lse), lse.double() * dl, 0).sum()
        return (out, lse, *torch.autograd.grad(loss, leaves))

    got, exact, low = run(varlen_backend, dtype), run("reference", torch.float64), run("reference", dtype)
    # What dq and dk inherit, exactly, from delta reading the stored output (oracle.delta_error):
    # sequences of one key are frequent here, where dS = dP - delta is that error alone.
    errors = delta_error(dout, got[0], exact[0]).T  # (Hq, total_q), as dlse
    inherited = dict(zip(("dq", "dk"), run("reference", torch.float64, dlse - errors)[2:4]))
    # dk sums roundoff over the rows (dq over the keys), a random walk: sqrt(terms) in every dtype
    # (oracle.check_against_oracle widens fp32 alone, where one-key rows are rare).
    summed = {"dq": math.sqrt(max(max_k, 1)), "dk": math.sqrt(max(max_q * heads_q // heads_kv, 1))}
    context = describe(lengths_q=lengths_q, lengths_k=lengths_k, unused=(unused_q, unused_k), slack=slack,
                       heads=(heads_q, heads_kv), dims=(head_dim, head_dim_v), dtype=dtype, **keywords)
    try:
        for name, actual, expected, lowprec in zip(("out", "lse", "dq", "dk", "dv"), got, exact, low):
            floor_scale = summed.get(name, 1.0)
            inherited_error = largest_difference(inherited[name], expected) if name in inherited else 0.0
            assert_accurate(name, actual, expected, lowprec, dtype if name != "lse" else torch.float32, floor_scale,
                            inherited_error)
    except AssertionError as error:
        raise AssertionError(f"{context}: {error}") from error


@pytest.mark.parametrize("draw", range(4))
def test_random_kvcache_step_matches_float64_math(kvcache_backend, draw, fresh_seed):
    """attention_with_kvcache on a random cache: contiguous or paged (page sizes from 1), lengths
    from empty to full, new tokens or none, one query or many: out, lse, and the caches after the
    new tokens are written (bit for bit the reference's)."""
    rng = random.Random(fresh_seed * 8 + draw)
    batch, heads_kv = rng.randint(1, 3), rng.choice([1, 2])
    heads_q = heads_kv * rng.choice([1, 2, 4, 8])
    head_dim = rng.choice([16, 32, 64, 80, 128])
    head_dim_v = rng.choice([head_dim, head_dim, 32, 64])
    capacity = rng.randint(1, 300 if DEVICE.type == "cuda" or kvcache_backend != "triton" else 120)
    new_tokens = min(rng.choice([0, 0, 1, 1, 2, 5]), capacity)
    seqlen_q = rng.choice([1, 1, 2, 4, 7, 20, 70])
    lengths = [capacity - new_tokens if rng.random() < 0.2 else rng.randint(0, capacity - new_tokens)
               for _ in range(batch)]
    keywords = draw_keywords(rng, batch, heads_q, capacity, alignments=("bottom_right",))
    dtype = rng.choice(DTYPES)
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device=DEVICE)
    k_cache = torch.randn(batch, capacity, heads_kv, head_dim, device=DEVICE)
    v_cache = torch.randn(batch, capacity, heads_kv, head_dim_v, device=DEVICE)
    table, page_size = None, None
    if rng.random() < 0.5:  # the same keys on shuffled pages of a pool with spare pages
        page_size = rng.choice([1, 3, 8, 16, 64])
        per_sequence = -(-capacity // page_size)
        pool = batch * per_sequence + 2
        table = torch.randperm(pool, device=DEVICE)[:batch * per_sequence].view(batch, per_sequence).to(torch.int32)
        padded = per_sequence * page_size - capacity
        k_cache, v_cache = (torch.randn(pool, page_size, heads_kv, t.shape[-1], device=DEVICE).index_copy_(
            0, table.flatten().long(), torch.nn.functional.pad(t, (0, 0, 0, 0, 0, padded)).view(
                batch * per_sequence, page_size, heads_kv, t.shape[-1])) for t in (k_cache, v_cache))
    new = {}
    if new_tokens:
        new = {"k": torch.randn(batch, new_tokens, heads_kv, head_dim, device=DEVICE),
               "v": torch.randn(batch, new_tokens, heads_kv, head_dim_v, device=DEVICE)}
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)

    def run(backend, precision):
        caches = [t.to(precision, copy=True) for t in (k_cache, v_cache)]  # each run writes its own
        out, lse = fused_attn.attention_with_kvcache(q.to(precision), *caches, cache_seqlens, block_table=table,
                                                     return_lse=True, backend=backend,
                                                     **{key: t.to(precision) for key, t in new.items()}, **keywords)
        return out, lse, *caches

    got, exact, low = run(kvcache_backend, dtype), run("reference", torch.float64), run("reference", dtype)
    context = describe(lengths=lengths, capacity=capacity, page_size=page_size, new_tokens=new_tokens,
                       seqlen_q=seqlen_q, heads=(heads_q, heads_kv), dims=(head_dim, head_dim_v), dtype=dtype,
                       **keywords)
    try:
        assert_accurate("out", got[0], exact[0], low[0], dtype)
        assert_accurate("lse", got[1], exact[1], low[1], torch.float32)
        assert torch.equal(got[2], low[2]) and torch.equal(got[3], low[3]), "the caches differ after the new tokens"
    except AssertionError as error:
        raise AssertionError(f"{context}: {error}") from error
