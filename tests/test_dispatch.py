"""Choosing a backend: forcing one, the environment variable, fallback, and explanations."""
import warnings

import pytest
import torch

from conftest import BACKENDS, DEVICE

import fused_attn
from fused_attn import dispatch
from fused_attn.options import AttentionOptions, AttentionTensors


def qkv(dtype=torch.float32):
    return [torch.randn(1, 2, 8, 16, dtype=dtype, device=DEVICE) for _ in range(3)]


def test_reference_is_always_available():
    assert "reference" in fused_attn.available_backends()


def test_triton_available_here():
    """CI runs the Triton kernels (interpreted without a GPU), so they must never silently drop out."""
    assert "triton" in fused_attn.available_backends()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the probe runs under Triton's interpreter")
def test_triton_is_unavailable_where_its_interpreter_cannot_run_the_kernels(monkeypatch):
    """Triton 3.6's interpreter fails on every kernel's key loop with NumPy >= 2.4: a probe kernel
    finds that out, and dispatch then says why instead of failing inside a kernel."""
    import triton

    from fused_attn.triton import common

    assert common.interpreter_problem() is None  # the probe runs here, as the kernels do

    class FailingLaunch:
        def __getitem__(self, grid):
            def launch(*args):
                raise triton.runtime.errors.InterpreterError("TypeError('only 0-dimensional arrays can be converted')")
            return launch

    monkeypatch.setattr(common, "_count_to", FailingLaunch())
    problem = common.interpreter_problem()
    assert "interpreter cannot run a loop over a runtime bound" in problem and "Triton >= 3.8" in problem
    from fused_attn.backends import triton_backend

    monkeypatch.setattr(triton_backend, "INTERPRETER_PROBLEM", problem)
    assert "triton" not in fused_attn.available_backends()
    assert problem in fused_attn.explain(*qkv())


def test_automatic_choice_prefers_the_device_native_backend():
    """Triton kernels first for CUDA tensors; the C++ kernels first for CPU tensors."""
    expected = "triton" if DEVICE.type == "cuda" else "cpu"
    assert fused_attn.explain(*qkv()).splitlines()[0] == f"would run: {expected}"


def test_forced_backend_that_cannot_serve_raises_with_reasons():
    with pytest.raises(fused_attn.BackendError, match=r"backend 'triton' cannot serve this call: dtype torch.float64"):
        fused_attn.attention(*qkv(torch.float64), backend="triton")


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "reference")
    assert fused_attn.explain(*qkv()).splitlines()[0] == "would run: reference"
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FUSED_ATTN_BACKEND environment variable must be one of"):
        fused_attn.attention(*qkv())


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = fused_attn.attention(*qkv(torch.float64))
    assert out.dtype == torch.float64
    messages = [str(w.message) for w in caught if "fused_attn" in str(w.message)]
    first_choice = "triton" if DEVICE.type == "cuda" else "cpu"
    assert len(messages) == 1 and f"'reference' backend because {first_choice}" in messages[0]


def test_explain_lists_every_backend_and_why():
    report = fused_attn.explain(*qkv(torch.float64))
    assert report.splitlines()[0] == "would run: reference"
    assert "triton: dtype torch.float64" in report


def test_explain_says_when_the_decoding_kernel_runs():
    """A few-query call against more keys runs the chosen backend's decoding kernel, and explain
    says so; a call of as many queries as keys does not."""
    q, k = torch.randn(1, 8, 2, 16, device=DEVICE), torch.randn(1, 2, 40, 16, device=DEVICE)
    assert "with its decoding kernel: 8 query rows per key/value head against 40 keys" in fused_attn.explain(q, k, k)
    assert "decoding kernel" not in fused_attn.explain(*qkv())
    assert "decoding kernel" not in fused_attn.explain(q, k, k, backend="reference")


@pytest.mark.skipif("cpu" not in BACKENDS or DEVICE.type != "cpu", reason="the cpu backend's forward path")
def test_explain_says_when_the_cpu_forward_takes_decodings_path():
    """The cpu backend's forward op splits long keys itself for every dense call that no backward
    follows and that has no mask, bias or dropout (csrc/binding.cpp, cpu_forward), whatever the
    shapes: explain says so, and not for calls that need the backward's rounding or have a mask."""
    q, k = torch.randn(1, 8, 100, 16), torch.randn(1, 2, 400, 16)
    path = "with its decoding path (no backward follows; no mask, bias or dropout)"
    assert path in fused_attn.explain(q, k, k, causal=True)  # top-left: not the decoding kernel's shapes
    assert path not in fused_attn.explain(q.requires_grad_(), k, k, causal=True)
    assert path not in fused_attn.explain(q.detach(), k, k, attn_mask=torch.ones(100, 400, dtype=torch.bool))
    assert path not in fused_attn.explain(q.detach(), k, k, backend="reference")


def test_explain_with_forced_backend():
    report = fused_attn.explain(*qkv(), backend="reference")
    assert report.splitlines()[0] == "would run: reference"
    assert "triton: could serve it, but 'reference' is forced" in report


@pytest.mark.skipif("cpu" not in fused_attn.available_backends() or DEVICE.type != "cpu",
                    reason="needs the C++ extension and CPU tensors")
def test_cpu_backend_serves_every_kind_of_call_and_refuses_float64_with_reasons(monkeypatch):
    """Dense, packed (varlen) and KV-cache calls on CPU tensors go to the C++ kernels without a
    fallback warning; what the kernels lack (float64) is refused with the reason."""
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v = qkv()
    assert fused_attn.explain(q, k, v).splitlines()[0] == "would run: cpu"
    assert fused_attn.explain(q, k, v, softcap=2.0, window=(3, 0), dropout_p=0.1).splitlines()[0] == "would run: cpu"
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]  # (total, H, D)
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    extras = AttentionTensors(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens)
    assert dispatch.select_backend(*packed, extras, AttentionOptions()) == "cpu"
    cache = k.transpose(1, 2)  # (B, capacity, Hkv, D)
    assert dispatch.select_backend(q, k, v, AttentionTensors(), AttentionOptions(bottom_right=True), kvcache=True) == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        fused_attn.varlen_attention(*packed, cu_seqlens, cu_seqlens, 5, 5, causal=True)
        fused_attn.attention_with_kvcache(q.transpose(1, 2)[:, :1], cache, cache, 6, causal=True)
    with pytest.raises(fused_attn.BackendError, match="backend 'cpu' cannot serve this call: dtype torch.float64"):
        fused_attn.varlen_attention(*(t.double() for t in packed), cu_seqlens, cu_seqlens, 5, 5, backend="cpu")
