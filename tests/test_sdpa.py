"""fused_attn.scaled_dot_product_attention against torch's own function, and patch_sdpa().

torch.nn.functional.scaled_dot_product_attention in float64 is the ground truth and the same call
in float32 the low-precision reference of the accuracy rule (tests/oracle.py). Bug classes: mask
conventions, is_causal alignment with Lq != Lk, GQA only with enable_gqa, head/batch broadcasting,
leading-dim flattening (without copies), error kinds, dropout statistics and seeding, patching that
leaks past its block, fallback for calls fused_attn cannot serve.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from oracle import assert_accurate

import fused_attn
from fused_attn import sdpa as sdpa_module

TORCH_SDPA = sdpa_module._TORCH_SDPA  # torch's builtin, whatever is patched


def randn(*shape, requires_grad=True):
    return torch.randn(*shape, device=DEVICE, requires_grad=requires_grad)


def visible_mask(*shape, p=0.3):
    """A random bool mask (True = attend) in which every query row sees key 0."""
    mask = torch.rand(*shape, device=DEVICE) > p
    mask[..., 0] = True
    return mask


def check_parity(q, k, v, **keywords):
    """Output and gradients (q, k, v and a learnable float mask) vs torch's SDPA in float64 / float32."""
    mask = keywords.pop("attn_mask", None)
    leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    out = fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, **keywords)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    results = {}
    for precision in (torch.float64, torch.float32):
        ref_leaves = [t.detach().to(precision).requires_grad_() for t in leaves]
        ref_mask = ref_leaves[3] if len(leaves) > 3 else mask
        ref_out = TORCH_SDPA(*ref_leaves[:3], attn_mask=ref_mask, **keywords)
        results[precision] = ref_out, torch.autograd.grad(ref_out, ref_leaves, dout.to(precision))
    (exact, exact_grads), (low, low_grads) = results[torch.float64], results[torch.float32]
    assert out.shape == exact.shape and out.dtype == q.dtype
    assert_accurate("out", out, exact, low, torch.float32)
    for name, grad, e, lo, leaf in zip(("dq", "dk", "dv", "dmask"), grads, exact_grads, low_grads, leaves):
        assert grad.shape == leaf.shape, name
        assert_accurate(name, grad, e, lo, torch.float32)


B, H, LQ, LK, D = 2, 3, 17, 23, 16

CASES = {
    "plain": lambda: ((randn(B, H, LQ, D), randn(B, H, LK, D), randn(B, H, LK, D)), {}),
    "causal Lq<Lk": lambda: ((randn(B, H, LQ, D), randn(B, H, LK, D), randn(B, H, LK, D)), dict(is_causal=True)),
    "causal Lq>Lk": lambda: ((randn(B, H, LK, D), randn(B, H, LQ, D), randn(B, H, LQ, D)), dict(is_causal=True)),
    "bool mask (L, S)": lambda: ((randn(B, H, LQ, D), randn(B, H, LK, D), randn(B, H, LK, D)),
                                 dict(attn_mask=visible_mask(LQ, LK))),
    "bool mask (B, 1, 1, S)": lambda: ((randn(B, H, LQ, D), randn(B, H, LK, D), randn(B, H, LK, D)),
                                       dict(attn_mask=visible_mask(B, 1, 1, LK))),
    "learnable float mask (H, L, S)": lambda: ((randn(B, H, LQ, D), randn(B, H, LK, D), randn(B, H, LK, D)),
                                               dict(attn_mask=randn(H, LQ, LK))),
    "GQA enable_gqa": lambda: ((randn(B, 4, LQ, D), randn(B, 2, LK, D), randn(B, 2, LK, D)),
                               dict(enable_gqa=True, is_causal=True)),
    "single kv head broadcast": lambda: ((randn(B, 4, LQ, D), randn(B, 1, LK, D), randn(B, 1, LK, D)), {}),
    "single q head broadcast": lambda: ((randn(B, 1, LQ, D), randn(B, H, LK, D), randn(B, H, LK, D)), {}),
    "scale": lambda: ((randn(B, H, LQ, D), randn(B, H, LK, D), randn(B, H, LK, D)), dict(scale=0.3)),
    "3-D (N, L, E)": lambda: ((randn(B, LQ, D), randn(B, LK, D), randn(B, LK, 24)), dict(is_causal=True)),
    "2-D (L, E)": lambda: ((randn(LQ, D), randn(LK, D), randn(LK, D)), dict(attn_mask=visible_mask(LQ, LK))),
    "5-D with batch broadcast": lambda: ((randn(2, 2, H, LQ, D), randn(1, 2, H, LK, D), randn(2, 1, H, LK, D)),
                                         dict(attn_mask=visible_mask(2, 1, 1, LQ, LK))),
    "(B, L, H, D) views": lambda: (tuple(randn(B, L, H, D).transpose(1, 2) for L in (LQ, LK, LK)), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_torch(case):
    inputs, keywords = CASES[case]()
    inputs = tuple(t.detach().requires_grad_() if t.grad_fn is not None else t for t in inputs)
    check_parity(*inputs, **keywords)


def test_mask_and_is_causal_apply_both():
    """torch's fused kernels apply both (its math kernel refuses the pair): keep their intersection."""
    q, k, v = randn(B, H, LQ, D), randn(B, H, LK, D), randn(B, H, LK, D)
    mask = visible_mask(B, 1, LQ, LK)
    causal = torch.ones(LQ, LK, dtype=torch.bool, device=DEVICE).tril()
    expected = TORCH_SDPA(q, k, v, attn_mask=mask & causal)
    torch.testing.assert_close(fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True),
                               expected, rtol=1e-5, atol=1e-5)
    bias = torch.randn(LQ, LK, device=DEVICE)
    expected = TORCH_SDPA(q, k, v, attn_mask=bias.masked_fill(~causal, float("-inf")))
    torch.testing.assert_close(fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True),
                               expected, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_zero_like_torch():
    q, k, v = randn(1, 2, 8, D), randn(1, 2, 12, D), randn(1, 2, 12, D)
    mask = visible_mask(8, 12)
    mask[3] = False
    out = fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.all(out[:, :, 3] == 0)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)


def test_leading_dims_are_flattened_without_copies():
    q = torch.randn(2, 3, 4, LQ, D, device=DEVICE)
    k = torch.randn(2, 3, 1, LK, D, device=DEVICE)
    plan = sdpa_module._plan(q, k, k, None, 0.0, False, None, False)
    assert plan.q.shape == (6, 4, LQ, D) and plan.q.data_ptr() == q.data_ptr()
    assert plan.k.shape == (6, 1, LK, D), "a single shared kv head must stay single (multi-query attention)"
    sequence_major = torch.randn(2, LQ, 4, D, device=DEVICE).transpose(1, 2)
    plan = sdpa_module._plan(sequence_major, sequence_major, sequence_major, None, 0.0, False, None, False)
    assert plan.q.data_ptr() == sequence_major.data_ptr() and plan.q.stride() == sequence_major.stride()


@pytest.mark.parametrize("call", [
    "gqa without enable_gqa", "heads not divisible", "1-D inputs", "dtype mismatch", "int mask",
    "float64 mask for float32 inputs", "mask does not broadcast", "scale given positionally",
    "enable_gqa not a bool", "3-D mask for 2-D inputs",
])
def test_errors_are_the_kind_torch_raises(call):
    q, k, v = (torch.randn(2, 4, 5, 16, device=DEVICE) for _ in range(3))
    k2, v2 = k[:, :2], v[:, :2]
    args, keywords = {
        "gqa without enable_gqa": ((q, k2, v2), {}),
        "heads not divisible": ((q[:, :3], k2, v2), dict(enable_gqa=True)),
        "1-D inputs": ((q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), {}),
        "dtype mismatch": ((q, k.double(), v), {}),
        "int mask": ((q, k, v), dict(attn_mask=torch.ones(5, 5, dtype=torch.int64, device=DEVICE))),
        "float64 mask for float32 inputs": ((q, k, v), dict(attn_mask=torch.zeros(5, 5, dtype=torch.float64,
                                                                                  device=DEVICE))),
        "mask does not broadcast": ((q, k, v), dict(attn_mask=torch.ones(3, 5, 5, dtype=torch.bool, device=DEVICE))),
        "scale given positionally": ((q, k, v, None, 0.0, False, 0.5), {}),
        "enable_gqa not a bool": ((q, k2, v2), dict(enable_gqa="False")),
        "3-D mask for 2-D inputs": ((q[0, 0], k[0, 0], v[0, 0]), dict(attn_mask=torch.zeros(1, 5, 5, device=DEVICE))),
    }[call]
    with pytest.raises(Exception) as torch_error:
        TORCH_SDPA(*args, **keywords)
    with pytest.raises(type(torch_error.value)):
        fused_attn.scaled_dot_product_attention(*args, **keywords)


@pytest.mark.parametrize("keywords", [dict(scale=True), dict(dropout_p=False), dict(dropout_p=True)])
def test_bools_are_numbers_as_in_torch(keywords):
    """torch takes scale=True as 1.0 and dropout_p=True as 1.0 (every probability dropped)."""
    q, k, v = (torch.randn(2, 3, 5, 16, device=DEVICE) for _ in range(3))
    expected = TORCH_SDPA(q, k, v, **keywords)
    out = fused_attn.scaled_dot_product_attention(q, k, v, **keywords)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if keywords.get("dropout_p") is True:
        assert torch.all(out == 0)


def test_dropout_mean_and_seed():
    p = 0.3
    q, k = randn(2, 4, 64, D, requires_grad=False), randn(2, 4, 64, D, requires_grad=False)
    ones = torch.ones(2, 4, 64, D, device=DEVICE)
    out = fused_attn.scaled_dot_product_attention(q, k, ones, dropout_p=p)
    assert abs(out.mean().item() - 1) < 0.02, "kept probabilities must be rescaled by 1 / (1 - p)"
    assert (out != 1).float().mean() > 0.5, "dropout must actually drop"
    v = randn(2, 4, 64, D, requires_grad=False)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=p))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    everything_dropped = fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.equal(everything_dropped, TORCH_SDPA(q, k, v, dropout_p=1.0))


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    q, k, v = randn(2, 4, LQ, D), randn(2, 2, LK, D), randn(2, 2, LK, D)
    bias = randn(4, LQ, LK)

    def loss(q, k, v, bias):
        out = fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True, scale=0.2)
        return (out * out).sum()

    eager = torch.autograd.grad(loss(q, k, v, bias), (q, k, v, bias))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v, bias), (q, k, v, bias))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


# --- patching torch.nn.functional.scaled_dot_product_attention ---------------------------------

@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that the SDPA entry points run with fused_attn's kernels (planned calls)."""
    calls = []
    real = sdpa_module.run_planned

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_module, "run_planned", counting)
    yield calls
    fused_attn.disable()


def test_patch_routes_to_fused_attn_and_restores(spy):
    original = F.scaled_dot_product_attention
    q, k, v = randn(B, H, LQ, D), randn(B, H, LK, D), randn(B, H, LK, D)
    with fused_attn.patch_sdpa():
        assert fused_attn.is_enabled() and F.scaled_dot_product_attention is not original
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert spy == [1]
    assert F.scaled_dot_product_attention is original and not fused_attn.is_enabled()
    torch.testing.assert_close(out, original(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


def test_patch_restores_after_an_exception_and_nests(spy):
    original = F.scaled_dot_product_attention
    with pytest.raises(KeyError):
        with fused_attn.patch_sdpa():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is original
    with fused_attn.patch_sdpa():
        with fused_attn.patch_sdpa():
            pass
        assert fused_attn.is_enabled(), "leaving an inner block must keep the outer one patched"
    assert F.scaled_dot_product_attention is original
    fused_attn.enable()
    fused_attn.enable()
    with fused_attn.patch_sdpa():
        pass
    assert fused_attn.is_enabled(), "a block entered while enabled leaves it enabled"
    fused_attn.disable()
    assert F.scaled_dot_product_attention is original
    fused_attn.disable()  # idempotent
    assert F.scaled_dot_product_attention is original


def test_a_function_patched_in_by_someone_else_is_restored_and_serves_the_fallback(spy, monkeypatch):
    seen = []

    def theirs(*args, **kwargs):
        seen.append(1)
        return TORCH_SDPA(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", theirs)
    with fused_attn.patch_sdpa():
        F.scaled_dot_product_attention(*(randn(1, 1, 4, 300) for _ in range(3)))  # fused_attn cannot serve
        F.scaled_dot_product_attention(*(randn(1, 1, 4, D) for _ in range(3)))
    assert F.scaled_dot_product_attention is theirs and seen == [1] and spy == [1]


def test_names_imported_before_patching_keep_torchs_function(spy):
    from torch.nn.functional import scaled_dot_product_attention as imported_before

    with fused_attn.patch_sdpa():
        assert imported_before is TORCH_SDPA
        imported_before(*(randn(1, 1, 4, D) for _ in range(3)))
    assert spy == []


def test_patched_torch_multihead_attention_runs_fused(spy):
    mha = torch.nn.MultiheadAttention(32, 2, device=DEVICE)  # training mode: no native fast path
    x = torch.randn(9, 2, 32, device=DEVICE)
    expected, _ = mha(x, x, x, need_weights=False)
    with fused_attn.patch_sdpa():
        out, _ = mha(x, x, x, need_weights=False)
    assert len(spy) == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_patched_falls_back_to_torch_when_fused_attn_cannot_serve(spy, monkeypatch):
    q, k, v = (torch.randn(1, 2, 5, 300, device=DEVICE) for _ in range(3))  # head dim > 256
    with pytest.raises(ValueError, match="head dim"):
        fused_attn.scaled_dot_product_attention(q, k, v)
    spy.clear()
    with fused_attn.patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert spy == []
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True))

    if "triton" in fused_attn.available_backends():  # a forced backend that refuses: BackendError
        monkeypatch.setenv("FUSED_ATTN_BACKEND", "triton")
        q, k, v = (torch.randn(1, 2, 5, 16, dtype=torch.float64, device=DEVICE) for _ in range(3))
        with pytest.raises(fused_attn.BackendError):
            fused_attn.scaled_dot_product_attention(q, k, v)
        spy.clear()
        with fused_attn.patch_sdpa():
            out = F.scaled_dot_product_attention(q, k, v)
        assert spy == []
        torch.testing.assert_close(out, TORCH_SDPA(q, k, v))


def test_patched_invalid_calls_raise_torchs_own_error(spy):
    q = torch.randn(2, 4, 5, 16, device=DEVICE)
    k = torch.randn(2, 2, 5, 16, device=DEVICE)
    with pytest.raises(RuntimeError) as torch_error:
        TORCH_SDPA(q, k, k)
    with fused_attn.patch_sdpa(), pytest.raises(RuntimeError) as patched_error:
        F.scaled_dot_product_attention(q, k, k)
    assert str(patched_error.value) == str(torch_error.value)


def test_torch_func_transforms_through_the_patch(spy):
    """Inside torch.func transforms patched code keeps torch's function (which also gives second
    derivatives, unlike fused_attn's): the same Jacobian as unpatched."""
    q, k, v = (t.detach() for t in (randn(1, 2, 3, D), randn(1, 2, 4, D), randn(1, 2, 4, D)))

    def f(q):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(-1)

    expected = torch.func.jacrev(f)(q)
    with fused_attn.patch_sdpa():
        patched = torch.func.jacrev(f)(q)
        assert len(spy) == 0
        F.scaled_dot_product_attention(q, k, v)  # outside the transform: fused_attn's
        assert len(spy) == 1
    torch.testing.assert_close(patched, expected)


def test_compile_fullgraph_through_the_patch(spy):
    torch._dynamo.reset()
    q, k, v = randn(1, 4, LQ, D), randn(1, 2, LK, D), randn(1, 2, LK, D)

    def loss(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum()

    expected = torch.autograd.grad(loss(q, k, v), (q, k, v))
    with fused_attn.patch_sdpa():
        compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    torch._dynamo.reset()  # the compiled function traced the patched function
    assert len(spy) >= 1
    for a, b in zip(expected, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_autocast_casts_as_torch_does(spy):
    """Inside torch.autocast, float32 inputs (and a float mask) are cast to its dtype as torch casts
    them for its SDPA, through every entry point; the answer matches torch's there."""
    q, k, v = (t.detach() for t in (randn(2, 2, LQ, D), randn(2, 2, LK, D), randn(2, 2, LK, D)))
    bias = torch.randn(2, 1, LQ, LK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        results = [fused_attn.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                   fused_attn.scaled_dot_product_attention(q.bfloat16(), k, v, attn_mask=bias),  # mixed, as torch
                   fused_attn.attention(q, k, v, attn_mask=bias)]
        with fused_attn.patch_sdpa():
            results.append(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    assert len(spy) == 3  # the SDPA entry points all reached fused_attn
    assert expected.dtype == torch.bfloat16
    for result in results:
        assert result.dtype == torch.bfloat16
        torch.testing.assert_close(result, expected, rtol=2e-2, atol=2e-2)
    assert fused_attn.attention(q, k, v).dtype == torch.float32  # outside: as given


@pytest.mark.parametrize("shapes", [
    ((2, 1, 3), (1, 4, 3)), ((), (5,)), ((0,), (1,)), ((2, 0), (2, 1)), ((7, 1, 1), (3, 1), (1,)),
    ((3,), (4,)), ((0,), (2,)), ((2, 3), (3, 3, 3)), ((1, 1), (1, 1, 1)),
], ids=str)
def test_broadcast_of_shapes_is_torchs(shapes):
    """The patch's own shape broadcasting (torch's function is slow) gives torch's shape, or None
    where torch raises."""
    try:
        expected = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        expected = None
    assert sdpa_module._broadcast(*shapes) == expected


@pytest.mark.parametrize("valid, invalid", [
    (dict(is_causal=True), dict(is_causal=1)),
    (dict(attn_mask="bool"), dict(attn_mask="bool, wrong length")),
], ids=["is_causal", "mask"])
def test_remembered_checks_still_refuse_what_torch_refuses(valid, invalid):
    """The drop-in remembers its checks' conclusion per call signature (plans.py): a call that
    differs only in an argument's type, or a mask's shape, is checked again and raises as torch."""
    q, k, v = (torch.randn(2, 4, 5, 16, device=DEVICE) for _ in range(3))
    masks = {"bool": torch.ones(5, 5, dtype=torch.bool, device=DEVICE),
             "bool, wrong length": torch.ones(5, 4, dtype=torch.bool, device=DEVICE)}
    valid, invalid = ({name: masks.get(value, value) if name == "attn_mask" else value for name, value in kw.items()}
                      for kw in (valid, invalid))
    torch.testing.assert_close(fused_attn.scaled_dot_product_attention(q, k, v, **valid),
                               TORCH_SDPA(q, k, v, **valid))
    with pytest.raises(Exception) as torch_error:
        TORCH_SDPA(q, k, v, **invalid)
    with pytest.raises(type(torch_error.value)):
        fused_attn.scaled_dot_product_attention(q, k, v, **invalid)
