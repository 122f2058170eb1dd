"""The op is something torch understands: opcheck, torch.compile, float64 gradcheck."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import DEVICE
from oracle import random_qkv

import fused_attn
from fused_attn.options import AttentionOptions, AttentionTensors


@pytest.mark.parametrize("sequence_major", [False, True], ids=["head-major", "sequence-major"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_opcheck(backend, causal, sequence_major):
    dtype = torch.float16 if backend == "triton" else torch.float32
    q, k, v = random_qkv(1, 4, 2, 37, 50, 32, 16, dtype, DEVICE, sequence_major=sequence_major,
                         requires_grad=True)
    args = (q, k, v, None, None, None, None, None, 0.25, causal, True, -1, -1, 0.0, 0.0, False, 0, 0, backend)
    torch.library.opcheck(torch.ops.fused_attn.forward.default, args)


def every_feature_args(backend):
    """The op's arguments with a learnable broadcast bias, ALiBi, softcap, a window and dropout."""
    dtype = torch.float16 if backend == "triton" else torch.float32
    q, k, v = random_qkv(2, 4, 2, 37, 50, 32, 16, dtype, DEVICE, requires_grad=True)
    bias = torch.randn(1, 4, 37, 50, dtype=dtype, device=DEVICE, requires_grad=True)
    slopes = torch.rand(4, device=DEVICE)
    seed = fused_attn.dropout.draw_seed(DEVICE)
    return (q, k, v, bias, slopes, seed, None, None, 0.25, True, True, 20, -1, 5.0, 0.1, False, 0, 0, backend)


def test_opcheck_with_every_feature(variant_backend):
    """Every feature through the op's schema."""
    torch.library.opcheck(torch.ops.fused_attn.forward.default, every_feature_args(variant_backend))


def test_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    q, k, v = random_qkv(1, 4, 2, 40, 56, 32, 32, torch.float32, DEVICE, requires_grad=True)

    def loss(q, k, v):
        out, lse = fused_attn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        return (out * out).sum() + lse.sum()

    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled_loss = torch.compile(loss, fullgraph=True)
    compiled = torch.autograd.grad(compiled_loss(q, k, v), (q, k, v))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


# Each compiles one public entry point, fullgraph, as the first fused_attn call of a new process.
FIRST_CALLS = {
    "attention": "fused_attn.attention(q, k, v, causal=True)",
    "varlen_attention": "fused_attn.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), "
                        "v[0].transpose(0, 1), cu, cu, 16, 16)",
    "attention_with_kvcache": "fused_attn.attention_with_kvcache(q.transpose(1, 2)[:, :1], k.transpose(1, 2), "
                              "v.transpose(1, 2), torch.tensor([9], dtype=torch.int32))",
    "nn.Attention": "fused_attn.nn.Attention(causal=True)(q, k, v)",
}


@pytest.mark.parametrize("entry", FIRST_CALLS)
def test_compile_fullgraph_as_the_first_call_of_a_process(entry):
    """Nothing that dispatch does on a call's first run (finding out which backends can run here)
    may break a fullgraph trace: a new process compiles the call before running any other."""
    script = textwrap.dedent(f"""
        import torch, fused_attn
        q, k, v = (torch.randn(1, 2, 16, 8, device="{DEVICE}") for _ in range(3))
        cu = torch.tensor([0, 7, 16], dtype=torch.int32, device="{DEVICE}")
        out = torch.compile(lambda q, k, v: {FIRST_CALLS[entry]}, fullgraph=True, backend="aot_eager")(q, k, v)
        assert torch.isfinite(out).all()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]


def test_torch_func_grad_vjp_and_jacrev(backend):
    """torch.func.grad, vjp and jacrev (a vmap of the backward) through the op: the same
    gradients as autograd; a second derivative (nested grad) raises instead of giving zero."""
    q, k, v = random_qkv(1, 4, 2, 7, 9, 16, 16, torch.float32, DEVICE)
    bias = torch.randn(1, 4, 7, 9, device=DEVICE)

    def loss(q, k, v, bias):
        return fused_attn.attention(q, k, v, attn_mask=bias, causal=True, backend=backend).square().sum()

    transformed = torch.func.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    expected = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(transformed, expected):
        torch.testing.assert_close(a, b)
    out, vjp = torch.func.vjp(lambda q: fused_attn.attention(q, k, v, backend=backend), q)
    torch.testing.assert_close(vjp(torch.ones_like(out))[0],
                               torch.autograd.grad(fused_attn.attention(leaves[0], k, v, backend=backend).sum(),
                                                   leaves[0])[0])
    small = q[:, :, :2]
    jacobian = torch.func.jacrev(lambda q: fused_attn.attention(q, k, v, backend=backend).sum(-1))(small)
    exact = torch.func.jacrev(lambda q: oracle_attention(q.double(), k.double(), v.double()).sum(-1))(small.double())
    torch.testing.assert_close(jacobian.double(), exact, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="gradients cannot be differentiated under torch.func transforms"):
        torch.func.grad(lambda q: torch.func.grad(lambda q: loss(q, k, v, bias))(q).square().sum())(q)


def test_batched_backward(backend):
    """A backward over a batch of output gradients (autograd.grad with is_grads_batched=True,
    jacobian(vectorize=True), gradcheck's check_batched_grad) equals one backward per gradient:
    the op's vmap fallback loops over the batch (the kernels' ops, which write into outputs they
    are given, had no batching rule)."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = random_qkv(1, 4, 2, 6, 9, 8, 8, dtype, DEVICE, requires_grad=True)

    def call(q, k, v):
        return fused_attn.attention(q, k, v, causal=True, backend=backend)

    out = call(q, k, v)
    grads = torch.randn(3, *out.shape, dtype=dtype, device=DEVICE)
    batched = torch.autograd.grad(out, (q, k, v), grads, is_grads_batched=True, retain_graph=True)
    for index, dout in enumerate(grads):
        for together, alone in zip(batched, torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)):
            torch.testing.assert_close(together[index], alone)
    small = q.detach()[:, :, :2]
    # (16 outputs: the fallback's loop runs a backward per output, slowly through Triton's interpreter)
    vectorized = torch.autograd.functional.jacobian(lambda q: call(q, k, v)[:, :1], small, vectorize=True)
    exact = torch.func.jacrev(lambda q: oracle_attention(q, k.double(), v.double(), causal=True)[:, :1])(small.double())
    torch.testing.assert_close(vectorized.double(), exact, rtol=1e-4, atol=1e-5)
    if backend == "reference":
        assert torch.autograd.gradcheck(call, (q, k, v), check_batched_grad=True)


def test_compiled_torch_func_transforms(backend):
    """torch.compile of torch.func.grad / vjp over attention: the call runs eagerly inside the
    compiled function (a graph break; it had crashed: torch.library's autograd wrapper does not
    support the transforms), with eager's gradients; torch.compile of vmap traces the op whole
    (fullgraph)."""
    q, k, v = random_qkv(2, 4, 2, 7, 9, 16, 16, torch.float32, DEVICE)

    def loss(q, k, v):
        return fused_attn.attention(q, k, v, causal=True, backend=backend).square().sum()

    torch._dynamo.reset()
    expected = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    compiled = torch.compile(torch.func.grad(loss, argnums=(0, 1, 2)), backend="aot_eager")(q, k, v)
    for a, b in zip(compiled, expected):
        torch.testing.assert_close(a, b)
    vjp = torch.compile(lambda q: torch.func.vjp(lambda q: fused_attn.attention(q, k, v, backend=backend), q)[1](
        torch.ones_like(q))[0], backend="aot_eager")(q)
    torch.testing.assert_close(vjp, torch.func.vjp(lambda q: fused_attn.attention(q, k, v, backend=backend), q)[1](
        torch.ones_like(q))[0])
    batched = torch.compile(torch.func.vmap(lambda q, k, v: fused_attn.attention(q, k, v, backend=backend)),
                            backend="aot_eager", fullgraph=True)(q[:, None], k[:, None], v[:, None])
    torch.testing.assert_close(batched[:, 0], fused_attn.attention(q, k, v, backend=backend))
    torch._dynamo.reset()


def test_compiled_calls_with_a_dynamic_batch():
    """torch.compile with the batch marked dynamic (a hint it may specialize): masks, ALiBi slopes
    and a MultiheadAttention 3-D mask of the batch's size are checked against the symbolic batch
    with ==, which specializes it (the checks' tuple membership had refused them as not
    broadcasting, with messages naming the very shape given)."""
    q, k, v = random_qkv(2, 4, 2, 5, 7, 16, 16, torch.float32, DEVICE)
    bias, slopes = torch.randn(2, 1, 1, 7, device=DEVICE), torch.rand(2, 4, device=DEVICE)
    for t in (q, k, v):
        torch._dynamo.maybe_mark_dynamic(t, 0)

    def call(q, k, v):
        return fused_attn.attention(q, k, v, attn_mask=bias, alibi_slopes=slopes)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(call, backend="aot_eager", fullgraph=True)(q, k, v), call(q, k, v))
    mha = fused_attn.nn.MultiheadAttention(16, 2, batch_first=True).to(DEVICE)
    x, mask = torch.randn(3, 5, 16, device=DEVICE), torch.randn(6, 5, 5, device=DEVICE)
    torch._dynamo.maybe_mark_dynamic(x, 0)
    compiled = torch.compile(lambda x: mha(x, x, x, attn_mask=mask, need_weights=False)[0], backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), mha(x, x, x, attn_mask=mask, need_weights=False)[0])
    torch._dynamo.reset()


def oracle_attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(D)) v with k and v's heads repeated for q's (GQA); causal top-left."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        seen = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~seen, float("-inf"))
    return torch.softmax(scores, -1) @ v


def test_second_derivatives_raise_where_a_backend_cannot_give_them(backend):
    """create_graph=True: the reference backend's gradients are differentiable; differentiating
    another backend's raises, never silently dropping the second-order terms."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = random_qkv(1, 2, 1, 6, 9, 8, 8, dtype, DEVICE, requires_grad=True)

    def penalty(q, k, v):  # a gradient penalty, as in WGAN-GP
        out = fused_attn.attention(q, k, v, causal=True, backend=backend)
        dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        return dq.square().sum()

    if backend == "reference":
        assert torch.autograd.gradgradcheck(lambda q, k, v: fused_attn.attention(q, k, v, causal=True, backend=backend),
                                            (q, k, v))
        assert all(g.abs().sum() > 0 for g in torch.autograd.grad(penalty(q, k, v), (q, k, v)))
    else:
        with pytest.raises(RuntimeError, match=f"the '{backend}' backend's gradients cannot be differentiated"):
            torch.autograd.grad(penalty(q, k, v), (q, k, v))
        first, = torch.autograd.grad(fused_attn.attention(q, k, v, backend=backend).sum(), q, create_graph=True)
        assert not first.isnan().any()  # create_graph alone is fine: only differentiating raises


def test_forward_mode_derivatives_come_from_the_reference_backend_or_raise(backend):
    """forward_ad's dual tensors require no grad, and a kernel would drop their tangents (a silent
    zero derivative, as the cpu backend gave): the reference backend's torch operations carry
    them, with the exact directional derivative; another backend raises NotImplementedError, as
    torch's SDPA does. Without tangents, a call inside dual_level() runs as usual."""
    from torch.autograd import forward_ad

    q, k, v = random_qkv(1, 4, 2, 7, 9, 16, 16, torch.float64 if backend == "reference" else torch.float32, DEVICE)
    tangent = torch.randn_like(q)
    with forward_ad.dual_level():
        plain = fused_attn.attention(q, k, v, causal=True, backend=backend)
        assert forward_ad.unpack_dual(plain).tangent is None
        dual = forward_ad.make_dual(q, tangent)
        if backend != "reference":
            with pytest.raises(NotImplementedError, match=f"the '{backend}' backend has no forward-mode derivative"):
                fused_attn.attention(dual, k, v, causal=True, backend=backend)
            return
        derivative = forward_ad.unpack_dual(fused_attn.attention(dual, k, v, causal=True, backend=backend)).tangent
    exact = torch.func.jvp(lambda q: oracle_attention(q, k, v, causal=True), (q,), (tangent,))[1]
    torch.testing.assert_close(derivative, exact)


def test_second_derivatives_through_the_op_raise_fused_attns_error(backend):
    """Through the registered op (torch.jit.trace, tensor subclasses) differentiating the
    gradients raises fused_attn's explanation, on every backend (torch's own 'no autograd formula
    was registered' had said nothing of where second derivatives come from)."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = random_qkv(1, 2, 1, 6, 9, 8, 8, dtype, DEVICE, requires_grad=True)
    traced = torch.jit.trace(lambda q, k, v: fused_attn.attention(q, k, v, backend=backend), (q, k, v),
                             check_trace=False)
    dq, = torch.autograd.grad(traced(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="fused_attn: the gradients of a call through the registered op"):
        torch.autograd.grad(dq.square().sum(), (q, k, v))


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_float64_gradcheck(alignment):
    q, k, v = random_qkv(1, 4, 2, 6, 9, 8, 5, torch.float64, DEVICE, requires_grad=True)

    def fn(q, k, v):
        out, lse = fused_attn.attention(q, k, v, causal=True, causal_alignment=alignment, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_kvcache_opcheck(kvcache_backend):
    q = torch.randn(2, 3, 4, 32, device=DEVICE)
    k_cache, v_cache = torch.randn(2, 50, 2, 32, device=DEVICE), torch.randn(2, 50, 2, 16, device=DEVICE)
    seqlens = torch.tensor([7, 50], dtype=torch.int32, device=DEVICE)
    args = (q, k_cache, v_cache, seqlens, None, None, 0.2, True, -1, -1, 0.0, kvcache_backend)
    torch.library.opcheck(torch.ops.fused_attn.kvcache_forward.default, args)


def test_eager_calls_equal_the_op_bit_for_bit(variant_backend):
    """Plain eager calls skip torch.library's dispatch (fused_attn/ops.py, attention_op) but must
    run exactly what the op runs: the same outputs and gradients, a learnable bias's included."""
    args = every_feature_args(variant_backend)
    q, k, v, bias = args[:4]
    dout = torch.randn(2, 4, 37, 16, dtype=q.dtype, device=DEVICE)
    dlse = torch.randn(2, 4, 37, device=DEVICE)
    results = []
    for call in (_eager_call, torch.ops.fused_attn.forward.default):
        out, lse = call(*args)
        loss = (out.float() * dout.float()).sum() + (lse * dlse).sum()
        results.append((out, lse, *torch.autograd.grad(loss, (q, k, v, bias))))
    for name, eager, op in zip(("out", "lse", "dq", "dk", "dv", "dbias"), *results):
        assert torch.equal(eager, op), name
    with torch.no_grad():
        out, lse = _eager_call(*args)
    assert torch.equal(out, results[1][0]) and out.grad_fn is None


def _eager_call(q, k, v, attn_mask, alibi_slopes, dropout_seed, cu_seqlens_q, cu_seqlens_k, *scalars_and_backend):
    """attention_op called as the public functions call it, from the op's arguments."""
    *scalars, backend = scalars_and_backend
    extras = AttentionTensors(*fused_attn.ops.split_mask(attn_mask), alibi_slopes, dropout_seed, cu_seqlens_q,
                              cu_seqlens_k)
    return fused_attn.ops.attention_op(q, k, v, attn_mask, extras, AttentionOptions(*scalars), backend)


def _random(shape, device, grad=False):
    return torch.randn(shape).to(device).requires_grad_(grad)


def _meta_calls():
    """(name, call(device) -> outputs) of each entry point, on fresh inputs on `device`."""
    def dense(device):
        q_rows, k = _random((2, 6, 4, 16), device, grad=True), _random((2, 2, 7, 16), device, grad=True)
        v, bias = _random((2, 2, 7, 8), device), _random((1, 4, 1, 7), device, grad=True)
        out, lse = fused_attn.attention(q_rows.transpose(1, 2), k, v, attn_mask=bias, causal=True, dropout_p=0.2,
                                        return_lse=True)  # q sequence-major: out is too
        out.sum().backward()
        return out, lse, q_rows.grad, k.grad, bias.grad

    def varlen(device):
        q, k, v = _random((9, 4, 16), device, grad=True), _random((9, 2, 16), device), _random((9, 2, 8), device)
        cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
        out = fused_attn.varlen_attention(q, k, v, cu, cu, 5, 5, causal=True)
        out.sum().backward()
        return out, q.grad

    def kvcache(device):
        q, k_cache, v_cache = (_random(shape, device) for shape in ((2, 1, 4, 16), (2, 10, 2, 16), (2, 10, 2, 8)))
        lengths = torch.tensor([3, 7], dtype=torch.int32, device=device)
        return fused_attn.attention_with_kvcache(q, k_cache, v_cache, lengths, k=_random((2, 1, 2, 16), device),
                                                 v=_random((2, 1, 2, 8), device), causal=True, return_lse=True)

    def paged(device):
        q, pages = _random((2, 1, 4, 16), device), _random((6, 4, 2, 16), device)
        table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=device)
        return fused_attn.attention_with_kvcache(q, pages, pages, 9, block_table=table, return_lse=True)

    def sdpa(device):
        q, k, v = (_random(shape, device) for shape in ((2, 4, 6, 16), (2, 4, 6, 16), (2, 4, 6, 8)))
        return (fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True),)

    return [("attention", dense), ("varlen", varlen), ("kvcache", kvcache), ("paged", paged), ("sdpa", sdpa)]


@pytest.mark.parametrize("name, call", _meta_calls(), ids=[name for name, _ in _meta_calls()])
def test_meta_tensors_give_the_outputs_of_a_real_call(name, call):
    """A model built on the meta device (shapes, no values) can run attention: every entry point
    returns meta outputs and gradients with the shapes, strides and dtypes of a real call, reading
    no value (a meta tensor has none to read)."""
    meta, real = call("meta"), call(DEVICE)
    assert len(meta) == len(real)
    for m, r in zip(meta, real):
        assert m.device.type == "meta"
        assert (m.shape, m.stride(), m.dtype) == (r.shape, r.stride(), r.dtype), name
    q = torch.empty(1, 2, 3, 8, device="meta")
    assert "no kernel runs" in fused_attn.explain(q, q, q).splitlines()[1]


@pytest.mark.parametrize("name, call", _meta_calls(), ids=[name for name, _ in _meta_calls()])
def test_fake_tensors_give_the_outputs_of_a_real_call(name, call):
    """Under FakeTensorMode (shape propagation, memory estimates) every entry point returns fake
    outputs and gradients with a real call's shapes, strides and dtypes; the host checks read no
    value (varlen's cu_seqlens and a KV cache's lengths had been read, and raised)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    real = call(DEVICE)
    with FakeTensorMode():
        fake = call(DEVICE)
    assert len(fake) == len(real)
    for f, r in zip(fake, real):
        assert is_fake(f)
        assert (f.shape, f.stride(), f.dtype) == (r.shape, r.stride(), r.dtype), name


def test_parameters_take_the_eager_path_and_subclasses_the_op(monkeypatch):
    """A learnable bias held as nn.Parameter is a plain tensor to the eager path (no ~250 us op
    dispatch) and gets its gradient; a true tensor subclass goes through the registered op."""
    calls = []
    op = fused_attn.ops.attention_forward
    monkeypatch.setattr(fused_attn.ops, "attention_forward", lambda *a: calls.append(1) or op(*a))
    q, k, v = random_qkv(1, 2, 2, 8, 8, 16, 16, torch.float32, DEVICE, requires_grad=True)
    bias = torch.nn.Parameter(torch.randn(1, 2, 8, 8, device=DEVICE))
    out = fused_attn.attention(q, k, v, attn_mask=bias)
    (grad,) = torch.autograd.grad(out.sum(), bias)
    assert calls == [] and grad.shape == bias.shape and grad.abs().sum() > 0

    class Marked(torch.Tensor):
        pass

    assert fused_attn.ops.needs_the_op((q.detach().as_subclass(Marked), k, v, None))
    assert not fused_attn.ops.needs_the_op((q, k, v, bias, None))


def test_calls_go_through_the_op_when_traced(monkeypatch):
    """torch.compile sees the registered op; eager calls do without it."""
    torch._dynamo.reset()
    calls = []
    op = fused_attn.ops.attention_forward
    monkeypatch.setattr(fused_attn.ops, "attention_forward", lambda *a: calls.append(1) or op(*a))
    q, k, v = random_qkv(1, 2, 2, 8, 8, 16, 16, torch.float32, DEVICE, requires_grad=True)
    eager = fused_attn.attention(q, k, v)
    assert calls == []
    compiled = torch.compile(lambda q, k, v: fused_attn.attention(q, k, v), fullgraph=True)(q, k, v)
    assert calls and torch.equal(eager, compiled)


# --- torch.jit.trace ---------------------------------------------------------------------------

class _Calls(torch.nn.Module):
    """A module whose forward is `function`: how models reach fused_attn when they are traced."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *tensors):
        return self.function(*tensors)


def trace_and_run_on_fresh_inputs(function, make_inputs):
    """torch.jit.trace (its check included) of a module calling `function` on make_inputs(); then
    (traced outputs, eager outputs) on fresh inputs, each call on its own copy of them."""
    module = _Calls(function)
    traced = torch.jit.trace(module, make_inputs(), check_trace=True)
    inputs = make_inputs()
    copies = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    return traced, (traced(*inputs), inputs), (module(*copies), copies)


def assert_same_outputs_and_gradients(traced_run, eager_run):
    """Bit for bit: the traced op runs the implementation that eager calls run."""
    (out, inputs), (expected, copies) = traced_run, eager_run
    assert torch.equal(out, expected)
    dout = torch.randn_like(out)
    leaves = [i for i, t in enumerate(inputs) if t.requires_grad]
    grads = torch.autograd.grad(out, [inputs[i] for i in leaves], dout)
    expected_grads = torch.autograd.grad(expected, [copies[i] for i in leaves], dout)
    for i, a, b in zip(leaves, grads, expected_grads):
        assert torch.equal(a, b), f"gradient of input {i}"


def test_jit_trace_of_attention_matches_eager(variant_backend):
    """Eager calls skip the op (attention_op); traced ones must record it, or the trace holds the
    backend's insides (a kernel writing into outputs made outside it, host values as constants, a
    triton launch that fails) or, with gradients wanted, an autograd.Function node that trace's
    check, re-tracing under no_grad, does not reproduce."""
    dtype = torch.float16 if variant_backend == "triton" and DEVICE.type == "cuda" else torch.float32

    def make_inputs():
        q, k, v = random_qkv(2, 4, 2, 13, 17, 16, 8, dtype, DEVICE, sequence_major=True, requires_grad=True)
        return q, k, v, torch.randn(1, 4, 13, 17, dtype=dtype, device=DEVICE, requires_grad=True)

    def call(q, k, v, bias):
        return fused_attn.attention(q, k, v, attn_mask=bias, causal=True, window=(5, -1), softcap=4.0,
                                    backend=variant_backend)

    traced, *runs = trace_and_run_on_fresh_inputs(call, make_inputs)
    assert "fused_attn::forward" in str(traced.graph)
    assert_same_outputs_and_gradients(*runs)


def test_jit_trace_of_varlen_attention_matches_eager(varlen_backend):
    cu_seqlens = torch.tensor([0, 5, 14, 20], dtype=torch.int32, device=DEVICE)

    def make_inputs():
        q, k, v = (torch.randn(20, heads, 16, device=DEVICE, requires_grad=True) for heads in (4, 2, 2))
        return q, k, v, cu_seqlens

    def call(q, k, v, cu_seqlens):
        return fused_attn.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, 9, 9, causal=True, backend=varlen_backend)

    traced, *runs = trace_and_run_on_fresh_inputs(call, make_inputs)
    assert "fused_attn::forward" in str(traced.graph)
    assert_same_outputs_and_gradients(*runs)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_jit_trace_of_kvcache_attention_appends_like_eager(kvcache_backend, paged):
    """The traced module writes the new tokens into the caches given to it, at the lengths given
    to it, and attends as eager calls do (the reference backend's trace once baked the lengths)."""
    table = torch.tensor([[3, 1, 0], [2, 5, 4]], dtype=torch.int32, device=DEVICE) if paged else None

    def make_inputs():
        cache_shape = (6, 8, 2, 16) if paged else (2, 24, 2, 16)
        q, k_new, v_new = (torch.randn(2, 2, heads, 16, device=DEVICE) for heads in (4, 2, 2))
        k_cache, v_cache = torch.randn(cache_shape, device=DEVICE), torch.randn(cache_shape, device=DEVICE)
        lengths = torch.randint(0, 22, (2,), dtype=torch.int32, device=DEVICE)
        return q, k_cache, v_cache, lengths, k_new, v_new

    def call(q, k_cache, v_cache, lengths, k_new, v_new):
        return fused_attn.attention_with_kvcache(q, k_cache, v_cache, lengths, k=k_new, v=v_new, block_table=table,
                                                 causal=True, backend=kvcache_backend)

    traced, (out, inputs), (expected, copies) = trace_and_run_on_fresh_inputs(call, make_inputs)
    assert "fused_attn::kvcache_forward" in str(traced.graph)
    assert torch.equal(out, expected)
    for name, written, expected_cache in zip(("k_cache", "v_cache"), inputs[1:3], copies[1:3]):
        assert torch.equal(written, expected_cache), name


def test_jit_trace_warns_that_an_int_cache_length_is_a_constant():
    q, k_cache, v_cache = torch.randn(1, 1, 2, 8), torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8)
    with pytest.warns(torch.jit.TracerWarning, match="cache_seqlens=5 as a constant"):
        torch.jit.trace(lambda q, k, v: fused_attn.attention_with_kvcache(q, k, v, 5), (q, k_cache, v_cache))
