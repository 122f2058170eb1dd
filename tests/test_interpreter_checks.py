"""The interpreter's checks (interpreter_checks.py), which every interpreted kernel in the suite
runs under, catch what they must: reads, writes and atomics past a tensor's elements, and programs
of one launch that race on an address."""
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


@triton.jit
def _scale_rows(src, dst, n, STEP: tl.constexpr, READ_BACK: tl.constexpr, BLOCK: tl.constexpr):
    """Program p writes 2 * src[p * STEP : p * STEP + BLOCK] to the same place in dst, then (READ_BACK)
    adds what dst holds one element further on."""
    offsets = tl.program_id(0) * STEP + tl.arange(0, BLOCK)
    tl.store(dst + offsets, 2 * tl.load(src + offsets, mask=offsets < n), mask=offsets < n)
    if READ_BACK:
        ahead = tl.load(dst + offsets + 1, mask=offsets + 1 < n)
        tl.store(dst + offsets, tl.load(dst + offsets, mask=offsets < n) + ahead, mask=offsets < n)


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


def test_programs_on_their_own_elements_pass():
    src = torch.randn(40)
    dst = torch.full((40,), float("nan"))
    _scale_rows[(5,)](src, dst, 40, STEP=8, READ_BACK=False, BLOCK=8)
    assert torch.equal(dst, 2 * src)
    # a program reading back what it wrote itself is no race
    _scale_rows[(1,)](src, dst, 8, STEP=8, READ_BACK=True, BLOCK=8)


def test_overlapping_writes_race():
    # programs p and p + 1 overlap on 6 elements: dst[2:14] is written twice (src is only read)
    with pytest.raises(Exception, match=r"_scale_rows: 12 address\(es\) that one program writes and another "
                                        r"accesses.*in dst: program \(0, 0, 0\) store, program \(1, 0, 0\) store"):
        _scale_rows[(5,)](torch.randn(40), torch.empty(40), 40, STEP=2, READ_BACK=False, BLOCK=8)


def test_reading_another_programs_output_races():
    # each program but the last reads the first element of the next one's
    with pytest.raises(Exception, match=r"_scale_rows: 4 address\(es\).*in dst: program \(0, 0, 0\) load, "
                                        r".*program \(1, 0, 0\) store"):
        _scale_rows[(5,)](torch.randn(40), torch.empty(40), 40, STEP=8, READ_BACK=True, BLOCK=8)


def test_atomics_from_many_programs_pass():
    src = torch.randn(16)
    total = torch.zeros(16)
    _accumulate[(3,)](src, total, 16, BLOCK=16)
    assert torch.allclose(total, 3 * src)
