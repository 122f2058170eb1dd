"""Bad input raises a clear exception naming the argument, before any backend runs."""
import numpy
import pytest
import torch

from conftest import DEVICE

import fused_attn


def qkv(q_shape=(1, 4, 8, 16), k_shape=(1, 2, 10, 16), v_shape=(1, 2, 10, 16), dtype=torch.float32):
    return [torch.randn(s, dtype=dtype, device=DEVICE) for s in (q_shape, k_shape, v_shape)]


BAD_SHAPES = [
    ((4, 8, 16), (1, 2, 10, 16), (1, 2, 10, 16), r"q must have 4 dimensions"),
    ((1, 4, 8, 16), (2, 10, 16), (1, 2, 10, 16), r"k must have 4 dimensions"),
    ((1, 4, 8, 16), (1, 2, 10, 16), (1, 1, 2, 10, 16), r"v must have 4 dimensions"),
    ((2, 4, 8, 16), (1, 2, 10, 16), (1, 2, 10, 16), r"batch size"),
    ((1, 4, 8, 16), (1, 2, 10, 16), (1, 4, 10, 16), r"k and v must have the same number of heads"),
    ((1, 4, 8, 16), (1, 2, 10, 16), (1, 2, 11, 16), r"k and v must have the same sequence length"),
    ((1, 3, 8, 16), (1, 2, 10, 16), (1, 2, 10, 16), r"query heads \(3\) must be a multiple .* \(2\)"),
    ((1, 4, 8, 16), (1, 0, 10, 16), (1, 0, 10, 16), r"multiple of the number of key/value heads \(0\)"),
    ((1, 4, 8, 16), (1, 2, 10, 32), (1, 2, 10, 16), r"q and k must have the same head dim"),
    ((1, 4, 8, 0), (1, 2, 10, 0), (1, 2, 10, 16), r"q/k head dim must be between 1 and 256, got 0"),
    ((1, 4, 8, 257), (1, 2, 10, 257), (1, 2, 10, 16), r"q/k head dim must be between 1 and 256, got 257"),
    ((1, 4, 8, 16), (1, 2, 10, 16), (1, 2, 10, 300), r"v head dim must be between 1 and 256, got 300"),
]


@pytest.mark.parametrize("q_shape, k_shape, v_shape, message", BAD_SHAPES)
def test_bad_shapes(q_shape, k_shape, v_shape, message):
    with pytest.raises(ValueError, match=message):
        fused_attn.attention(*qkv(q_shape, k_shape, v_shape))


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="share one dtype"):
        fused_attn.attention(q, k.half(), v)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn], ids=str)
def test_unsupported_dtypes(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        fused_attn.attention(q.to(dtype), k.to(dtype), v.to(dtype))


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        fused_attn.attention(q, k.tolist(), v)


def test_mixed_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        fused_attn.attention(q, k.to("meta"), v)


@pytest.mark.parametrize("keywords, error, message", [
    (dict(causal_alignment="top-left"), ValueError, r"causal_alignment must be one of"),
    (dict(causal=1), TypeError, r"causal must be a bool"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite number"),
    (dict(scale="0.1"), ValueError, r"scale must be a finite number"),
    # The kernels compute in float32: 1e39 overflowed to NaN outputs; a softcap of 1e-46 rounded to
    # 0 (none) in the cpu backend while the others applied it.
    (dict(scale=-1e39), ValueError, r"scale must be within float32's range"),
    (dict(softcap=1e39), ValueError, r"softcap must be 0 \(none\) or a float32 number"),
    (dict(softcap=1e-46), ValueError, r"softcap must be 0 \(none\) or a float32 number"),
    (dict(deterministic=None), TypeError, r"deterministic must be a bool"),
    (dict(return_lse="yes"), TypeError, r"return_lse must be a bool"),
    (dict(backend="flash"), ValueError, r"backend must be one of \['cpu', 'cuda', 'reference', 'triton'\]"),
])
@pytest.mark.parametrize("function", [fused_attn.attention, fused_attn.explain], ids=["attention", "explain"])
def test_bad_keywords(function, keywords, error, message):
    """explain checks its input as the call it explains would."""
    with pytest.raises(error, match=message):
        function(*qkv(), **keywords)


def test_unknown_keyword_is_rejected():
    with pytest.raises(TypeError):
        fused_attn.attention(*qkv(), is_causal=True)


@pytest.mark.parametrize("to_scalar", [numpy.float32, numpy.float64, torch.tensor], ids=["np.float32", "np.float64",
                                                                                        "0-d tensor"])
def test_scalars_of_numpy_and_0d_tensors(to_scalar):
    """scale, softcap and dropout_p as NumPy numbers or 0-d tensors, as torch's SDPA takes them: the
    same call as with Python floats (the same dropout bits under the same seed)."""
    q, k, v = qkv()
    keywords = dict(scale=0.5, softcap=4.0, dropout_p=0.25)
    outputs = []
    for convert in (float, to_scalar):
        torch.manual_seed(3)
        outputs.append(fused_attn.attention(q, k, v, **{name: convert(value) for name, value in keywords.items()}))
        torch.manual_seed(3)
        outputs.append(fused_attn.scaled_dot_product_attention(q, k, v, dropout_p=convert(0.25), scale=convert(0.5),
                                                               enable_gqa=True))
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])
