"""The interpreter's bounds check (interpreter_bounds.py), which every interpreted kernel in the
suite runs under, catches what it must: reads, writes and atomics past a tensor's elements."""
import pytest
import torch
import triton
import triton.language as tl

from conftest import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="checks Triton's interpreter")


@triton.jit
def _copy(src, dst, n, shift, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    if MASKED:
        tl.store(dst + offsets, tl.load(src + offsets + shift, mask=offsets + shift < n), mask=offsets < n)
    else:
        tl.store(dst + offsets, tl.load(src + offsets + shift))


@triton.jit
def _accumulate(src, total, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.atomic_add(total + offsets, tl.load(src + offsets, mask=offsets < n, other=0.0))


def test_masked_accesses_pass():
    src = torch.randn(10)
    dst = torch.full((10,), float("nan"))
    _copy[(1,)](src, dst, 10, 0, BLOCK=16, MASKED=True)
    assert torch.equal(dst, src)


@pytest.mark.parametrize("shift", [0, 3])
def test_unmasked_read_and_write_past_the_end_fail(shift):
    storage = torch.randn(64)
    src, dst = storage[:10], torch.empty(16)  # src's storage goes on: only its own elements count
    with pytest.raises(Exception, match=r"_copy: load of \d+ element\(s\) outside every tensor argument.*src"):
        _copy[(1,)](src, dst, 10, shift, BLOCK=16, MASKED=False)
    with pytest.raises(Exception, match=r"_copy: store of 6 element\(s\) outside.*dst"):
        _copy[(1,)](storage, dst[:10], 10, 0, BLOCK=16, MASKED=False)


def test_read_before_a_view_fails():
    storage = torch.randn(32)
    with pytest.raises(Exception, match="load of 1 element"):
        _copy[(1,)](storage[5:21], torch.empty(16), 16, -1, BLOCK=16, MASKED=True)


def test_atomic_past_the_end_fails():
    src = torch.randn(16)
    with pytest.raises(Exception, match=r"_accumulate: atomic update of 8 element\(s\) outside.*total"):
        _accumulate[(1,)](src, torch.zeros(8), 16, BLOCK=16)
    total = torch.zeros(16)
    _accumulate[(1,)](src, total, 16, BLOCK=16)
    assert torch.equal(total, src)
