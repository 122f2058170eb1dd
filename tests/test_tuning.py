"""Tile selection (fused_attn/triton/tuning.py) without a GPU: a fake device and fake timings stand
in for the card, so every rule of the module docstring is checked here; and the kernels' numerics
with tiles other than the interpreter's square 32 x 32 ones."""
import json
from pathlib import Path

import pytest
import torch
import triton
from conftest import DEVICE
from oracle import check_against_oracle

import fused_attn
from fused_attn.options import AttentionOptions, AttentionTensors
from fused_attn.triton import backward as triton_backward
from fused_attn.triton import forward as triton_forward
from fused_attn.triton import tuning
from fused_attn.triton.common import INTERPRETING, TensorDescriptor, takes_tensor_descriptors
from fused_attn.triton.tuning import DeviceInfo, ShapeClass, TileConfig

H100 = DeviceInfo("sm90", 9, 132, 232448)
FORWARD = ShapeClass("forward", 128, 2, False)
DEFAULT = tuning.default_tiles(FORWARD)
FASTEST = TileConfig(128, 128, 8, 3)


class FakeGPU:
    """Stands in for the card: launches are recorded, and measure() times a candidate from a table."""

    def __init__(self, monkeypatch, device=H100, timings=None):
        self.launched = []
        self.timings = timings or {}
        self.capturing = False
        monkeypatch.setattr(tuning, "INTERPRETING", False)
        monkeypatch.setattr(tuning, "device_info", lambda _: device)
        monkeypatch.setattr(tuning, "measure", self.measure)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.capturing)

    def measure(self, run):
        run()
        tiles = self.launched[-1]
        time = self.timings.get(tiles, 1.0)
        if isinstance(time, Exception):  # the compiler refuses the candidate
            raise time
        return time

    def launch(self, tiles):
        self.launched.append(tiles)

    def select(self, shape=FORWARD, programs=10000, **keywords):
        return tuning.select(shape, torch.device("cuda", 0), self.launch, lambda tiles: (programs, 1), **keywords)


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch, tmp_path):
    """No choices tuned by other tests, and shipped files read from tmp_path."""
    monkeypatch.setattr(tuning, "_tuned", {})
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    monkeypatch.delenv(tuning.ENV_VARIABLE, raising=False)
    tuning.shipped_choices.cache_clear()
    yield
    tuning.shipped_choices.cache_clear()


def ship(tmp_path, arch, choices):
    """Write tuned/<arch>.json the way benchmarks/tune.py does."""
    entries = {shape.key: tuning.choice_entry(tuning.Tuned(tiles, DEFAULT, {tiles: 1.0, DEFAULT: 2.0}), "test")
               for shape, tiles in choices.items()}
    (tmp_path / f"{arch}.json").write_text(json.dumps({"arch": arch, "choices": entries}))
    tuning.shipped_choices.cache_clear()


def test_interpreter_uses_its_own_tiles(monkeypatch):
    gpu = FakeGPU(monkeypatch)
    monkeypatch.setattr(tuning, "INTERPRETING", True)
    assert gpu.select() == tuning.interpreter_tiles(FORWARD) == TileConfig(32, 32, 1, 1)
    assert gpu.launched == []


def test_autotune_off_gives_the_defaults(monkeypatch, tmp_path):
    gpu = FakeGPU(monkeypatch, timings={FASTEST: 0.5})
    ship(tmp_path, "sm90", {FORWARD: FASTEST})
    monkeypatch.setenv(tuning.ENV_VARIABLE, "0")
    assert gpu.select() == DEFAULT
    assert gpu.launched == []


def test_unknown_autotune_mode_raises(monkeypatch):
    gpu = FakeGPU(monkeypatch)
    monkeypatch.setenv(tuning.ENV_VARIABLE, "yes")
    with pytest.raises(ValueError, match="FUSED_ATTN_AUTOTUNE environment variable must be one of"):
        gpu.select()


def test_tuning_keeps_the_fastest_candidate_for_the_process(monkeypatch):
    gpu = FakeGPU(monkeypatch, timings={DEFAULT: 1.0, FASTEST: 0.5})
    assert gpu.select() == FASTEST
    assert set(gpu.launched) == set(tuning.candidates(FORWARD, 9, tma=False))  # each fits an H100
    gpu.launched.clear()
    assert gpu.select() == FASTEST
    assert gpu.launched == []
    tuned = tuning.tuned_choices("sm90")[FORWARD.key]
    assert tuned.timings[FASTEST] == 0.5 and tuned.default == DEFAULT
    assert tuning.tuned_choices("sm80") == {}


def test_a_gain_within_timing_noise_keeps_the_default(monkeypatch):
    gpu = FakeGPU(monkeypatch, timings={DEFAULT: 1.0, FASTEST: 0.99})
    assert gpu.select() == DEFAULT


def test_candidates_the_compiler_refuses_are_skipped(monkeypatch):
    ptxas_crash = triton.runtime.errors.PTXASError("`ptxas` failed with error code -11\nstderr: ...")
    gpu = FakeGPU(monkeypatch, timings={FASTEST: triton.runtime.OutOfResources(300000, 232448, "shared memory"),
                                        TileConfig(128, 64, 8, 2, True): ptxas_crash,
                                        TileConfig(64, 64, 4, 3): 0.5})
    assert gpu.select(tma=True) == TileConfig(64, 64, 4, 3)
    tuned = tuning.tuned_choices("sm90")[FORWARD.key]
    assert set(tuned.failed) == {FASTEST, TileConfig(128, 64, 8, 2, True)}
    assert tuned.failed[TileConfig(128, 64, 8, 2, True)] == "PTXAS error: `ptxas` failed with error code -11"
    assert FASTEST not in tuned.timings and DEFAULT in tuned.timings
    entry = tuning.choice_entry(tuned, "test")
    assert entry["failed"][str(FASTEST)].startswith("out of resource: shared memory")


def test_a_default_the_compiler_refuses_is_the_calls_error(monkeypatch):
    gpu = FakeGPU(monkeypatch, timings={DEFAULT: triton.runtime.errors.PTXASError("PTXAS error")})
    with pytest.raises(triton.runtime.errors.PTXASError):
        gpu.select()


def test_candidates_over_the_shared_memory_limit_never_run(monkeypatch):
    rtx3090 = DeviceInfo("sm86", 8, 82, 101376)
    gpu = FakeGPU(monkeypatch, device=rtx3090)
    gpu.select()
    assert gpu.launched
    assert all(tuning.shared_memory_bytes(FORWARD, tiles, 8) <= rtx3090.shared_memory for tiles in gpu.launched)
    assert set(gpu.launched) < set(tuning.candidates(FORWARD, 8))


def test_shipped_choice_is_used_without_tuning(monkeypatch, tmp_path):
    gpu = FakeGPU(monkeypatch)
    ship(tmp_path, "sm90", {FORWARD: FASTEST})
    assert gpu.select() == FASTEST
    assert gpu.launched == []


def test_another_architectures_choices_are_never_used(monkeypatch, tmp_path):
    gpu = FakeGPU(monkeypatch, timings={DEFAULT: 1.0, TileConfig(64, 64, 4, 3): 0.5})
    ship(tmp_path, "sm80", {FORWARD: FASTEST})
    assert gpu.select() == TileConfig(64, 64, 4, 3)


def test_a_choice_that_does_not_fit_the_call_gives_the_default(monkeypatch, tmp_path):
    gpu = FakeGPU(monkeypatch)
    ship(tmp_path, "sm90", {FORWARD: FASTEST})  # 229888 of the 232448 bytes
    assert gpu.select() == FASTEST
    assert gpu.select(mask_bytes=2) == DEFAULT  # a bias tile takes 32 KB more
    assert gpu.launched == []


def test_force_retunes_over_the_shipped_choice(monkeypatch, tmp_path):
    gpu = FakeGPU(monkeypatch, timings={DEFAULT: 1.0, TileConfig(64, 64, 4, 3): 0.5})
    ship(tmp_path, "sm90", {FORWARD: FASTEST})
    monkeypatch.setenv(tuning.ENV_VARIABLE, "force")
    assert gpu.select() == TileConfig(64, 64, 4, 3)


def test_tma_tiles_are_tried_only_for_calls_that_take_tensor_descriptors(monkeypatch):
    tma = TileConfig(128, 128, 8, 2, tma=True)
    gpu = FakeGPU(monkeypatch, timings={DEFAULT: 1.0, tma: 0.5})
    assert gpu.select(tma=False) == DEFAULT
    assert not any(tiles.tma for tiles in gpu.launched)
    monkeypatch.setattr(tuning, "_tuned", {})
    gpu.launched.clear()
    assert gpu.select(tma=True) == tma
    assert tma in gpu.launched
    # the class's choice, for a later call whose tensors TMA cannot read: the same tiles through pointers
    assert gpu.select(tma=False) == TileConfig(128, 128, 8, 2)


def test_tune_compile_workers_each_run_one_candidate_per_class(monkeypatch):
    from benchmarks.tune import candidates_of_rank
    gpu = FakeGPU(monkeypatch)
    every = tuning.candidates(FORWARD, 9)
    monkeypatch.setattr(tuning, "candidates", candidates_of_rank(len(every) - 1))
    gpu.select(tma=True)
    assert gpu.launched == [every[-1]] and every[-1].tma
    monkeypatch.setattr(tuning, "_tuned", {})
    gpu.launched.clear()
    gpu.select(tma=False)  # fewer candidates without TMA: the default
    assert gpu.launched == [DEFAULT]


def test_small_calls_and_graph_captures_are_not_tuned(monkeypatch):
    gpu = FakeGPU(monkeypatch, timings={DEFAULT: 1.0, FASTEST: 0.5})
    assert gpu.select(programs=H100.multiprocessors - 1) == DEFAULT
    gpu.capturing = True
    assert gpu.select() == DEFAULT
    assert gpu.launched == [] and tuning.tuned_choices("sm90") == {}
    gpu.capturing = False
    assert gpu.select() == FASTEST  # the first call that fills the GPU


def test_reproducible_calls_use_only_shipped_or_default_tiles(monkeypatch, tmp_path):
    gpu = FakeGPU(monkeypatch, timings={DEFAULT: 1.0, FASTEST: 0.5})
    assert gpu.select(reproducible=True) == DEFAULT
    assert gpu.launched == []
    assert gpu.select() == FASTEST
    assert gpu.select(reproducible=True) == DEFAULT  # not the choice this process tuned
    ship(tmp_path, "sm90", {FORWARD: TileConfig(64, 64, 4, 3)})
    assert gpu.select(reproducible=True) == TileConfig(64, 64, 4, 3)


@pytest.mark.parametrize("kernel", tuning.KERNELS)
@pytest.mark.parametrize("major", [8, 9])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_candidate_sets_are_small_with_the_default_first(kernel, major, head_dim):
    shape = ShapeClass(kernel, head_dim, 2, False, 16 if kernel == "decode" else 0)
    found = tuning.candidates(shape, major)
    assert found[0] == tuning.default_tiles(shape) and len(set(found)) == len(found)
    flagship = {8: 166912, 9: H100.shared_memory}[major]  # A100, H100: the ones tuning would time
    assert len([tiles for tiles in found if tuning.shared_memory_bytes(shape, tiles, major) <= flagship]) <= 10
    assert tuning.candidates(shape, major, tma=False) == tuple(tiles for tiles in found if not tiles.tma)
    assert any(tiles.tma for tiles in found) == (kernel in ("forward", "dkdv", "dq") and major == 9)
    if kernel == "decode":
        assert {tiles.block_m for tiles in found} == {16}
    assert tuning.candidates(ShapeClass(kernel, head_dim, 4, False, shape.block_m), major) == (
        tuning.default_tiles(ShapeClass(kernel, head_dim, 4, False, shape.block_m)),)


def test_shared_memory_bound():
    # Triton 3.9 compiles forward d64 128x64 w8 s3 to 65536 bytes for sm_90 (q, and k and v in 3
    # stages) and 49152 for sm_80 (2 stages): the bound is tight but above both.
    d64 = ShapeClass("forward", 64, 2, False)
    assert 65536 <= tuning.shared_memory_bytes(d64, TileConfig(128, 64, 8, 3), 9) <= 1.02 * 65536
    assert 49152 <= tuning.shared_memory_bytes(d64, TileConfig(128, 64, 8, 3), 8) <= 1.4 * 49152
    bound = tuning.shared_memory_bytes(FORWARD, FASTEST, 9)
    assert bound <= H100.shared_memory
    assert tuning.shared_memory_bytes(ShapeClass("forward", 128, 4, False), FASTEST, 9) > 2 * 229376
    assert tuning.shared_memory_bytes(FORWARD, FASTEST, 9, mask_bytes=1) == bound + 128 * 128
    # and 164864 with TMA copies at d128 128x128 w8 s2 (163840 without): their buffers are 1 KB aligned
    tma = TileConfig(128, 128, 8, 2, tma=True)
    assert 164864 <= tuning.shared_memory_bytes(FORWARD, tma, 9) <= 1.01 * 164864


def test_mask_bytes():
    extras = fused_attn.options.AttentionTensors
    assert tuning.mask_bytes(extras()) == 0
    assert tuning.mask_bytes(extras(mask=torch.ones(2, 2, dtype=torch.bool))) == 1
    assert tuning.mask_bytes(extras(bias=torch.ones(2, 2))) == 4


def test_shipped_files_name_fitting_candidates():
    """Every choice in fused_attn/triton/tuned/ (benchmarks/tune.py) is a candidate of its class that
    fits the shared memory of the architecture's flagship (A100, H100)."""
    limits = {"sm80": 166912, "sm90": 232448}
    classes = {shape.key: shape for shape in (
        ShapeClass(kernel, 2 ** power, dtype_bytes, causal, block_m if kernel == "decode" else 0)
        for kernel in tuning.KERNELS for power in range(4, 9) for dtype_bytes in (2, 4) for causal in (False, True)
        for block_m in (16, 32, 64))}
    for path in sorted(Path(tuning.__file__).with_name("tuned").glob("*.json")):
        major = int(path.stem[2:-1])
        for key, entry in json.loads(path.read_text())["choices"].items():
            tiles = TileConfig(**entry["tiles"])
            assert tiles in tuning.candidates(classes[key], major), (path.name, key)
            assert tuning.shared_memory_bytes(classes[key], tiles, major) <= limits[path.stem], (path.name, key)


def test_shape_class_keys():
    opts = AttentionOptions
    q, v = torch.empty(1, 1, 1, 100, dtype=torch.bfloat16), torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)
    assert ShapeClass.of("dq", q, v, opts()).key == "dq/d128/16bit/full"
    assert ShapeClass.of("forward", q.float(), v.float(), opts(causal=True)).key == "forward/d128/32bit/causal"
    assert ShapeClass.of("forward", q, v, opts(window_left=256)).causal  # windows skip blocks like causal
    assert ShapeClass.of("decode", q, v, opts(), block_m=16).key == "decode/d128/16bit/full/m16"


# Every launch must be right with any candidate's tiles, not only the interpreter's 32 x 32 ones:
# key and query blocks of different sizes, so the causal and window bounds fall mid-block.
UNEQUAL = {"forward": (64, 32), "dkdv": (32, 64), "dq": (16, 64), "bias_grad": (64, 16), "decode": (0, 64)}
SWAPPED = {kernel: (n, m) if kernel != "decode" else (0, 16) for kernel, (m, n) in UNEQUAL.items()}


@pytest.fixture(params=[UNEQUAL, SWAPPED], ids=["unequal", "swapped"])
def candidate_tiles(request, monkeypatch):
    if not INTERPRETING:
        pytest.skip("on a GPU every test runs the tiles tuning picks")
    blocks = request.param
    monkeypatch.setattr(tuning, "interpreter_tiles",
                        lambda shape: TileConfig(blocks[shape.kernel][0] or shape.block_m, blocks[shape.kernel][1], 1, 1))


@pytest.mark.parametrize("keywords", [
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"causal": True, "causal_alignment": "bottom_right"}, id="causal-bottom-right"),
    pytest.param({"window": (40, 7)}, id="window"),
    pytest.param({"attn_mask": "bias"}, id="bias-grad"),
])
def test_other_tiles_match_the_reference(candidate_tiles, keywords):
    shape = (1, 2, 1, 150, 130, 64, 64)
    if keywords.get("attn_mask") == "bias":
        keywords = {"attn_mask": torch.randn(1, 2, 150, 130, device=DEVICE, requires_grad=True)}
    check_against_oracle("triton", shape, torch.float16, DEVICE, **keywords)


def test_other_decode_tiles_match_one_pass(candidate_tiles):
    k_cache, v_cache = torch.randn(2, 300, 2, 64, device=DEVICE), torch.randn(2, 300, 2, 64, device=DEVICE)
    q = torch.randn(2, 1, 8, 64, device=DEVICE)
    out = fused_attn.attention_with_kvcache(q, k_cache, v_cache, 300, backend="triton")
    ref = fused_attn.attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                               backend="reference").transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def tma_available() -> bool:
    """Where the kernels can copy tiles with TMA: a Triton with host-side tensor descriptors, and
    Hopper's copy engine or the interpreter's emulation of it."""
    return TensorDescriptor is not None and (INTERPRETING or torch.cuda.get_device_capability()[0] >= 9)


@pytest.fixture
def tma_tiles(monkeypatch):
    """Every forward, dk/dv and dq launch with TMA copies of the tiles it streams (tensor descriptors)."""
    if not tma_available():
        pytest.skip("TMA needs a Hopper GPU or newer and Triton >= 3.4")
    on_gpu = {"forward": TileConfig(128, 64, 8, 2, True), "dkdv": TileConfig(64, 128, 8, 2, True),
              "dq": TileConfig(128, 64, 8, 2, True)}

    def select(shape, device, launch, grid, *, tma=False, **keywords):
        assert tma, "the test's tensors are TMA-aligned"
        return TileConfig(32, 64, 1, 1, tma=True) if INTERPRETING else on_gpu[shape.kernel]

    for module in (triton_forward, triton_backward):
        monkeypatch.setattr(module, "select", select)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(causal=True, causal_alignment="bottom_right"), id="causal-bottom-right"),
    pytest.param(dict(window=(40, 7)), id="window"),
    pytest.param(dict(attn_mask="bool"), id="bool-mask"),
    pytest.param(dict(head_dim=96, sequence_major=True), id="d96-sequence-major"),
])
def test_tma_copies_match_the_reference(tma_tiles, dtype, case):
    """Out, lse and every gradient: keys past Lk, queries past Lq and head-dim columns past D come
    from the copy engine's zero fill, not from masked loads."""
    case = dict(case)
    head_dim = case.pop("head_dim", 64)
    sequence_major = case.pop("sequence_major", False)
    if case.get("attn_mask") == "bool":
        case["attn_mask"] = torch.rand(2, 1, 150, 130, device=DEVICE) < 0.7
    check_against_oracle("triton", (2, 4, 2, 150, 130, head_dim, head_dim), dtype, DEVICE,
                         sequence_major=sequence_major, **case)


def test_tensor_descriptors_need_aligned_dense_tensors():
    def tensor(*shape, dtype=torch.float16):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    dense = tensor(2, 3, 40, 64)
    assert takes_tensor_descriptors(dense, tensor(2, 40, 3, 64).transpose(1, 2)) == tma_available()
    assert not takes_tensor_descriptors(dense, dense[..., 1:])  # base 2 bytes past a 16-byte boundary
    assert not takes_tensor_descriptors(tensor(2, 3, 40, 36))  # rows 72 bytes apart
    assert not takes_tensor_descriptors(tensor(2, 3, 40, 64).transpose(2, 3))  # D not contiguous
    assert not takes_tensor_descriptors(tensor(1, 3, 40, 64).expand(2, 3, 40, 64))  # batch stride 0
    assert not takes_tensor_descriptors(tensor(120, 3, 64))  # packed varlen rows



class GridSpy:
    """Stands in for a Triton kernel: records each launch's grid and runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_launch_grids_fit_cuda_limits(monkeypatch):
    """CUDA allows 65535 programs on a grid's second and third dimensions, which hold the (sequence,
    head) pairs: at the most the triton backend serves (4369 x 15 = 65535), every kernel's grid fits,
    and one more pair makes dispatch refuse the call (and take another backend) rather than the launch fail."""
    from fused_attn.triton import bias_grad, decode

    spy = GridSpy()
    for module, kernel in ((triton_forward, "_forward_kernel"), (triton_backward, "_delta_kernel"),
                           (triton_backward, "_dkdv_kernel"), (triton_backward, "_dq_kernel"),
                           (decode, "_decode_kernel"), (decode, "_merge_splits_kernel"),
                           (bias_grad, "_bias_grad_kernel")):
        monkeypatch.setattr(module, kernel, spy)
    batch, heads = 4369, 15
    q, k, v = (torch.randn(batch, heads, 2, 16, device=DEVICE) for _ in range(3))
    extras = AttentionTensors(bias=torch.randn(batch, heads, 1, 1, device=DEVICE))
    opts = AttentionOptions(scale=0.25)
    assert fused_attn.dispatch.refusal_reasons("triton", q, k, v, extras, opts) == []
    out, lse = triton_forward.attention_forward(q, k, v, extras, opts)
    triton_backward.attention_backward(torch.randn_like(out), torch.zeros_like(lse), q, k, v, out, lse, extras, opts,
                                       True)
    cache = torch.randn(batch, 64, heads, 16, dtype=torch.float16, device=DEVICE)  # split in two (interpreter)
    decode.decode_forward(q[:, :, :1].transpose(1, 2).half(), cache, cache,
                          torch.full((batch,), 64, dtype=torch.int32, device=DEVICE), None, None, opts)
    assert len(spy.grids) == 7
    assert max(size for grid in spy.grids for size in grid[1:]) == batch * heads == 65535

    wider = torch.randn(batch, heads + 1, 2, 16, device=DEVICE)
    grouped = wider[:, :8]  # (GQA: the grids hold query heads, however few key/value heads there are)
    for k_heads in (wider, grouped):
        with pytest.raises(fused_attn.BackendError,
                           match=r"69904 \(sequence, head\) pairs: its grids hold at most 65535"):
            fused_attn.dispatch.select_backend(wider, k_heads, k_heads, AttentionTensors(), opts, "triton")
    assert fused_attn.dispatch.select_backend(wider, wider, wider, AttentionTensors(), opts) != "triton"
