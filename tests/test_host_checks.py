"""When the checks that read tensor values on the host run (fused_attn/host_checks.py): varlen's
cu_seqlens, a KV cache's lengths and pages. On GPUs such a read is a sync, so each GPU tensor is
checked once per version (the layers of a model share one per step), and not at all where a sync
is impossible. Without a GPU the remembering is switched on for CPU tensors, and the reads counted.
"""
import pytest
import torch

import fused_attn
from fused_attn import host_checks

B, HQ, HKV, D, CAPACITY = 2, 4, 2, 16, 32


def test_skipped_only_where_a_sync_is_impossible_or_turned_off(monkeypatch):
    """Capturing a CUDA graph forbids a device-to-host transfer, so the checks are skipped there
    (and while torch.compile traces), and for GPU calls where FUSED_ATTN_HOST_CHECKS=0 asks;
    everywhere else they run."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not host_checks.skipped(cpu)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not host_checks.skipped(cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert host_checks.skipped(cuda)
    assert not host_checks.skipped(cpu)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv(host_checks.VARIABLE, "0")  # turned off by the user: GPU calls only
    assert host_checks.skipped(cuda)
    assert not host_checks.skipped(cpu)


@pytest.fixture
def reads(monkeypatch):
    """Remember checks of CPU tensors as of GPU ones, and count the values read on the host."""
    monkeypatch.setattr(host_checks, "_passed", {})
    monkeypatch.setattr(host_checks, "costs_a_sync", lambda t: True)
    count = [0]
    read = host_checks.read

    def counted(t):
        count[0] += 1
        return read(t)

    monkeypatch.setattr(host_checks, "read", counted)
    return count


def test_gpu_tensors_are_remembered_with_a_version_counter_or_where_the_kernels_judge():
    cpu = torch.zeros(3, dtype=torch.int32)
    meta = torch.zeros(3, dtype=torch.int32, device="meta")  # stands for a GPU tensor
    assert not host_checks._remembered((cpu, None), False)
    assert host_checks._remembered((cpu, meta), False)
    with torch.inference_mode():
        assert not host_checks._remembered((torch.zeros(3, device="meta"),), False)
        assert host_checks._remembered((torch.zeros(3, device="meta"),), True)
        assert not host_checks._remembered((torch.zeros(3),), True)


def packed(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def test_cu_seqlens_are_read_once_per_version(reads):
    """The layers of a model pass the same cu_seqlens: only the first call reads them. An in-place
    change is a new version, read and checked again; so is another tensor with the same values."""
    lengths = [3, 5]
    q, k, v = (torch.randn(8, HQ if name == "q" else HKV, D) for name in "qkv")
    cu_q, cu_k = packed(lengths), packed(lengths)
    for _ in range(3):
        fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 5, 5)
    assert reads[0] == 2
    cu_q[2] = 9  # past the 8 packed rows
    with pytest.raises(ValueError, match="cu_seqlens_q ends at 9, past the 8 packed tokens"):
        fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 5, 5)
    cu_q[2] = 8
    fused_attn.varlen_attention(q, k, v, cu_q, cu_k, 5, 5)
    fused_attn.varlen_attention(q, k, v, packed(lengths), cu_k, 5, 5)
    assert reads[0] == 5


def test_a_changed_fact_is_checked_again(reads):
    """What a check depended on besides the tensor (here max_seqlen_q) is part of what is remembered."""
    q, k, v = (torch.randn(8, HQ if name == "q" else HKV, D) for name in "qkv")
    cu = packed([3, 5])
    fused_attn.varlen_attention(q, k, v, cu, cu, 5, 5)
    with pytest.raises(ValueError, match=r"max_seqlen_q \(4\) is shorter than the longest sequence \(5\)"):
        fused_attn.varlen_attention(q, k, v, cu, cu, 4, 5)


def kvcache_inputs():
    q = torch.randn(B, 1, HQ, D)
    k_cache, v_cache = torch.randn(B, CAPACITY, HKV, D), torch.randn(B, CAPACITY, HKV, D)
    return q, k_cache, v_cache


def test_cache_seqlens_are_read_once_per_version(reads):
    """A decoding step's layers share cache_seqlens: one read per step; the step's in-place
    increment is a new version, read and checked again (and refused once past the capacity)."""
    q, k_cache, v_cache = kvcache_inputs()
    seqlens = torch.tensor([CAPACITY - 2, 4], dtype=torch.int32)
    for step in range(3):
        for layer in range(4):
            fused_attn.attention_with_kvcache(q, k_cache, v_cache, seqlens)
        assert reads[0] == step + 1
        seqlens += 1
    with pytest.raises(ValueError, match=r"cache_seqlens \+ new tokens \(33\) exceeds the cache capacity \(32\)"):
        fused_attn.attention_with_kvcache(q, k_cache, v_cache, seqlens)


def test_a_block_table_changed_in_place_is_checked_again(reads):
    """Pages are remembered with the lengths: a table entry rewritten in place to a page that does
    not exist is refused at the next call."""
    q, k_cache, v_cache = kvcache_inputs()
    pages_k, pages_v = k_cache.reshape(B * 4, 8, HKV, D), v_cache.reshape(B * 4, 8, HKV, D)
    table = torch.arange(B * 4, dtype=torch.int32).reshape(B, 4)
    seqlens = torch.tensor([20, 9], dtype=torch.int32)
    for _ in range(2):
        fused_attn.attention_with_kvcache(q, pages_k, pages_v, seqlens, block_table=table)
    assert reads[0] == 1
    table[1, 1] = 8
    with pytest.raises(ValueError, match="block_table points past the 8 pages of k_cache"):
        fused_attn.attention_with_kvcache(q, pages_k, pages_v, seqlens, block_table=table)


@pytest.fixture
def kernels_judge(monkeypatch, request):
    """The cpu backend stands for one whose kernels judge a cache's lengths and pages (or not)."""
    monkeypatch.setattr(fused_attn.backends.BACKENDS["cpu"], "judges_cache_values", request.param)
    return request.param


@pytest.mark.parametrize("kernels_judge", [False, True], indirect=True, ids=["host-judges", "kernels-judge"])
def test_inference_tensors_are_checked_once_only_where_the_kernels_judge(reads, kernels_judge):
    """torch.inference_mode's tensors have no version counter, so an in-place change cannot be
    seen: a KV cache's lengths are checked on every call, or, for backends whose kernels check
    them as they read (triton, cuda: NaN rows, tests/test_kvcache.py), the first time each tensor
    is seen; a new tensor is checked again."""
    with torch.inference_mode():
        q, k_cache, v_cache = kvcache_inputs()
        seqlens = torch.tensor([5, 4], dtype=torch.int32)
        for _ in range(3):
            fused_attn.attention_with_kvcache(q, k_cache, v_cache, seqlens)
        assert reads[0] == (1 if kernels_judge else 3)
        seqlens += CAPACITY
        if not kernels_judge:
            with pytest.raises(ValueError, match="exceeds the cache capacity"):
                fused_attn.attention_with_kvcache(q, k_cache, v_cache, seqlens)
        with pytest.raises(ValueError, match="exceeds the cache capacity"):
            fused_attn.attention_with_kvcache(q, k_cache, v_cache, seqlens.clone())


def test_inference_cu_seqlens_are_checked_once_then_judged_on_the_device(reads):
    """cu_seqlens made under inference_mode are read at their first call; after that an in-place
    change cannot be seen, so the call judges them on the device: invalid ones give NaN."""
    with torch.inference_mode():
        q, k, v = (torch.randn(8, HQ if name == "q" else HKV, D) for name in "qkv")
        cu = packed([3, 5])
        first = fused_attn.varlen_attention(q, k, v, cu, cu, 5, 5)
        for _ in range(2):
            assert torch.equal(fused_attn.varlen_attention(q, k, v, cu, cu, 5, 5), first)
        assert reads[0] == 1  # as cu_seqlens_q; as cu_seqlens_k it is the same tensor with the same facts
        cu[1] = 6  # lengths 6 and 2
        assert fused_attn.varlen_attention(q, k, v, cu, cu, 5, 5).isnan().all()  # 6 > max_seqlen 5
        assert torch.isfinite(fused_attn.varlen_attention(q, k, v, cu, cu, 6, 6)).all()  # new facts: read again
        assert reads[0] == 2
