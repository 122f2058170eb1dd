"""The cuda backend's backward (csrc/cuda/backward*) run on the CPU emulator (tests/cuda_emulator/)
against float64 math with the peers' accuracy rule (tests/oracle.py): dq, dk, dv and the bias
gradient in each of the bias's broadcast shapes, for fp16/bf16 (tensor-core path) and fp32 (exact
SIMT path), every variant the kernels have, GQA, ragged lengths, head dims of every bucket,
transposed inputs, dropout (against the materialized keep mask) and fully masked rows. Where the
real backend is available (a GPU, and the extension built with the CUDA kernels), the same tests
also run on it with CUDA tensors.

The emulator runs each CUDA thread as a fiber, so shapes stay small; they still cross the block
boundaries (64 rows for 16-bit inputs, 32 or 64 for fp32) where it matters.
"""
import pytest
import torch

import test_semantics as semantics_tests
import test_varlen as varlen_tests
from oracle import check_against_oracle, corner_mask, random_qkv, tile_sparse_mask

import fused_attn

CPU = torch.device("cpu")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def check(target, shape, dtype, **keywords):
    """check_against_oracle on the target's backend and device (keyword tensors moved there)."""
    keywords = {key: value.to(target.device) if isinstance(value, torch.Tensor) else value
                for key, value in keywords.items()}
    check_against_oracle(target.name, shape, dtype, target.device, **keywords)


# (B, Hq, Hkv, Lq, Lk, D, Dv) and keywords of fused_attn.attention.
CASES = {
    "plain": ((1, 2, 1, 17, 33, 64, 64), {}),
    "causal-top-left-long-q": ((1, 2, 2, 70, 17, 32, 32), dict(causal=True)),
    "causal-bottom-right-gqa": ((2, 4, 2, 17, 129, 40, 24), dict(causal=True, causal_alignment="bottom_right")),
    "long-causal": ((1, 1, 1, 129, 129, 32, 32), dict(causal=True)),
    "bottom-right-rows-see-no-key": ((1, 2, 1, 65, 33, 32, 32), dict(causal=True, causal_alignment="bottom_right")),
    "one-query": ((1, 4, 1, 1, 63, 16, 16), dict(causal=True, causal_alignment="bottom_right")),
    "head-dim-128": ((1, 1, 1, 33, 40, 128, 96), dict(causal=True)),
    "head-dim-256-dv-differs": ((1, 1, 1, 20, 37, 256, 136), {}),
    "window-alibi-softcap": ((1, 2, 1, 65, 70, 32, 32),
                             dict(window=(9, 4), alibi_slopes=torch.tensor([0.5, 0.125]), softcap=2.0)),
    "dropout": ((1, 2, 1, 66, 70, 32, 16), dict(dropout_p=0.3)),
    "keys-no-query-sees": ((1, 1, 1, 17, 70, 32, 32), dict(causal=True)),
    "head-dims-not-whole-chunks": ((1, 2, 1, 33, 40, 20, 12), dict(causal=True)),
    "window-negative-scale": ((1, 2, 1, 65, 70, 32, 32), dict(window=(9, 4), scale=-0.37)),
    "causal-zero-scale": ((1, 2, 1, 40, 50, 32, 32), dict(causal=True, scale=0.0)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_float64(cuda, dtype, case):
    shape, keywords = CASES[case]
    check(cuda, shape, dtype, **keywords)


@pytest.mark.parametrize("shape", [(1, 2, 2, 9, 12, 16, 16), (1, 4, 2, 9, 40, 64, 64), (2, 2, 1, 70, 70, 32, 32)],
                         ids=["few-queries", "few-queries-gqa", "ragged-last-block"])
@pytest.mark.parametrize("scale", [4.0, 10.0])
def test_float32_gradients_at_large_scales(cuda, shape, scale):
    """Scores of ~100: the backward's P = exp(S - lse) holds the rule only if both passes round S
    alike (tests/test_accuracy.py says why); few query rows with a backward to follow take the
    block kernels, not the decoding kernel."""
    check(cuda, shape, torch.float32, causal=True, causal_alignment="bottom_right", scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_transposed_inputs(cuda, dtype):
    """(B, L, H, D) storage read through transposed views; gradients laid out like their inputs."""
    check(cuda, (2, 2, 1, 40, 33, 32, 32), dtype, sequence_major=True, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_rows_give_the_same_bits(cuda, dtype):
    """Inputs and dout starting one element into their storage (rows not 16-byte aligned, read
    without cp.async) give the gradients of their contiguous copies, bit for bit."""
    q, k, v, dout = (torch.randn(2, 2, length, 41, device=cuda.device).to(dtype)[..., 1:] for length in (23, 66, 66, 23))

    def gradients(*tensors):
        leaves = [t.detach().requires_grad_() for t in tensors[:3]]
        out = fused_attn.attention(*leaves, causal=True, backend=cuda.name)
        return torch.autograd.grad(out, leaves, tensors[3])

    for misaligned, aligned in zip(gradients(q, k, v, dout), gradients(*(t.contiguous() for t in (q, k, v, dout)))):
        assert torch.equal(misaligned, aligned)


# Bias shapes broadcast to (B, Hq, Lq, Lk) = (2, 2, 70, 67): each dim broadcast or not, and
# Lq, Lk past one block, so the sums cross blocks.
BIAS_SHAPES = [(70, 67), (1, 67), (70, 1), (2, 1, 67), (2, 1, 70, 67), (2, 2, 70, 67), (2, 1, 1, 1), (1,)]


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_bias_gradient_in_its_own_shape(cuda, dtype, bias_shape):
    bias = torch.randn(bias_shape, dtype=dtype, device=cuda.device).requires_grad_()
    check(cuda, (2, 2, 1, 70, 67, 32, 32), dtype, attn_mask=bias, causal=True, causal_alignment="bottom_right")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gradient_with_every_other_variant(cuda, dtype):
    """A per-head bias row shared by the heads' queries, under GQA, window, ALiBi, softcap and dropout."""
    bias = torch.randn(1, 4, 1, 67, dtype=dtype, device=cuda.device).requires_grad_()
    check(cuda, (2, 4, 2, 70, 67, 32, 32), dtype, attn_mask=bias, window=(20, 10), alibi_slopes=torch.rand(2, 4),
          softcap=3.0, dropout_p=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_get_zero_gradients(cuda, dtype):
    """Rows whose mask hides every key: out 0, lse -inf, and dq exactly 0 (not NaN); their keys'
    dk/dv get nothing from them. A learnable bias with -inf entries hides keys the same way (the
    float64 reference's softmax gradient is NaN on a row of -inf biases, so rows keep a key here)."""
    B, H, Lq, Lk, D = 1, 2, 40, 35, 32
    mask = torch.rand(B, H, Lq, Lk, device=cuda.device) > 0.3
    mask[:, :, 5] = False
    mask[:, 1, 30:] = False
    check(cuda, (B, H, H, Lq, Lk, D, D), dtype, attn_mask=mask)
    q, k, v = random_qkv(B, H, H, Lq, Lk, D, D, dtype, cuda.device, requires_grad=True)
    out = fused_attn.attention(q, k, v, attn_mask=mask, backend=cuda.name)
    out.backward(torch.randn_like(out))
    assert torch.equal(q.grad[:, :, 5], torch.zeros_like(q.grad[:, :, 5]))
    assert torch.equal(q.grad[:, 1, 30:], torch.zeros_like(q.grad[:, 1, 30:]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    hidden = ~mask[0, 0]
    hidden[:, 0] = False
    bias = torch.randn(Lq, Lk, dtype=dtype, device=cuda.device).masked_fill(hidden, float("-inf")).requires_grad_()
    check(cuda, (B, H, H, Lq, Lk, D, D), dtype, attn_mask=bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("window", [(1, 1), (1, -1), (-1, 1)], ids=str)
def test_windows_of_one_key_cross_tile_edges(cuda, dtype, window):
    """window (1, 1) at 100 x 100: row 64's first key is 63 (the last of the previous 64-key tile;
    row 32's is 31 for fp32's 32-key tiles), and key block 64's first query is 63, the last of
    the previous query block: the forward's key range and dK/dV's query range must not skip them."""
    check(cuda, (1, 2, 1, 100, 100, 32, 32), dtype, window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bias_shape", [(1, 67), (2, 1, 1, 67), (1,)], ids=str)
def test_bias_gradient_summed_over_a_last_row_block_of_one_row(cuda, dtype, bias_shape):
    """Lq = 65: the last block of query rows holds one row, which a bias broadcast along the rows
    must still sum."""
    bias = torch.randn(bias_shape, dtype=dtype).requires_grad_()
    check(cuda, (2, 2, 1, 65, 67, 32, 32), dtype, attn_mask=bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dims", [(32, 32), (256, 256)], ids=str)
def test_mask_showing_one_pair_of_a_tile(cuda, dtype, dims):
    """oracle.corner_mask: tiles hidden but for one pair at a corner are computed, forward and
    gradients; head dim 256 takes 32-key tiles on tensor cores, 32 takes 64."""
    check(cuda, (1, 2, 2, 70, 200, *dims), dtype, attn_mask=corner_mask(1, 2, 70, 200))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_rows_past_the_sequence_are_never_read(cuda, dtype):
    """tests/test_semantics.py's NaN past the rows of q, k, v and dout, on the cuda kernels."""
    semantics_tests.test_rows_past_the_sequence_are_never_read(cuda.name, dtype, device=cuda.device)


def test_gradients_are_reproducible(cuda):
    """Fixed summation order: two runs give the same bits (dropout replayed from the same seed)."""
    q, k, v = random_qkv(1, 4, 2, 70, 66, 32, 32, torch.float16, cuda.device)
    bias = torch.randn(1, 1, 70, 66, device=cuda.device)

    def run():
        torch.manual_seed(0)
        leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
        out = fused_attn.attention(*leaves[:3], attn_mask=leaves[3], dropout_p=0.2, backend=cuda.name)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_op_rejects_bad_arguments_before_running(emulated_ops):
    q, k, v = random_qkv(1, 2, 1, 8, 8, 16, 16, torch.float32, CPU)
    out, lse = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    variants = (0.25, -1, -1, False)
    with pytest.raises(RuntimeError, match="dbias without bias"):
        emulated_ops.cuda_backward(out, lse, q, k, v, out, lse, dq, dk, dv, *variants,
                                   dbias=torch.zeros(1, 2, 8, 8))
    with pytest.raises(RuntimeError, match="dq must have a contiguous last dim"):
        emulated_ops.cuda_backward(out, lse, q, k, v, out, lse, torch.empty(1, 2, 16, 8).transpose(2, 3), dk,
                                   dv, *variants)
    with pytest.raises(RuntimeError, match="dk must have shape"):
        emulated_ops.cuda_backward(out, lse, q, k, v, out, lse, dq, dv[:, :, :4], dv, *variants)


def test_opcheck_with_every_feature(cuda):
    """torch.library.opcheck through the autograd op (its backward the cuda backend's): a
    learnable broadcast bias, ALiBi, softcap, a window and dropout."""
    device = cuda.device
    q, k, v = random_qkv(2, 4, 2, 37, 50, 32, 16, torch.float32, device, requires_grad=True)
    bias = torch.randn(1, 4, 37, 50, device=device, requires_grad=True)
    seed = fused_attn.dropout.draw_seed(device)
    args = (q, k, v, bias, torch.rand(4, device=device), seed, None, None, 0.25, True, True, 20, -1, 5.0, 0.1, False,
            0, 0, cuda.name)
    torch.library.opcheck(torch.ops.fused_attn.forward.default, args)


# Packed (varlen) batches on the emulator: tests/test_varlen.py's checks (forward and gradients of
# every sequence against float64 math run sequence by sequence: empty, one-row, Lq > Lk and
# Lq < Lk sequences, multi-block ones, queries without keys) with CPU tensors. On a GPU that file
# runs them on the real backend (conftest's varlen_backend).

@pytest.mark.parametrize("keywords", [
    pytest.param(dict(), id="full"),
    pytest.param(dict(causal=True), id="causal-top-left"),
    pytest.param(dict(causal=True, causal_alignment="bottom_right"), id="causal-bottom-right"),
    pytest.param(dict(window=(4, 2), causal_alignment="bottom_right", softcap=5.0), id="window-softcap"),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen(emulated, monkeypatch, dtype, keywords):
    monkeypatch.setattr(varlen_tests, "DEVICE", CPU)
    varlen_tests.check_varlen(emulated.name, dtype, **keywords)


@pytest.mark.parametrize("slopes_shape", [(varlen_tests.HQ,), (len(varlen_tests.LENGTHS_Q), varlen_tests.HQ)],
                         ids=["per-head", "per-sequence"])
def test_varlen_alibi(emulated, monkeypatch, slopes_shape):
    monkeypatch.setattr(varlen_tests, "DEVICE", CPU)
    varlen_tests.check_varlen(emulated.name, torch.float16, causal=True, alibi_slopes=torch.rand(slopes_shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_varlen_dropout(emulated, monkeypatch, dtype):
    """The Philox counters of packed sequences: sequence index and local positions, as the cpu backend."""
    monkeypatch.setattr(varlen_tests, "DEVICE", CPU)
    varlen_tests.check_varlen(emulated.name, dtype, dropout_p=0.25, causal=True, causal_alignment="bottom_right")


def test_varlen_rows_after_the_last_sequence(emulated, monkeypatch):
    monkeypatch.setattr(varlen_tests, "DEVICE", CPU)
    varlen_tests.test_varlen_rows_after_the_last_sequence(emulated.name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_tiles_the_mask_hides_are_skipped(cuda, dtype):
    """oracle.tile_sparse_mask (key padding, a head that sees nothing, per-head hidden key blocks)
    against float64 math. Then NaN goes where only hidden tiles would read it: batch 0's keys and
    values past key 64 (whole hidden key blocks; dq reads them) and head 1's queries and output
    gradients (a head that sees nothing; dk and dv read them). A kernel that computed those tiles
    would multiply p = 0 by NaN; one that skips them gives every gradient bit for bit."""
    shape = (2, 6, 2, 70, 300, 32, 24)
    mask = tile_sparse_mask(2, 6, 70, 300, device=cuda.device)
    check(cuda, shape, dtype, attn_mask=mask)
    q, k, v = random_qkv(*shape, dtype=dtype, device=cuda.device)
    dout = torch.randn(2, 6, 70, 24, dtype=dtype, device=cuda.device)

    def gradients(q, k, v, dout):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fused_attn.attention(*leaves, attn_mask=mask, backend=cuda.name)
        return torch.autograd.grad(out, leaves, dout)

    clean = gradients(q, k, v, dout)
    q, k, v, dout = (t.clone() for t in (q, k, v, dout))
    k[0, :, 64:] = v[0, :, 64:] = float("nan")
    q[:, 1] = dout[:, 1] = float("nan")
    for name, a, b in zip(("dq", "dk", "dv"), clean, gradients(q, k, v, dout)):
        assert torch.equal(a, b), name


def test_varlen_unchecked_boundaries_stay_inside_the_tensors(emulated, monkeypatch):
    """tests/test_varlen.py's check of the kernels' clamps of unchecked cu_seqlens, on the emulator
    (the sanitized run, make test-sanitized, reports any access outside the tensors)."""
    monkeypatch.setattr(varlen_tests, "DEVICE", CPU)
    varlen_tests.test_unchecked_boundaries_stay_inside_the_tensors(monkeypatch, emulated.name)


def test_varlen_generous_max_seqlen(emulated, monkeypatch):
    """A max_seqlen above the packed total (the cuda op takes at most the total) gives the exact
    longest's result (tests/test_varlen.py)."""
    monkeypatch.setattr(varlen_tests, "DEVICE", CPU)
    varlen_tests.test_generous_max_seqlen(emulated.name)
