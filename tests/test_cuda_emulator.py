"""The CPU emulator of the CUDA subset (tests/cuda_emulator/) against the PTX ISA: each primitive
runs in a small kernel (selftest.cpp) and its per-lane results are checked against the ISA's
layouts, computed here independently: mma.m16n8k16 fragments, ldmatrix (plain and .trans, x2 and
x4), shuffles, cp.async (zero-fill, completion at the wait), __syncthreads and __syncthreads_or, error reports, and
float -> fp16/bf16 rounding (against torch's conversions)."""
import os
import struct
import subprocess

import pytest
import torch

from cuda_emulator.build import BUILD_DIR, CSRC, HERE, inputs_hash

WARP = 32


@pytest.fixture(scope="module")
def selftest():
    """Builds selftest.cpp with the emulator (once per version of the sources, each build under its
    own name and then renamed, so parallel test processes never run a half-written binary);
    returns run(mode, words) -> output words."""
    sources = [os.path.join(HERE, name) for name in ("selftest.cpp", "fused_attn_emulator.cpp",
                                                     "fused_attn_emulator.h")]
    sources.append(os.path.join(CSRC, "cuda", "cuda_api.cuh"))
    binary = os.path.join(BUILD_DIR, f"selftest-{inputs_hash(sources)}")
    if not os.path.exists(binary):
        os.makedirs(BUILD_DIR, exist_ok=True)
        temporary = f"{binary}.{os.getpid()}.tmp"
        subprocess.run(["g++", "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", "-DFUSED_ATTN_EMULATOR", f"-I{HERE}",
                        f"-I{os.path.join(CSRC, 'cuda')}", *sources[:2], "-o", temporary], check=True)
        os.replace(temporary, binary)

    def run(mode, words=()):
        result = subprocess.run([binary, mode], input="\n".join(str(w) for w in words), capture_output=True, text=True,
                                check=True)
        return result.stdout.split()

    return run


def lane_coordinates(lane):
    return lane // 4, lane % 4  # (groupID, threadID_in_group) in the ISA's words


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def bits_f32(w):
    return struct.unpack("<f", struct.pack("<I", w))[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_m16n8k16_fragments(selftest, dtype):
    """D = A B + C with A, B, C distributed over lanes as the ISA lays out the fragments; D is the
    exact sum rounded once to fp32."""
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 8).to(dtype)
    c = torch.randn(16, 8)
    bits = lambda t: int(t.view(torch.int16).item()) & 0xFFFF  # noqa: E731

    def pack(lo, hi):
        return bits(lo) | bits(hi) << 16

    words = []
    for lane in range(WARP):
        g, t = lane_coordinates(lane)
        words += [pack(a[g, 2 * t], a[g, 2 * t + 1]), pack(a[g + 8, 2 * t], a[g + 8, 2 * t + 1]),
                  pack(a[g, 2 * t + 8], a[g, 2 * t + 9]), pack(a[g + 8, 2 * t + 8], a[g + 8, 2 * t + 9]),
                  pack(b[2 * t, g], b[2 * t + 1, g]), pack(b[2 * t + 8, g], b[2 * t + 9, g]),
                  f32_bits(c[g, 2 * t]), f32_bits(c[g, 2 * t + 1]), f32_bits(c[g + 8, 2 * t]),
                  f32_bits(c[g + 8, 2 * t + 1])]
    out = [int(w) for w in selftest("mma_f16" if dtype == torch.float16 else "mma_bf16", words)]
    d = torch.empty(16, 8, dtype=torch.float64)
    for lane in range(WARP):
        g, t = lane_coordinates(lane)
        for index in range(4):
            d[g + 8 * (index // 2), 2 * t + index % 2] = bits_f32(out[4 * lane + index])
    exact = a.double() @ b.double() + c.double()
    assert torch.equal(d, exact.float().double())  # products exact, one rounding to fp32


@pytest.mark.parametrize("matrices", [2, 4])
@pytest.mark.parametrize("transpose", [False, True])
def test_ldmatrix_fragments(selftest, matrices, transpose):
    """Lane 4g + t receives row g, columns 2t and 2t + 1 of each 8x8 matrix (.trans: column g, rows
    2t and 2t + 1); the matrices' rows come from lanes 8m .. 8m + 7. Shared memory holds each
    word's index, row r of matrix m at 64 m + 8 r."""
    out = [int(w) for w in selftest(f"ldmatrix_x{matrices}" + ("_trans" if transpose else ""))]
    for lane in range(WARP):
        g, t = lane_coordinates(lane)
        for m in range(matrices):
            element = (lambda row, col: 64 * m + 8 * row + col)
            lo, hi = ((element(2 * t, g), element(2 * t + 1, g)) if transpose else
                      (element(g, 2 * t), element(g, 2 * t + 1)))
            assert out[matrices * lane + m] == lo | hi << 16, (lane, m)


def test_shuffles(selftest):
    out = [int(w) for w in selftest("shfl")]
    for lane in range(WARP):
        assert out[3 * lane] == 100 + (lane ^ 1)
        assert out[3 * lane + 1] == 100 + (lane ^ 6)
        assert out[3 * lane + 2] == 100 + lane * 5 % 32  # a float through __shfl_sync, converted back


def test_cp_async_zero_fill_and_completion(selftest):
    """Nothing lands before cp.async.wait_group (the latest the ISA allows); then the in-bounds copy
    has the source's bytes and the out-of-bounds one zeros."""
    out = [int(w) for w in selftest("cp_async")]
    assert out[:8] == [0xABABABAB] * 8
    assert out[8:] == [11, 22, 33, 44, 0, 0, 0, 0]


def test_syncthreads_publishes_shared_memory(selftest):
    """Each of 96 threads (3 warps) reads its neighbour's word after the barrier, in two blocks with
    their own dynamic shared memory contents."""
    out = [int(w) for w in selftest("syncthreads")]
    assert out == [1000 * block + (t + 1) % 96 for block in range(2) for t in range(96)]


def test_syncthreads_or_gives_every_thread_the_blocks_vote(selftest):
    """One true vote among 96 threads reaches all of them; a round with none gives 0 to all; votes
    never leak into the next round or the other block."""
    out = [int(w) for w in selftest("syncthreads_or")]
    expected = {(0, 0): 1, (0, 1): 0, (0, 2): 0, (1, 0): 1, (1, 1): 0, (1, 2): 1}
    assert out == [expected[block, round_] for block in range(2) for round_ in range(3) for _ in range(96)]


def test_errors_are_reported(selftest):
    """Kernels that would hang or misbehave on a GPU fail the emulated launch with a reason."""
    assert "deadlock" in " ".join(selftest("deadlock"))
    assert "divergent warp" in " ".join(selftest("divergence"))


def test_16_bit_rounding_matches_torch(selftest):
    """float -> fp16 and bf16 round to nearest even, with subnormals, overflow, ties and NaN."""
    specials = [0.0, -0.0, 1.0, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.99, 65520.0, 1e9, -1e9, 2.0**-14,
                2.0**-24, 2.0**-25, 3 * 2.0**-25, 1.5 * 2.0**-24, 6e-8, 1e-45, float("inf"), float("-inf"),
                1 + 2**-8, 1 + 3 * 2**-8, 3.0e38, -2.5]
    values = torch.cat([torch.tensor(specials), torch.randn(2000) * 10.0 ** torch.randint(-9, 6, (2000,))])
    values = torch.cat([values, torch.tensor([float("nan")])])
    words = [f32_bits(x) for x in values.tolist()]
    out = [int(w) for w in selftest("convert", words)]
    half, bf16 = out[0::2], out[1::2]
    expected_half = (values.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF).tolist()
    expected_bf16 = (values.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF).tolist()
    assert half[:-1] == expected_half[:-1]
    assert bf16[:-1] == expected_bf16[:-1]
    assert (half[-1] & 0x7C00) == 0x7C00 and half[-1] & 0x3FF  # NaN stays NaN
    assert (bf16[-1] & 0x7F80) == 0x7F80 and bf16[-1] & 0x7F
