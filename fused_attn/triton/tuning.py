"""Tile shapes of the Triton kernels: block_m, block_n, num_warps and num_stages of every launch,
and whether the streamed tiles are read through tensor descriptors (Hopper's TMA copy engine).

The best tiles depend on a *shape class*: the kernel, the padded head dim, the element width,
whether key blocks are skipped (causal or a sliding window) and the GPU architecture. Sequence
lengths and batch sizes are left out: they change how many programs run more than how each one
should be shaped, and keying on them would multiply the tuning.

Where a launch's tiles come from, the first that applies:
1. Triton's interpreter: `interpreter_tiles` (its cost grows with programs x loop steps).
2. FUSED_ATTN_AUTOTUNE=0: `default_tiles`, fixed per class (the tiles used before tuning existed).
3. A choice tuned earlier in this process, except for calls that must give the same bits in every
   process (deterministic=True): tuning can choose differently from one run to the next.
4. The choice shipped in tuned/sm<major><minor>.json for this architecture (`benchmarks/tune.py`
   writes it); FUSED_ATTN_AUTOTUNE=force ignores it and re-tunes every class once per process.
5. Tuning, for calls that may use it: every candidate that fits the device's shared memory runs
   the call itself, and the fastest is kept for the rest of the process. Tuning waits for a call
   that fills the GPU (a small call times launch latency, not tiles), and never runs while a CUDA
   graph is being captured.
6. `default_tiles`; also when the class's choice does not fit this call's shared memory.

Every tuned kernel only writes its outputs (no accumulation into them, no atomics), so running the
candidates on the call's own tensors is harmless: the caller launches the winner afterwards.
"""
from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
import triton

from .common import INTERPRETING, compute_capability, head_dim_block

ENV_VARIABLE = "FUSED_ATTN_AUTOTUNE"
MODES = ("1", "0", "force")
TUNED_DIR = Path(__file__).with_name("tuned")
KERNELS = ("forward", "dkdv", "dq", "bias_grad", "decode")
# A candidate replaces the default only when it is this much faster: smaller gains are timing noise,
# and keeping the default then keeps the choice the same from run to run.
MIN_GAIN = 0.03


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile (decode: packed query rows x GQA group)
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int  # software-pipelining depth of the loads in the kernel's inner loop
    # the tiles the kernel's loop streams (forward and dq: k and v; dkdv: q and do) copied by the TMA
    # engine through tensor descriptors instead of loaded by every thread through pointers, where
    # the call's tensors allow it (common.takes_tensor_descriptors)
    tma: bool = False

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}" + (" tma" if self.tma else "")


class ShapeClass(NamedTuple):
    """What the best tiles of a launch depend on, besides the GPU architecture. (A NamedTuple: every
    launch builds one, in a fraction of a frozen dataclass's time.)"""

    kernel: str  # one of KERNELS
    head_dim: int  # max(D, Dv) padded to the tile width
    dtype_bytes: int  # 2 (fp16, bf16) or 4 (fp32)
    causal: bool  # causal or a sliding window: key blocks are skipped and the diagonal ones masked
    block_m: int = 0  # decode only: its rows (query positions x GQA group) are fixed by the call

    @staticmethod
    def of(kernel: str, q: torch.Tensor, v: torch.Tensor, opts, block_m: int = 0) -> ShapeClass:
        """The class of a call with queries q and values v (any layout: the head dim is last)."""
        return ShapeClass(kernel, head_dim_block(max(q.shape[-1], v.shape[-1])), q.element_size(),
                          opts.left >= 0 or opts.right >= 0, block_m)

    @property
    def key(self) -> str:
        key = f"{self.kernel}/d{self.head_dim}/{8 * self.dtype_bytes}bit/{'causal' if self.causal else 'full'}"
        return key + (f"/m{self.block_m}" if self.block_m else "")


def interpreter_tiles(shape: ShapeClass) -> TileConfig:
    """Under the interpreter warps and stages mean nothing, and 32-wide tiles keep CPU CI quick."""
    return TileConfig(shape.block_m or 32, 32, 1, 1)


# The fixed tiles of each class, by kernel: (largest padded head dim, tiles), the first that holds.
# Each keeps the kernel's values in registers on sm_80 and sm_90 (tests/aot_compile.py checks the
# compiler's spills, Triton 3.9). Bigger tiles spill in the loop: the dk/dv kernel holds k, v, dk and
# dv for the whole loop (64 x 64 with 4 warps spilled 820 bytes per thread at head dim 128, sm_90), and
# fp32 dots are unrolled into FMAs whose operands all sit in registers (64 x 64: 62 KB at head dim 64).
# The 16-bit dk/dv tiles own 64 or 128 keys, so that on Hopper its four products are all wgmma (the
# keys are their rows); 32 x 32 ran them all on mma.sync.
_DEFAULTS_16BIT = {
    "forward": ((64, (128, 64, 4, 3)), (128, (128, 64, 8, 2)), (256, (32, 32, 4, 2))),
    "dq": ((128, (64, 64, 4, 2)), (256, (32, 32, 4, 1))),
    "dkdv": ((64, (32, 128, 8, 3)), (128, (16, 64, 8, 3)), (256, (16, 32, 8, 2))),
    "bias_grad": ((64, (64, 64, 8, 2)), (128, (32, 64, 8, 2)), (256, (16, 32, 8, 2))),
}
_DEFAULTS_FP32 = {
    "forward": ((64, (32, 32, 8, 2)), (256, (16, 32, 8, 2))),
    "dq": ((128, (32, 32, 8, 2)), (256, (16, 32, 8, 2))),
    "dkdv": ((64, (32, 32, 8, 2)), (128, (16, 16, 8, 2)), (256, (16, 16, 8, 1))),
    "bias_grad": ((256, (16, 32, 8, 2)),),
}


@functools.lru_cache(maxsize=1024)
def default_tiles(shape: ShapeClass) -> TileConfig:
    """The fixed tiles of a class: the fallback, and all that fp32 classes ever run."""
    if shape.kernel == "decode":  # its rows are the call's
        if shape.dtype_bytes > 2:
            return TileConfig(shape.block_m, 32, 8, 2)
        return TileConfig(shape.block_m, 64 if shape.head_dim <= 128 else 32, 4, 2)
    table = (_DEFAULTS_16BIT if shape.dtype_bytes <= 2 else _DEFAULTS_FP32)[shape.kernel]
    return next(TileConfig(*tiles) for largest, tiles in table if shape.head_dim <= largest)


# Candidates per kernel, (block_m, block_n, num_warps, num_stages[, tma]); decode's are (block_n,
# num_warps, num_stages), its block_m being fixed by the call. dkdv owns block_n keys and steps over the
# queries block_m at a time; forward, dq and bias_grad own block_m queries and step over the keys.
# Hopper: wgmma runs on warpgroups of 4 warps that cover 64 rows each, so a 128-row block takes 8
# warps; 227 KB of shared memory hold 2-3 stages of the streamed tiles even at head dim 128. Some
# tiles are also tried with TMA copies of the streamed operands, which free the registers that hold
# the addresses of every thread's share of a tile (forward, sm_90, head dim 128, 128 x 64: 190 -> 159).
_HOPPER = {
    "forward": ((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3),
                (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 2, True), (128, 128, 8, 2, True),
                (128, 128, 8, 3, True)),
    "dkdv": ((16, 64, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (32, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2),
             (64, 128, 8, 3), (64, 64, 4, 3, True), (64, 128, 8, 2, True), (64, 128, 8, 3, True)),
    "dq": ((64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2),
           (128, 64, 8, 3), (64, 64, 4, 3, True), (128, 64, 8, 2, True), (128, 64, 8, 3, True)),
    "bias_grad": ((64, 64, 8, 2), (32, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2)),
    "decode": ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (128, 8, 4), (256, 8, 3)),
}
# Ampere and every other architecture: mma.sync per warp and cp.async, which keeps num_stages - 1
# tiles in flight; 99-163 KB of shared memory.
_OTHER = {
    "forward": ((128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                (64, 64, 4, 4), (128, 128, 8, 2)),
    "dkdv": ((32, 32, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (32, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2)),
    "dq": ((64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 2), (128, 32, 8, 3), (128, 64, 8, 2)),
    "bias_grad": ((64, 64, 8, 2), (32, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2)),
    "decode": ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4)),
}


def candidates(shape: ShapeClass, major: int, tma: bool = True) -> tuple[TileConfig, ...]:
    """The tiles tuning tries for a class on a GPU of compute capability `major`.x, default first;
    those with TMA copies only when `tma` (the call's tensors allow descriptors).

    fp32 classes keep their default: without tensor cores each fp32 candidate compiles for 15-60 s
    (the dot is unrolled into FMAs), which would stall a first call for minutes.
    """
    default = default_tiles(shape)
    if shape.dtype_bytes > 2:
        return (default,)
    table = (_HOPPER if major == 9 else _OTHER)[shape.kernel]
    if shape.kernel == "decode":
        table = tuple((shape.block_m, *entry) for entry in table)
    tiles = (TileConfig(*entry) for entry in table)
    return tuple(dict.fromkeys([default, *(t for t in tiles if tma or not t.tma)]))


@functools.lru_cache(maxsize=4096)  # every launch asks whether its class's choice fits
def shared_memory_bytes(shape: ShapeClass, tiles: TileConfig, major: int, mask_bytes: int = 0) -> int:
    """An upper bound on the shared memory of a launch on compute capability `major`.x, checked
    against Triton's compiler for every candidate in tests/aot_compile.py.

    The loads of a kernel's inner loop are multi-buffered. Where its dots run on Hopper's wgmma
    (64 rows or more, a warpgroup covering 64: block_m, or dkdv's block_n), the dot reads its
    operands from shared memory while the next loads land: num_stages buffers. With mma.sync (other
    GPUs, or fewer rows) num_stages - 1 are in flight, and the probabilities may pass through shared
    memory on their way to the second dot. The tiles a program loads once, the scratch of transposes and, when the call has a mask or
    bias (mask_bytes: its element size), a (block_m x block_n) tile of it stay there too. TMA copies
    land in buffers aligned to 1 KB (the 128-byte swizzle's period), with an mbarrier per stage.
    """
    m, n, d = tiles.block_m, tiles.block_n, shape.head_dim
    # the rows of a program's products: its queries, but dk/dv's keys (backward.py, KEYS_AS_ROWS)
    rows = n if shape.kernel == "dkdv" else m
    wgmma = major >= 9 and rows >= 64
    buffers = max(tiles.num_stages if wgmma else tiles.num_stages - 1, 1)
    probabilities = 0 if wgmma else m * n
    streamed, resident = {
        "forward": (2 * n * d, m * d + probabilities + 2 * m),  # k and v per step; q, row max and sum
        "decode": (2 * n * d, m * d + probabilities + 2 * m),
        "dkdv": (2 * m * d + 4 * m, 2 * n * d + m * n),  # q, do, lse and delta per step; k, v, p^T
        "dq": (2 * n * d, 2 * m * d + m * n),  # k and v per step; q, do, ds
        "bias_grad": (2 * n * d, 2 * m * d + m * n),
    }[shape.kernel]
    return shape.dtype_bytes * (buffers * streamed + resident) + m * n * mask_bytes + (_TMA_PADDING if tiles.tma else 0)


_TMA_PADDING = 1024


def mask_bytes(extras) -> int:
    """Element size of the mask or bias a call's kernels load tile by tile (0: none)."""
    mask = extras.mask if extras.mask is not None else extras.bias
    return 0 if mask is None else mask.element_size()


class DeviceInfo(NamedTuple):
    arch: str  # "sm90": the key of the shipped choices
    major: int
    multiprocessors: int
    shared_memory: int  # bytes a block may use: Triton refuses to launch a kernel that needs more


@functools.cache
def _device_info(index: int) -> DeviceInfo:
    major, minor = compute_capability(index)
    shared_memory = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return DeviceInfo(f"sm{major}{minor}", major, torch.cuda.get_device_properties(index).multi_processor_count,
                      shared_memory)


def device_info(device: torch.device) -> DeviceInfo:
    return _device_info(device.index if device.index is not None else torch.cuda.current_device())


def autotune_mode() -> str:
    mode = os.environ.get(ENV_VARIABLE, "1")
    if mode not in MODES:
        raise ValueError(f"the {ENV_VARIABLE} environment variable must be one of {MODES}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class Tuned:
    tiles: TileConfig
    default: TileConfig
    timings: dict[TileConfig, float]  # median milliseconds of every candidate that ran
    failed: dict[TileConfig, str] = field(default_factory=dict)  # candidates the compiler refused, and why


# (arch, shape key) -> choice tuned in this process.
_tuned: dict[tuple[str, str], Tuned] = {}


def tuned_choices(arch: str) -> dict[str, Tuned]:
    """The choices tuned in this process for an architecture, by shape key."""
    return {key: tuned for (tuned_arch, key), tuned in _tuned.items() if tuned_arch == arch}


def select(shape: ShapeClass, device: torch.device, launch: Callable[[TileConfig], object],
           grid: Callable[[TileConfig], tuple[int, ...]], *, mask_bytes: int = 0,
           reproducible: bool = False, tma: bool = False) -> TileConfig:
    """The tiles for a launch of class `shape` on `device`, tuned first if it is time (module doc).

    launch(tiles) runs the call with those tiles and grid(tiles) is its launch grid; mask_bytes is
    the element size of the call's mask or bias (0: none); reproducible calls must give the same
    bits in every process; tma says whether the tensors the kernel streams can be read through
    tensor descriptors (else a class's TMA choice runs with pointer loads, tiles otherwise the same).
    """
    if INTERPRETING:
        return interpreter_tiles(shape)
    mode = autotune_mode()
    default = default_tiles(shape)
    if mode == "0":
        return default
    info = device_info(device)

    def fits(tiles: TileConfig) -> bool:
        return shared_memory_bytes(shape, tiles, info.major, mask_bytes) <= info.shared_memory

    key = (info.arch, shape.key)
    chosen = None
    if key in _tuned and not reproducible:
        chosen = _tuned[key].tiles
    elif mode != "force":
        chosen = shipped_choices(info.arch).get(shape.key)
    if (chosen is None and not reproducible and not torch.cuda.is_current_stream_capturing()
            and math.prod(grid(default)) >= info.multiprocessors):
        _tuned[key] = _tune(shape, launch, default, fits, info.major, tma)
        chosen = _tuned[key].tiles
    if chosen is not None and chosen.tma and not tma:
        chosen = replace(chosen, tma=False)
    # The class's choice may not fit this call: a mask or bias tile takes shared memory too.
    return chosen if chosen is not None and fits(chosen) else default


def measure(run: Callable[[], object]) -> float:
    """Median milliseconds of run() over about 20 ms of repeats (CUDA events, L2 flushed between)."""
    return triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")


def compile_error_summary(error: Exception) -> str:
    """The first line of a compiler error (ptxas's message, say), or its type when it has none."""
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _tune(shape: ShapeClass, launch: Callable[[TileConfig], object], default: TileConfig,
          fits: Callable[[TileConfig], bool], major: int, tma: bool) -> Tuned:
    timings, failed = {}, {}
    for tiles in filter(fits, candidates(shape, major, tma)):
        try:
            timings[tiles] = measure(functools.partial(launch, tiles))
        except triton.errors.TritonError as error:
            # The shared-memory bound is checked, but the compiler has the last word, and some
            # releases fail on some tiles (Triton 3.6's ptxas crashes on sm_90 TMA forward tiles
            # that 3.9 compiles). A candidate is skipped; the default failing is the call's error.
            if tiles == default:
                raise
            failed[tiles] = compile_error_summary(error)
    best = min(timings, key=timings.get, default=default)
    if default in timings and timings[best] > (1 - MIN_GAIN) * timings[default]:
        best = default
    return Tuned(best, default, timings, failed)


# Shipped choices: fused_attn/triton/tuned/<arch>.json, written by `python -m benchmarks.tune`.


@functools.cache
def shipped_choices(arch: str) -> dict[str, TileConfig]:
    """The tuned tiles shipped for an architecture, by shape key (none when there is no file)."""
    path = TUNED_DIR / f"{arch}.json"
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())["choices"]
    return {key: TileConfig(**entry["tiles"]) for key, entry in entries.items()}


def choice_entry(tuned: Tuned, tuned_on: str) -> dict:
    """One shipped choice as JSON: the tiles, then what the tuning measured (for people; not read back)."""
    return {
        "tiles": asdict(tuned.tiles),
        "ms": _rounded(tuned.timings.get(tuned.tiles)),
        "default_ms": _rounded(tuned.timings.get(tuned.default)),
        "tuned_on": tuned_on,
        "candidates_ms": {str(tiles): _rounded(ms) for tiles, ms in tuned.timings.items()},
        "failed": {str(tiles): why for tiles, why in tuned.failed.items()},
    }


def _rounded(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 4)
