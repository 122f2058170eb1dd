"""fused_attn.nn.MultiheadAttention against torch.nn.MultiheadAttention, and fused_attn.nn.Attention.

torch's module in float64 (same state dict) is the ground truth and in float32 the low-precision
reference of the accuracy rule. Bug classes: the opposite bool-mask convention of
nn.MultiheadAttention, merging key_padding_mask with attn_mask, 2-D vs (N * H)-row 3-D masks,
bias_k/bias_v and zero-attention columns that must stay unmasked, the is_causal hint, kdim/vdim,
seq-first vs batch_first layouts, unbatched inputs, state_dict compatibility, compile and export.
"""
import io

import pytest
import torch

from conftest import DEVICE
from oracle import assert_accurate

import fused_attn
from fused_attn.nn import Attention, MultiheadAttention

E, H, N, L, S = 32, 2, 2, 9, 11


def make_pair(**config):
    """(ours float32, torch float64, torch float32) with one random state dict (non-zero biases)."""
    reference = torch.nn.MultiheadAttention(E, H, device=DEVICE, dtype=torch.float64, **config)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "bias" in name:
                parameter.normal_(0, 0.3)
    ours = MultiheadAttention(E, H, device=DEVICE, **config)
    ours.load_state_dict(reference.state_dict())
    low = torch.nn.MultiheadAttention(E, H, device=DEVICE, **config)
    low.load_state_dict(reference.state_dict())
    return ours, reference, low


def bool_key_padding(batch, length):
    mask = torch.rand(batch, length, device=DEVICE) > 0.7  # True = padding (ignored)
    mask[:, 0] = False
    return mask


def check_mha(config, inputs, kinds, **forward):
    """Outputs and gradients (inputs and every parameter) of the need_weights=False path.

    inputs: the distinct input tensors; kinds: how they are passed ("qkv" self-attention, "q_kv"
    shared key/value, "q_k_v" three tensors).
    """
    ours, reference, low = make_pair(**config)

    def call(module, tensors, dtype):
        tensors = [t.detach().to(dtype).requires_grad_() for t in tensors]
        args = {"qkv": lambda t: (t[0], t[0], t[0]), "q_kv": lambda t: (t[0], t[1], t[1]),
                "q_k_v": lambda t: tuple(t)}[kinds](tensors)
        masks = {name: (m.to(dtype) if m is not None and m.is_floating_point() else m) for name, m in forward.items()
                 if name in ("attn_mask", "key_padding_mask")}
        other = {name: value for name, value in forward.items() if name not in masks}
        out, weights = module(*args, need_weights=False, **masks, **other)
        assert weights is None
        return out, tensors

    out, leaves = call(ours, inputs, torch.float32)
    dout = torch.randn_like(out)
    names = [name for name, _ in ours.named_parameters()]
    grads = torch.autograd.grad(out, leaves + [p for _, p in ours.named_parameters()], dout)
    results = {}
    for module, dtype in ((reference, torch.float64), (low, torch.float32)):
        ref_out, ref_leaves = call(module, inputs, dtype)
        params = dict(module.named_parameters())
        results[dtype] = ref_out, torch.autograd.grad(ref_out, ref_leaves + [params[n] for n in names], dout.to(dtype))
    (exact, exact_grads), (lowp, low_grads) = results[torch.float64], results[torch.float32]
    assert out.shape == exact.shape
    assert_accurate("out", out, exact, lowp, torch.float32)
    for name, grad, e, lo in zip([f"d{i}" for i in range(len(leaves))] + names, grads, exact_grads, low_grads):
        assert_accurate(name, grad, e, lo, torch.float32)


def seq(length, batch_first, dim=E):
    return torch.randn(*((N, length) if batch_first else (length, N)), dim, device=DEVICE)


def causal_bool(length_q, length_k):
    return torch.ones(length_q, length_k, dtype=torch.bool, device=DEVICE).triu(1)  # True = masked out


MHA_CASES = {
    "self-attention, seq-first": lambda: ({}, [seq(L, False)], "qkv", {}),
    "self-attention, batch_first, bool key_padding_mask": lambda: (
        dict(batch_first=True), [seq(L, True)], "qkv", dict(key_padding_mask=bool_key_padding(N, L))),
    "cross-attention, kdim/vdim": lambda: (
        dict(kdim=24, vdim=20, batch_first=True), [seq(L, True), seq(S, True, 24), seq(S, True, 20)], "q_k_v",
        dict(key_padding_mask=bool_key_padding(N, S))),
    "add_bias_kv, add_zero_attn, both masks bool": lambda: (
        dict(add_bias_kv=True, add_zero_attn=True), [seq(L, False), seq(S, False)], "q_kv",
        dict(key_padding_mask=bool_key_padding(N, S), attn_mask=torch.rand(L, S, device=DEVICE) > 0.8)),
    "float 3-D attn_mask (N * H, L, S), float key_padding_mask": lambda: (
        dict(batch_first=True), [seq(L, True), seq(S, True), seq(S, True)], "q_k_v",
        dict(attn_mask=torch.randn(N * H, L, S, device=DEVICE),
             key_padding_mask=torch.randn(N, S, device=DEVICE))),
    "bool 3-D attn_mask": lambda: (
        {}, [seq(L, False), seq(S, False)], "q_kv",
        dict(attn_mask=(torch.rand(N * H, L, S, device=DEVICE) > 0.7).index_fill_(2, torch.tensor([0], device=DEVICE), False))),
    "is_causal hint without key_padding_mask": lambda: (
        dict(batch_first=True), [seq(L, True)], "qkv", dict(attn_mask=causal_bool(L, L), is_causal=True)),
    "is_causal hint with key_padding_mask": lambda: (
        {}, [seq(L, False)], "qkv",
        dict(attn_mask=causal_bool(L, L), is_causal=True, key_padding_mask=bool_key_padding(N, L))),
    "unbatched": lambda: (
        dict(batch_first=True), [torch.randn(L, E, device=DEVICE), torch.randn(S, E, device=DEVICE)], "q_kv",
        dict(key_padding_mask=bool_key_padding(1, S)[0], attn_mask=torch.randn(L, S, device=DEVICE))),
    "no bias, zero attention only": lambda: (
        dict(bias=False, add_zero_attn=True), [seq(L, False), seq(S, False), seq(S, False)], "q_k_v", {}),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_parity(case):
    config, inputs, kinds, forward = MHA_CASES[case]()
    check_mha(config, inputs, kinds, **forward)


def test_fully_padded_sequence_gives_the_output_bias_like_torch():
    ours, _, low = make_pair(batch_first=True)
    x = seq(L, True)
    padding = bool_key_padding(N, L)
    padding[1] = True  # the second sequence has no keys at all
    out, _ = ours(x, x, x, key_padding_mask=padding, need_weights=False)
    expected, _ = low(x, x, x, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(out[1], ours.out_proj.bias.expand(L, E))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("average", [True, False])
def test_need_weights_returns_torchs_weights(average):
    ours, _, low = make_pair()
    x, memory = seq(L, False), seq(S, False)
    padding = bool_key_padding(N, S)
    out, weights = ours(x, memory, memory, key_padding_mask=padding, average_attn_weights=average)
    expected, expected_weights = low(x, memory, memory, key_padding_mask=padding, average_attn_weights=average)
    assert weights.shape == ((N, L, S) if average else (N, H, L, S))
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(out, expected)


def test_eval_matches_torchs_native_fast_path():
    ours, _, low = make_pair(batch_first=True)
    ours.eval(), low.eval()
    x = seq(L, True)
    padding = bool_key_padding(N, L)
    with torch.no_grad():
        expected, _ = low(x, x, x, key_padding_mask=padding, need_weights=False)
        out, _ = ours(x, x, x, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [{}, dict(kdim=24, vdim=20, add_bias_kv=True, bias=False)], ids=["packed", "separate"])
def test_state_dict_round_trip(config):
    theirs = torch.nn.MultiheadAttention(E, H, device=DEVICE, **config)
    ours = MultiheadAttention(E, H, device=DEVICE, **config)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.MultiheadAttention(E, H, device=DEVICE, **config)
    back.load_state_dict(ours.state_dict())
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor) and torch.equal(ours.state_dict()[name], tensor)
    converted = MultiheadAttention.from_torch(theirs.eval())
    assert not converted.training and converted.batch_first == theirs.batch_first
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor)


def test_dropout_only_in_training_and_seeded():
    ours = MultiheadAttention(E, H, dropout=0.5, batch_first=True, device=DEVICE)
    x = seq(L, True)
    runs = []
    for seed in (3, 3):
        torch.manual_seed(seed)
        runs.append(ours(x, x, x, need_weights=False)[0])
    assert torch.equal(runs[0], runs[1])
    ours.eval()
    evaluated = ours(x, x, x, need_weights=False)[0]
    assert not torch.allclose(runs[0], evaluated)
    ours.dropout = 0.0
    torch.testing.assert_close(ours.train()(x, x, x, need_weights=False)[0], evaluated)


def test_is_causal_requires_attn_mask_like_torch():
    ours, _, low = make_pair()
    x = seq(L, False)
    for module in (low, ours):
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            module(x, x, x, need_weights=False, is_causal=True)


# --- fused_attn.nn.Attention ------------------------------------------------------------------

def test_attention_module_matches_the_function_and_drops_out_only_in_training():
    q, k, v = (torch.randn(2, 4 if i == 0 else 2, 20, 16, device=DEVICE) for i in range(3))
    module = Attention(causal=True, dropout=0.3, window=(6, -1), softcap=5.0, scale=0.4)
    assert "causal=True" in repr(module) and "softcap=5.0" in repr(module)
    module.eval()
    expected = fused_attn.attention(q, k, v, causal=True, window=(6, -1), softcap=5.0, scale=0.4)
    torch.testing.assert_close(module(q, k, v), expected, rtol=0, atol=0)
    module.train()
    torch.manual_seed(9)
    dropped = module(q, k, v)
    torch.manual_seed(9)
    expected = fused_attn.attention(q, k, v, causal=True, window=(6, -1), softcap=5.0, scale=0.4, dropout_p=0.3)
    torch.testing.assert_close(dropped, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dropout"):
        Attention(dropout=1.0)
    with pytest.raises(TypeError, match=r"window must be a pair of ints \(left, right\), got 5"):
        Attention(window=5)


@pytest.mark.parametrize("keywords, error, message", [
    (dict(causal="yes"), TypeError, "causal must be a bool"),
    (dict(causal_alignment="bottom-right"), ValueError, "causal_alignment must be one of"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
    (dict(softcap=-1.0), ValueError, "softcap must be in"),
    (dict(deterministic=None), TypeError, "deterministic must be a bool"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
], ids=str)
def test_attention_module_checks_its_options_when_built(keywords, error, message):
    """A bad option fails where it is given, as dropout and window did, not at the first forward."""
    with pytest.raises(error, match=message):
        Attention(**keywords)


# --- torch.compile and torch.export -----------------------------------------------------------

def test_compile_fullgraph_modules_forward_and_backward():
    torch._dynamo.reset()
    mha = MultiheadAttention(E, H, batch_first=True, add_bias_kv=True, device=DEVICE)
    attn = Attention(causal=True)
    x = seq(L, True).requires_grad_()
    padding = bool_key_padding(N, L)
    q = torch.randn(N, 4, L, 16, device=DEVICE, requires_grad=True)
    kv = torch.randn(N, 2, L, 16, device=DEVICE, requires_grad=True)

    def loss(x, q, kv):
        out, _ = mha(x, x, x, key_padding_mask=padding, need_weights=False)
        return out.square().sum() + attn(q, kv, kv).square().sum()

    leaves = (x, q, kv, mha.in_proj_weight, mha.bias_k)
    eager = torch.autograd.grad(loss(x, q, kv), leaves)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, q, kv), leaves)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = MultiheadAttention(E, H, batch_first=True, device=DEVICE)
        self.attn = Attention(causal=True)

    def forward(self, x, padding):
        out, _ = self.mha(x, x, x, key_padding_mask=padding, need_weights=False)
        heads = out.unflatten(-1, (H, -1)).transpose(1, 2)
        return self.attn(heads, heads, heads)


def test_export_for_inference():
    module = _SelfAttention().eval()
    x = seq(L, True)
    padding = bool_key_padding(N, L)
    program = torch.export.export(module, (x, padding))
    assert "fused_attn.forward" in str(program.graph_module.code)
    x2 = seq(L, True)
    padding2 = bool_key_padding(N, L)
    torch.testing.assert_close(program.module()(x2, padding2), module(x2, padding2), rtol=1e-6, atol=1e-6)


# --- torch.jit.trace: the fused call must be recorded as the fused_attn::forward op ---------------

def test_jit_trace_of_the_modules_forward_backward_and_save():
    """trace's check re-traces under no_grad: the eager path, which chose an autograd.Function
    node when gradients were wanted and the backend's insides otherwise, traced differently."""
    module = _SelfAttention()
    x = seq(L, True).requires_grad_()
    traced = torch.jit.trace(module, (x, bool_key_padding(N, L)), check_trace=True)
    assert str(traced.inlined_graph).count("fused_attn::forward") == 2
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x, padding = seq(L, True).requires_grad_(), bool_key_padding(N, L)
    dout = torch.randn(N, H, L, E // H, device=DEVICE)
    expected = module(x, padding)
    expected_grads = torch.autograd.grad(expected, (x, *module.parameters()), dout)
    for run in (traced, loaded):  # (the loaded module holds copies of the parameters)
        out = run(x, padding)
        assert torch.equal(out, expected)
        grads = torch.autograd.grad(out, (x, *run.parameters()), dout)
        assert len(grads) == len(expected_grads)
        for grad, expected_grad in zip(grads, expected_grads):
            assert torch.equal(grad, expected_grad)


def test_jit_trace_of_attention_module_draws_fresh_dropout_each_call():
    """The dropout seed is drawn by an op of the trace, not baked in: torch.manual_seed
    reproduces a traced call, its gradients included, as it does an eager one."""
    module = Attention(causal=True, dropout=0.3).train()
    q, k, v = (torch.randn(2, 2, 12, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    traced = torch.jit.trace(module, (q, k, v), check_trace=True)
    q, k, v = (torch.randn(2, 2, 12, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 2, 12, 16, device=DEVICE)
    torch.manual_seed(5)
    first, second = traced(q, k, v), traced(q, k, v)
    torch.manual_seed(5)
    expected = module(q, k, v)
    assert torch.equal(first, expected) and not torch.equal(first, second)
    grads = torch.autograd.grad(first, (q, k, v), dout)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, (q, k, v), dout)):
        assert torch.equal(grad, expected_grad)


class _CallsSDPA(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def test_jit_trace_of_patched_sdpa_matches_torch():
    def make_inputs():
        q, k, v = (torch.randn(N, heads, L, 16, device=DEVICE, requires_grad=True) for heads in (4, 2, 2))
        return q, k, v, torch.rand(N, 1, L, L, device=DEVICE) > 0.3

    with fused_attn.patch_sdpa():
        traced = torch.jit.trace(_CallsSDPA(), make_inputs(), check_trace=True)
    assert "fused_attn::forward" in str(traced.graph)
    q, k, v, mask = make_inputs()
    mask[..., 0] = True  # no fully masked row: torch's math kernel gives NaN there
    out = traced(q, k, v, mask)
    expected = _CallsSDPA()(q, k, v, mask)  # torch's own, outside the patch
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, (q, k, v), dout)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masks", [
    dict(key_padding_mask=(7, 3)), dict(attn_mask=(7, 5)), dict(attn_mask=(12, 7, 5)), dict(attn_mask=(1, 7, 5)),
    dict(attn_mask=(1, 5, 7)),  # torch takes a 3-D mask only as (N * H, L, S)
], ids=str)
def test_multihead_masks_of_the_wrong_shape_raise_as_in_torch(masks):
    """A mask of the right size but the wrong shape (transposed) is an error, as in torch, never
    silently reinterpreted as (N, H, L, S)."""
    reference = torch.nn.MultiheadAttention(16, 4)
    fused = fused_attn.nn.MultiheadAttention.from_torch(reference)
    query, key = torch.randn(5, 3, 16), torch.randn(7, 3, 16)
    masks = {name: torch.rand(shape) > 0.5 for name, shape in masks.items()}
    for module in (reference, fused):
        with pytest.raises((RuntimeError, AssertionError), match="shape"):
            module(query, key, key, need_weights=False, **masks)


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.float64], ids=str)
def test_multihead_float_mask_of_another_dtype_raises_as_in_torch(mask_dtype):
    """A float attn_mask must have the query's dtype, as torch's module requires (the fused path
    had cast it), on the fused path and on torch's (need_weights=True) alike."""
    reference = torch.nn.MultiheadAttention(16, 4)
    fused = fused_attn.nn.MultiheadAttention.from_torch(reference)
    query = torch.randn(5, 3, 16)
    mask = torch.randn(5, 5, dtype=mask_dtype)
    with pytest.raises(RuntimeError, match="Expected attn_mask dtype to be bool or float or to match query dtype"):
        reference(query, query, query, attn_mask=mask, need_weights=False)
    with pytest.raises(RuntimeError, match="Expected attn_mask dtype to be bool or float or to match query dtype"):
        fused(query, query, query, attn_mask=mask, need_weights=False)
    with pytest.raises(RuntimeError):
        fused(query, query, query, attn_mask=mask, need_weights=True)
