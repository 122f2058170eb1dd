"""What is specific to the C++ backend: it is built and loaded, its two builds (portable and
AVX2) agree, thread count never changes a bit, the backward schedules agree, longer sequences
match the reference backend, and its op errors are clear."""

import pytest
import torch

from oracle import random_qkv

import fused_attn
from fused_attn.backends import cpu_backend

# These tests use CPU tensors on every machine: the extension is built on GPU machines too.


def test_extension_is_built_and_loaded():
    """make test builds csrc/ (editable install); the backend must never silently drop out."""
    assert "cpu" in fused_attn.available_backends(), fused_attn.backends.get_backend("cpu").unavailable_reason()


def run(q, k, v, dout, **kw):
    """(out, lse, dq, dk, dv) from the cpu backend, the loss using lse too."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fused_attn.attention(q, k, v, return_lse=True, backend="cpu", **kw)
    dlse = torch.linspace(-1, 1, lse.numel()).reshape(lse.shape)
    loss = (out.float() * dout.float()).sum() + torch.where(torch.isfinite(lse), lse * dlse, 0).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


@pytest.fixture
def isa(monkeypatch):
    """Sets FUSED_ATTN_CPU_ISA (read by the extension at every call) for one test."""

    def set_isa(value):
        monkeypatch.setenv("FUSED_ATTN_CPU_ISA", value)
        return cpu_backend.active_isa()

    return set_isa


def test_isa_choice(isa):
    assert isa("portable") == "portable"
    assert isa("auto") in ("avx2", "portable")
    with pytest.raises(RuntimeError, match="FUSED_ATTN_CPU_ISA must be auto, portable or avx2"):
        isa("sse9")


def variant_keywords(heads_q, seqlen_q, seqlen_k):
    """Every variant the kernels have, cutting across block boundaries."""
    return dict(window=(70, 20), alibi_slopes=torch.rand(heads_q), softcap=5.0,
                attn_mask=torch.randn(seqlen_q, seqlen_k).masked_fill(torch.rand(seqlen_q, seqlen_k) < 0.2, -torch.inf))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_portable_build_matches_vectorized(isa, dtype):
    if isa("auto") != "avx2":
        pytest.skip("this CPU runs the portable kernels only")
    q, k, v = random_qkv(2, 4, 2, 150, 130, 72, 40, dtype, "cpu", sequence_major=True)
    dout = torch.randn(2, 4, 150, 40, dtype=dtype)
    for keywords in (dict(causal=False), dict(causal=True), variant_keywords(4, 150, 130)):
        vectorized = run(q, k, v, dout, causal_alignment="bottom_right", **keywords)
        isa("portable")
        portable = run(q, k, v, dout, causal_alignment="bottom_right", **keywords)
        isa("auto")
        tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), vectorized, portable):
            torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("variants", [False, True], ids=["causal", "variants"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 300, 333), (2, 6, 2, 200, 150), (1, 4, 4, 129, 500)],
                         ids=["one-kv-head", "gqa", "mha"])
def test_thread_count_changes_no_bit(shape, variants):
    """Tasks own their outputs and sum in a fixed order. With B * Hkv = 1 one thread takes the
    one-pass backward and two threads the two-pass one, so this also checks that both schedules
    give identical bits."""
    batch, heads_q, heads_kv, seqlen_q, seqlen_k = shape
    q, k, v = random_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, 64, 64, torch.float32, "cpu")
    dout = torch.randn(batch, heads_q, seqlen_q, 64)
    threads = torch.get_num_threads()
    keywords = variant_keywords(heads_q, seqlen_q, seqlen_k) if variants else dict(causal=True)
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(q, k, v, dout, causal_alignment="bottom_right", **keywords))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bias_shape", [(1,), (2, 1, 1, 150), (1, 6, 200, 150), (2, 6, 200, 1)], ids=str)
def test_bias_gradient_is_bitwise_independent_of_thread_count(bias_shape):
    """dbias is summed over broadcast dims in a fixed order by tasks that own its elements."""
    q, k, v = random_qkv(2, 6, 2, 200, 150, 32, 32, torch.float32, "cpu")
    bias = torch.randn(bias_shape)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            leaf = bias.clone().requires_grad_()
            out = fused_attn.attention(q, k, v, attn_mask=leaf, causal=True, backend="cpu")
            grads.append(torch.autograd.grad(out.square().sum(), leaf)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_sequences_match_reference_backend(dtype, causal):
    """Many query and key blocks per head, ragged ends, GQA, Dv != D."""
    q, k, v = random_qkv(1, 4, 2, 1100, 1300, 64, 48, dtype, "cpu", sequence_major=True)
    dout = torch.randn(1, 4, 1100, 48, dtype=dtype)
    ours = run(q, k, v, dout, causal=causal, causal_alignment="bottom_right")
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = fused_attn.attention(q64, k64, v64, causal=causal, causal_alignment="bottom_right",
                                    return_lse=True, backend="reference")
    dlse = torch.linspace(-1, 1, lse.numel(), dtype=torch.float64).reshape(lse.shape)
    loss = (out * dout.double()).sum() + torch.where(torch.isfinite(lse), lse * dlse, 0).sum()
    exact = (out, lse, *torch.autograd.grad(loss, (q64, k64, v64)))
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, exact):
        torch.testing.assert_close(a.double(), b, **tolerance, msg=lambda m: f"{name}: {m}")


def test_native_op_checks_its_arguments():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    out, lse = torch.empty(1, 2, 8, 16), torch.empty(1, 2, 8)
    with pytest.raises(RuntimeError, match="lse must be Float"):
        torch.ops.fused_attn_native.cpu_forward(q, k, v, out, lse.double(), 0.25, -1, -1, 0)
    with pytest.raises(RuntimeError, match="out must have shape"):
        torch.ops.fused_attn_native.cpu_forward(q, k, v, out[:, :1], lse, 0.25, -1, -1, 0)
    with pytest.raises(RuntimeError, match="dtype Double"):
        torch.ops.fused_attn_native.cpu_forward(q.double(), k.double(), v.double(), out.double(), lse, 0.25, -1, -1, 0)


def test_missing_extension_is_reported_not_fatal(monkeypatch):
    """A package without its extension still imports; the backend says why and dispatch moves on."""
    from fused_attn.backends import native

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_load", lambda: "fused_attn._native is not built (test)")
    with pytest.warns(UserWarning, match=r"C\+\+ extension is unavailable"):
        assert "cpu" not in fused_attn.available_backends()
    report = fused_attn.explain(*(torch.randn(1, 1, 4, 8) for _ in range(3)))
    assert not report.startswith("would run: cpu")
    assert "cpu: not available: fused_attn._native is not built (test)" in report
