"""Small timing suite for pytest-benchmark: reports timings, asserts nothing about speed.

    make bench-regression
    python -m pytest benchmarks/test_regression.py                       # report only
    python -m pytest benchmarks/test_regression.py --benchmark-autosave  # keep a record in .benchmarks/
    python -m pytest benchmarks/test_regression.py --benchmark-compare   # compare with the last record

`python -m pytest tests` (and `make test`) never collects this file: pyproject.toml sets
testpaths = ["tests"]. Shapes are small so the file runs in about a minute on a CPU (fused_attn's
automatic backend); on a machine with CUDA the same tests also run on the GPU. The tests only assert
that results are finite: timings are for people (and --benchmark-compare), never for pass/fail.
"""
from __future__ import annotations

import itertools

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fused_attn  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
B, H, L, D = 1, 4, 256, 64
N_SETS = 3


def _dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, device, fn):
    """Time fn (rotating its inputs itself) with a bounded number of rounds; return its last result."""
    result = {}

    def call():
        result["out"] = fn()
        _sync(device)

    call()  # warm-up: kernel compilation, thread pools
    rounds = 20 if device == "cuda" else 5
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    return result["out"]


def _sets(device, shape, grad):
    dtype = _dtype(device)
    return [tuple(torch.randn(shape, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
            + (torch.randn(shape, device=device, dtype=dtype),) for _ in range(N_SETS)]


def _assert_finite(*ts):
    for t in ts:
        assert t is not None and torch.isfinite(t.float()).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("provider", ["fused_attn", "sdpa"])
def test_attention_fwd(benchmark, device, causal, provider):
    cycle = itertools.cycle(_sets(device, (B, H, L, D), grad=False))
    attn = fused_attn.attention if provider == "fused_attn" else \
        (lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    def fn():
        q, k, v, _ = next(cycle)
        return attn(q, k, v, causal=causal)

    benchmark.extra_info.update(device=device, B=B, H=H, L=L, D=D)
    _assert_finite(_run(benchmark, device, fn))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("provider", ["fused_attn", "sdpa"])
def test_attention_fwd_bwd(benchmark, device, causal, provider):
    sets = _sets(device, (B, H, L, D), grad=True)
    cycle = itertools.cycle(sets)
    attn = fused_attn.attention if provider == "fused_attn" else \
        (lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    def fn():
        q, k, v, dout = next(cycle)
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v, causal=causal).backward(dout)
        return q.grad

    benchmark.extra_info.update(device=device, B=B, H=H, L=L, D=D)
    _assert_finite(_run(benchmark, device, fn))


@pytest.mark.parametrize("device", DEVICES)
def test_attention_bias_grad_fwd_bwd(benchmark, device):
    sets = _sets(device, (B, H, L, D), grad=True)
    bias = torch.randn((1, H, L, L), device=device, dtype=_dtype(device), requires_grad=True)
    cycle = itertools.cycle(sets)

    def fn():
        q, k, v, dout = next(cycle)
        for t in (q, k, v, bias):
            t.grad = None
        fused_attn.attention(q, k, v, attn_mask=bias).backward(dout)
        return bias.grad

    _assert_finite(_run(benchmark, device, fn))


def _packed(device, lengths, grad):
    total = sum(lengths)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)
    return cu, _sets(device, (total, H, D), grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_varlen(benchmark, device, pass_):
    lengths = [200, 137, 256, 171]
    cu, sets = _packed(device, lengths, grad=(pass_ == "fwd+bwd"))
    cycle = itertools.cycle(sets)
    Lmax = max(lengths)

    def fn():
        q, k, v, dout = next(cycle)
        if pass_ == "fwd":
            with torch.no_grad():
                return fused_attn.varlen_attention(q, k, v, cu, cu, Lmax, Lmax, causal=True)
        for t in (q, k, v):
            t.grad = None
        fused_attn.varlen_attention(q, k, v, cu, cu, Lmax, Lmax, causal=True).backward(dout)
        return q.grad

    _assert_finite(_run(benchmark, device, fn))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_decode(benchmark, device, paged):
    Bk, Hq, Hkv, Lc, page = 4, 8, 2, 1024, 128
    dtype = _dtype(device)
    caches = []
    for _ in range(N_SETS):
        q = torch.randn(Bk, 1, Hq, D, device=device, dtype=dtype)
        if paged:
            n = Bk * Lc // page
            kc = torch.randn(n, page, Hkv, D, device=device, dtype=dtype)
            vc = torch.randn_like(kc)
            table = torch.randperm(n, device=device).to(torch.int32).reshape(Bk, Lc // page)
        else:
            kc = torch.randn(Bk, Lc, Hkv, D, device=device, dtype=dtype)
            vc = torch.randn_like(kc)
            table = None
        caches.append((q, kc, vc, table))
    seqlens = torch.full((Bk,), Lc, dtype=torch.int32, device=device)
    cycle = itertools.cycle(caches)

    def fn():
        q, kc, vc, table = next(cycle)
        return fused_attn.attention_with_kvcache(q, kc, vc, seqlens, block_table=table)

    _assert_finite(_run(benchmark, device, fn))
