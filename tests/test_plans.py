"""Remembered plans (fused_attn/plans.py): a call like an earlier one skips its checks and backend
choice, and nothing else does. Every check must still fire after a call that passed, for any
argument that differs, however equal it compares; the values of cu_seqlens and cache_seqlens are
checked on every call."""
import pytest
import torch

from conftest import DEVICE

import fused_attn
from fused_attn import dispatch, plans


def qkv(dtype=torch.float32, requires_grad=False):
    return [torch.randn(1, 4, 8, 16, dtype=dtype, device=DEVICE, requires_grad=requires_grad),
            *(torch.randn(1, 2, 10, 16, dtype=dtype, device=DEVICE, requires_grad=requires_grad) for _ in range(2))]


@pytest.fixture
def choices(monkeypatch):
    """The backend choices made (dispatch.select_backend calls), in order."""
    made = []
    select = dispatch.select_backend

    def spy(*args, **kwargs):
        made.append(select(*args, **kwargs))
        return made[-1]

    for module in ("api", "varlen", "kvcache"):
        monkeypatch.setattr(f"fused_attn.{module}.select_backend", spy)
    return made


def test_a_repeated_call_skips_the_checks_and_gives_the_same_result(choices):
    q, k, v = qkv()
    first = fused_attn.attention(q, k, v, causal=True, window=(3, 0))
    again = fused_attn.attention(q, k, v, causal=True, window=(3, 0))
    assert len(choices) == 1 and len(plans._plans) == 1
    assert torch.equal(first, again)
    # New tensors of the same shapes, strides, dtype and device take the plan too.
    fused_attn.attention(*qkv(), causal=True, window=(3, 0))
    assert len(choices) == 1
    # So do other layouts (no check looks at strides), with the same result as laid out before.
    sequence_major = fused_attn.attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, causal=True,
                                          window=(3, 0))
    assert len(choices) == 1 and torch.equal(sequence_major, first)
    # Another keyword value is another call.
    fused_attn.attention(q, k, v, causal=True, window=(4, 0))
    assert len(choices) == 2


def test_the_sdpa_drop_in_plans_a_call_once_for_both_entry_points(choices):
    """The drop-in keeps `attention`'s plan inside its own: a repeated call chooses no backend again,
    is_causal with a mask included (their union is rebuilt per call, as a mask of its own shape)."""
    q, k, v = qkv()
    mask = torch.rand(1, 1, 8, 10, device=DEVICE) < 0.7
    sdpa = fused_attn.scaled_dot_product_attention
    first = sdpa(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)
    assert len(choices) == 1
    again = sdpa(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)
    other = torch.rand(1, 1, 8, 10, device=DEVICE) < 0.3
    with_other_mask = sdpa(q, k, v, attn_mask=other, is_causal=True, enable_gqa=True)
    assert len(choices) == 1
    assert torch.equal(first, again)
    expected = fused_attn.attention(q, k, v, attn_mask=other & torch.ones(8, 10, dtype=torch.bool,
                                                                          device=DEVICE).tril())
    torch.testing.assert_close(with_other_mask, expected)
    sdpa(q, k, v, attn_mask=mask, enable_gqa=True)  # another is_causal is another call
    assert len(choices) == 3  # (the direct attention call above made one)


EQUAL_BUT_INVALID = [  # (a keyword that passes, one that compares equal and must still fail)
    ({"causal": True}, {"causal": 1}, TypeError, "causal must be a bool"),
    ({"window": (3, 0)}, {"window": (3.0, 0)}, TypeError, "window must be a pair of ints"),
    ({"scale": 1}, {"scale": True}, ValueError, "scale must be a finite number"),
    ({"dropout_p": 0}, {"dropout_p": False}, TypeError, "dropout_p must be a number"),
    ({"softcap": 1}, {"softcap": True}, TypeError, "softcap must be a number"),
    ({"return_lse": False}, {"return_lse": 0}, TypeError, "return_lse must be a bool"),
    ({"deterministic": True}, {"deterministic": 1}, TypeError, "deterministic must be a bool"),
]


@pytest.mark.parametrize("valid, invalid, error, message", EQUAL_BUT_INVALID)
def test_an_equal_value_of_another_type_is_checked_again(valid, invalid, error, message):
    q, k, v = qkv()
    fused_attn.attention(q, k, v, **valid)
    with pytest.raises(error, match=message):
        fused_attn.attention(q, k, v, **invalid)


def test_tensors_that_differ_in_any_property_are_checked_again():
    q, k, v = qkv()
    slopes = torch.rand(4, device=DEVICE)
    mask = torch.rand(1, 1, 8, 10, device=DEVICE) > 0.3
    fused_attn.attention(q, k, v, alibi_slopes=slopes, attn_mask=mask)
    with pytest.raises(ValueError, match="alibi_slopes are not differentiated"):
        fused_attn.attention(q, k, v, alibi_slopes=slopes.clone().requires_grad_(), attn_mask=mask)
    with pytest.raises(TypeError, match="alibi_slopes must be float32"):
        fused_attn.attention(q, k, v, alibi_slopes=slopes.double(), attn_mask=mask)
    with pytest.raises(ValueError, match="does not broadcast"):
        fused_attn.attention(q, k, v, alibi_slopes=slopes, attn_mask=mask[..., :9])
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        fused_attn.attention(q, k, v, alibi_slopes=slopes, attn_mask=mask.to(torch.int8))
    with pytest.raises(TypeError, match="share one dtype"):
        fused_attn.attention(q, k.half(), v.half(), alibi_slopes=slopes, attn_mask=mask)


def test_the_backend_variable_is_read_on_every_call(monkeypatch, choices):
    q, k, v = qkv()
    fused_attn.attention(q, k, v)
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "reference")
    fused_attn.attention(q, k, v)
    assert choices[-1] == "reference"
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FUSED_ATTN_BACKEND environment variable must be one of"):
        fused_attn.attention(q, k, v)


def test_a_tensor_scale_is_read_on_every_call():
    """A 0-d tensor scale is not kept in a key (its value can change in place): the call is
    checked, and its scale read, every time."""
    q, k, v = qkv()
    scale = torch.tensor(0.5)
    assert plans.signature("attention", (q, k, v), (scale,)) is None
    first = fused_attn.attention(q, k, v, scale=scale)
    scale.fill_(0.25)
    second = fused_attn.attention(q, k, v, scale=scale)
    assert torch.equal(first, fused_attn.attention(q, k, v, scale=0.5))
    assert torch.equal(second, fused_attn.attention(q, k, v, scale=0.25))
    assert not torch.equal(first, second)


def test_no_plan_is_kept_for_lists_subclasses_or_traced_calls():
    q, k, v = qkv()
    assert plans.signature("attention", (q, k, v), ([3, 0],)) is None
    assert plans.signature("attention", (q, k, v), ((3, [0]),)) is None
    assert plans.signature("attention", (q, k, 1), ()) is None

    class Marked(torch.Tensor):
        pass

    assert plans.signature("attention", (q.as_subclass(Marked), k, v), ()) is None
    assert plans.signature("attention", (torch.nn.Parameter(q), k, v), ()) is not None

    def traced(q, k, v):
        assert plans.signature("attention", (q, k, v), ()) is None
        return fused_attn.attention(q, k, v)

    torch.jit.trace(traced, (q, k, v), check_trace=False)
    assert plans._plans == {}


def test_failed_calls_keep_nothing_and_the_plans_stay_few(monkeypatch):
    q, k, v = qkv()
    with pytest.raises(ValueError):
        fused_attn.attention(q, k, v, window=(-2, 0))
    assert plans._plans == {}
    monkeypatch.setattr(plans, "_MAX_PLANS", 4)
    for left in range(10):
        fused_attn.attention(q, k, v, window=(left, 0))
        assert 1 <= len(plans._plans) <= 4


def test_varlen_checks_cu_seqlens_values_on_every_call(choices):
    q, k, v = (torch.randn(10, 2, 16, device=DEVICE) for _ in range(3))
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    fused_attn.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, 6, 6)
    fused_attn.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, 6, 6)
    assert len(choices) == 1
    bad = torch.tensor([0, 7, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"max_seqlen_q \(6\) is shorter than the longest sequence \(7\)"):
        fused_attn.varlen_attention(q, k, v, bad, cu_seqlens, 6, 6)
    cu_seqlens[1] = 11  # in place: the same tensor, a new version
    with pytest.raises(ValueError, match="must be non-decreasing"):
        fused_attn.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, 11, 11)
    with pytest.raises(TypeError, match="max_seqlen_q must be an int"):
        fused_attn.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, 6.0, 6)


def test_kvcache_checks_lengths_and_pages_on_every_call(choices):
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    k_cache, v_cache = (torch.randn(2, 12, 2, 16, device=DEVICE) for _ in range(2))
    lengths = torch.tensor([5, 12], dtype=torch.int32, device=DEVICE)
    fused_attn.attention_with_kvcache(q, k_cache, v_cache, lengths)
    fused_attn.attention_with_kvcache(q, k_cache, v_cache, lengths)
    assert len(choices) == 1
    with pytest.raises(ValueError, match=r"cache_seqlens \+ new tokens \(13\) exceeds the cache capacity \(12\)"):
        fused_attn.attention_with_kvcache(q, k_cache, v_cache, lengths + 1)
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        fused_attn.attention_with_kvcache(q, k_cache, v_cache, 13)
    with pytest.raises(TypeError, match="cache_seqlens must be an int or an int32 tensor"):
        fused_attn.attention_with_kvcache(q, k_cache, v_cache, lengths.long())
    pages = k_cache.reshape(6, 4, 2, 16)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=DEVICE)
    fused_attn.attention_with_kvcache(q, pages, pages, lengths, block_table=table)
    with pytest.raises(ValueError, match="block_table points past the 6 pages"):
        fused_attn.attention_with_kvcache(q, pages, pages, lengths, block_table=table + 1)


def test_sparse_and_nested_tensors_are_refused_even_after_a_dense_call():
    """A sparse tensor has the shape, dtype and device of a dense one: its layout is in the key, and
    the checks refuse it by name (as a nested tensor, which has no shape at all)."""
    q, k, v = qkv()
    fused_attn.attention(q, k, v)
    with pytest.raises(TypeError, match=r"q must be a dense \(strided\) tensor, got a torch.sparse_coo"):
        fused_attn.attention(q.to_sparse(), k, v)
    nested = torch.nested.nested_tensor([k[0], k[0, :, :7]])
    with pytest.raises(TypeError, match=r"k must be a dense \(strided\) tensor, got a nested tensor"):
        fused_attn.attention(q, nested, v)
    mask = torch.ones(8, 10, dtype=torch.bool, device=DEVICE)
    fused_attn.attention(q, k, v, attn_mask=mask)
    with pytest.raises(TypeError, match="attn_mask must be a dense"):
        fused_attn.attention(q, k, v, attn_mask=mask.to_sparse())
    k_cache = torch.randn(1, 12, 2, 16, device=DEVICE)
    lengths = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    fused_attn.attention_with_kvcache(q[:, :, :1].transpose(1, 2), k_cache, k_cache, lengths)
    with pytest.raises(TypeError, match="k_cache must be a dense"):
        fused_attn.attention_with_kvcache(q[:, :, :1].transpose(1, 2), k_cache.to_sparse(), k_cache, lengths)
    packed = torch.randn(10, 2, 16, device=DEVICE)
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    fused_attn.varlen_attention(packed, packed, packed, cu_seqlens, cu_seqlens, 6, 6)
    with pytest.raises(TypeError, match="cu_seqlens_k must be a dense"):
        fused_attn.varlen_attention(packed, packed, packed, cu_seqlens, cu_seqlens.to_sparse(), 6, 6)
