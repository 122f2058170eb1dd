"""Compile every Triton kernel for a GPU architecture without a GPU (run as a script).

Triton's interpreter executes the kernels on CPU but never compiles them, so type errors,
unsupported operations and resource overruns only show on a GPU. This script runs the real
compiler down to a cubin for the given target: each kernel with every feature off and on, then
every candidate tile configuration that tuning may pick (fused_attn/triton/tuning.py), checking
that the shared memory it compiles to stays within tuning's bound, then every class's default
tiles in 16-bit and fp32, checking that they keep the kernel's values in registers (the spills
ptxas reports: at most MAX_DEFAULT_SPILL bytes per thread), and on sm_90 that the 16-bit forward,
dq and dk/dv defaults run every product on wgmma (runs_on_wgmma).

    python tests/aot_compile.py 90     # sm_90 (Hopper); prints the job count, then one line per job
"""
import contextlib
import inspect
import io
import os
import re
import sys
from typing import NamedTuple

os.environ.pop("TRITON_INTERPRET", None)  # must be off before the kernels are decorated

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_attn.triton import tuning  # noqa: E402
from fused_attn.triton.backward import _delta_kernel, _dkdv_kernel, _dq_kernel  # noqa: E402
from fused_attn.triton.bias_grad import _bias_grad_kernel  # noqa: E402
from fused_attn.triton.decode import _append_kernel, _decode_kernel, _merge_splits_kernel  # noqa: E402
from fused_attn.triton.forward import _forward_kernel  # noqa: E402

FP32_POINTERS = {"Lse", "Delta", "DLse", "Slopes", "DBias", "OutPartial", "LsePartial"}
INT32_POINTERS = {"CuSeqQ", "CuSeqK", "CacheSeqlens", "BlockTable"}
FLOAT_SCALARS = {"inv_keep", "scale", "softcap"}
# The last-dim strides of contiguous tensors: q, k, v, out, do, dk, dv, dq, the bias gradient, the mask.
UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_gd", "stride_dkd", "stride_dvd",
                "stride_dqd", "stride_dn", "stride_mn"}
KERNEL_FUNCTIONS = {"forward": _forward_kernel, "dkdv": _dkdv_kernel, "dq": _dq_kernel,
                    "bias_grad": _bias_grad_kernel, "decode": _decode_kernel}
# Bytes of shared memory a block may use on the A100 and on the H100: the candidates tuning would try there.
SHARED_MEMORY = {80: 166912, 90: 232448}
PLAIN = {"TMA": False, "VARLEN": False, "BOTTOM_RIGHT": False, "HAS_LEFT": False, "HAS_RIGHT": False, "SOFTCAP": False,
         "HAS_ALIBI": False, "MASK_KIND": 0, "DROPOUT": False, "UPCAST": False, "DOT_PRECISION": "ieee", "PAGED": False,
         "INT64_OFFSETS": False}


def signature(kernel, constexprs, data_type, mask_type):
    """Triton type strings by parameter name: capitalised names are pointers."""
    types = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in FP32_POINTERS:
            types[name] = "*fp32"
        elif name in INT32_POINTERS:
            types[name] = "*i32"
        elif name == "Seed":
            types[name] = "*i64"
        elif name == "Mask":
            types[name] = mask_type
        elif name[0].isupper():
            types[name] = data_type
        elif name in FLOAT_SCALARS:
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def descriptor_types(kernel, constexprs, element):
    """The types of the tensors a kernel streams through tensor descriptors with TMA tiles:
    (1, 1, rows, head dim) boxes of K and V (forward, dq) or of Q and dO (dkdv)."""
    def box(rows, cols):
        return f"tensordesc<{element}[1, 1, {constexprs[rows]}, {constexprs[cols]}]>"

    if kernel is _dkdv_kernel:
        return {"Q": box("BLOCK_M", "BLOCK_D"), "DOut": box("BLOCK_M", "BLOCK_DV")}
    return {"K": box("BLOCK_N", "BLOCK_D"), "V": box("BLOCK_N", "BLOCK_DV")}


# Bytes a default's thread may spill: a few registers saved around the epilogue, not the loop's tiles
# (the defaults they replaced spilled 40 bytes to 62 KB).
MAX_DEFAULT_SPILL = 16


class Compiled(NamedTuple):
    shared: int  # bytes of shared memory
    spilled: int  # bytes of registers spilled per thread (ptxas's spill stores)
    warp_mmas: int  # mma.sync instructions in the PTX: products run by single warps, not Hopper's wgmma


def compile_kernel(kernel, constexprs, target, data_type="*bf16", mask_type="*bf16", num_warps=4, num_stages=2,
                   contiguous=False, pointer_types=None) -> Compiled:
    """Compile down to a cubin: its shared memory and spills.

    contiguous: specialise as Triton's JIT does for contiguous, 16-byte aligned tensors: unit strides
    become constants, and the other strides and the pointers are known multiples of 16. Only then do
    the loads vectorise and the inner loops pipeline (num_stages buffers), as on the GPU.
    With TMA=True in constexprs, the streamed operands are tensor descriptors (descriptor_types).
    pointer_types overrides the types signature() gives pointers by name.
    """
    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = {name: value for name, value in constexprs.items() if name in names}
    if contiguous:
        constexprs.update({name: 1 for name in names if name in UNIT_STRIDES})
    types = signature(kernel, constexprs, data_type, mask_type)
    types.update(pointer_types or {})
    if constexprs.get("TMA"):
        types.update(descriptor_types(kernel, constexprs, data_type.lstrip("*")))
    aligned = [name for name, kind in types.items()
               if contiguous and (kind.startswith("*") or (name.startswith("stride_") and kind != "constexpr"))]
    source = ASTSource(fn=kernel, signature=types,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # where Triton prints ptxas's report
        compiled = triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    spilled = sum(int(count) for count in re.findall(r"(\d+) bytes spill stores", log.getvalue()))
    return Compiled(compiled.metadata.shared, spilled, compiled.asm["ptx"].count("mma.sync"))


def feature_jobs():
    """(name, kernel, constexprs, compile keywords): each kernel with every feature off and on."""
    shapes = dict(HEAD_DIM=128, HEAD_DIM_V=128, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=128)
    everything = dict(PLAIN, BOTTOM_RIGHT=True, HAS_LEFT=True, HAS_RIGHT=True, SOFTCAP=True, HAS_ALIBI=True,
                      MASK_KIND=2, DROPOUT=True, PAGED=True)
    varlen = dict(PLAIN, VARLEN=True, HAS_RIGHT=True, DROPOUT=True)
    # tensors whose (batch, head) slices pass 2^31 elements: int64 offsets
    large = dict(everything, MASK_KIND=1, PAGED=False, INT64_OFFSETS=True)
    bias_dims = dict(FULL_BATCH=False, FULL_HEADS=True, FULL_ROWS=True, FULL_COLS=True)
    return [
        ("forward", _forward_kernel, dict(shapes, **PLAIN), {}),
        ("forward+all", _forward_kernel, dict(shapes, **everything), {}),
        ("forward+all+tma", _forward_kernel, dict(shapes, **dict(everything, TMA=True)), {}),
        ("forward+varlen", _forward_kernel, dict(shapes, **varlen), {}),
        ("forward+bool-mask-fp32", _forward_kernel, dict(shapes, **dict(PLAIN, MASK_KIND=1), BLOCK_M=32),
         dict(data_type="*fp32", mask_type="*u8")),
        ("forward+bool-mask", _forward_kernel, dict(shapes, **dict(everything, MASK_KIND=1)), dict(mask_type="*u8")),
        ("forward+int64-offsets", _forward_kernel, dict(shapes, **large), dict(mask_type="*u8")),
        ("forward+varlen+int64-offsets", _forward_kernel, dict(shapes, **dict(varlen, INT64_OFFSETS=True)), {}),
        ("delta", _delta_kernel, dict(HEAD_DIM_V=128, BLOCK_M=64, BLOCK_DV=128, VARLEN=False, INT64_OFFSETS=False), {}),
        ("delta+varlen+int64-offsets", _delta_kernel,
         dict(HEAD_DIM_V=128, BLOCK_M=64, BLOCK_DV=128, VARLEN=True, INT64_OFFSETS=True), {}),
        ("dkdv", _dkdv_kernel, dict(shapes, **PLAIN), {}),
        ("dkdv+all", _dkdv_kernel, dict(shapes, **everything), {}),
        ("dkdv+all+tma", _dkdv_kernel, dict(shapes, **dict(everything, TMA=True)), {}),
        ("dkdv+bool-mask", _dkdv_kernel, dict(shapes, **dict(everything, MASK_KIND=1)), dict(mask_type="*u8")),
        ("dkdv+int64-offsets", _dkdv_kernel, dict(shapes, **large), dict(mask_type="*u8")),
        ("dq+all", _dq_kernel, dict(shapes, **everything), {}),
        ("dq+all+tma", _dq_kernel, dict(shapes, **dict(everything, TMA=True)), {}),
        ("dq+bool-mask", _dq_kernel, dict(shapes, **dict(everything, MASK_KIND=1)), dict(mask_type="*u8")),
        ("dq+varlen", _dq_kernel, dict(shapes, **varlen), {}),
        ("dq+int64-offsets", _dq_kernel, dict(shapes, **large), dict(mask_type="*u8")),
        ("bias-grad", _bias_grad_kernel, dict(shapes, **everything, **bias_dims), {}),
        ("bias-grad+int64-offsets", _bias_grad_kernel, dict(shapes, **dict(everything, INT64_OFFSETS=True), **bias_dims),
         {}),
        ("decode+all", _decode_kernel, dict(shapes, **everything), {}),
        # one split stores its rows in the output's dtype, straight into out
        ("decode-one-split", _decode_kernel, dict(shapes, **PLAIN), dict(pointer_types={"OutPartial": "*bf16"})),
        ("merge-splits", _merge_splits_kernel, dict(HEAD_DIM_V=128, BLOCK_R=16, BLOCK_DV=128), {}),
        ("append-paged", _append_kernel, dict(HEAD_DIM=128, HEAD_DIM_V=128, BLOCK_H=8, BLOCK_D=128, BLOCK_DV=128,
                                              PAGED=True), {}),
    ]


def candidate_jobs(capability):
    """(shape class, tiles, mask bytes) of every candidate tuning may try on this architecture, once
    each, at the widest 16-bit head dim of the benchmarks (64, 128) it fits: the most shared memory and
    registers it will see there.
    bias_grad always runs with a bias (bf16 here)."""
    major = capability // 10
    jobs = []
    for kernel in tuning.KERNELS:
        mask_bytes = 2 if kernel == "bias_grad" else 0
        widest = {}
        for head_dim in (64, 128):
            shape = tuning.ShapeClass(kernel, head_dim, 2, False, 16 if kernel == "decode" else 0)
            for tiles in tuning.candidates(shape, major):
                if tuning.shared_memory_bytes(shape, tiles, major, mask_bytes) <= SHARED_MEMORY[capability]:
                    widest[tiles] = shape
        jobs += [(shape, tiles, mask_bytes) for tiles, shape in widest.items()]
    return jobs


def default_jobs():
    """(shape class, its default tiles, mask bytes): every kernel in 16-bit and fp32 at head dims 64,
    128 and 256 (decode: 16 rows); bias_grad with its bias."""
    jobs = []
    for kernel in tuning.KERNELS:
        for dtype_bytes in (2, 4):
            for head_dim in (64, 128, 256):
                shape = tuning.ShapeClass(kernel, head_dim, dtype_bytes, False, 16 if kernel == "decode" else 0)
                jobs.append((shape, tuning.default_tiles(shape), dtype_bytes if kernel == "bias_grad" else 0))
    return jobs


def runs_on_wgmma(shape, capability) -> bool:
    """Whether a default must run every product on Hopper's wgmma: the 16-bit forward, dq and dk/dv
    at the benchmarks' head dims (64, 128) on sm_90. (Decoding has 16 query rows, fewer than a
    warpgroup's 64; fp32 dots are FMAs.)"""
    return (capability == 90 and shape.kernel in ("forward", "dq", "dkdv") and shape.dtype_bytes == 2
            and shape.head_dim in (64, 128))


def compile_candidate(shape, tiles, mask_bytes, target):
    head_dims = dict(HEAD_DIM=shape.head_dim, HEAD_DIM_V=shape.head_dim, BLOCK_D=shape.head_dim,
                     BLOCK_DV=shape.head_dim)
    constexprs = dict(PLAIN, **head_dims, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, TMA=tiles.tma,
                      MASK_KIND=2 if mask_bytes else 0, FULL_BATCH=False, FULL_HEADS=True, FULL_ROWS=True,
                      FULL_COLS=True)
    data_type = "*bf16" if shape.dtype_bytes == 2 else "*fp32"
    return compile_kernel(KERNEL_FUNCTIONS[shape.kernel], constexprs, target, data_type=data_type,
                          mask_type=data_type, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                          contiguous=True)


def main(capability):
    target = GPUTarget("cuda", capability, 32)
    # ptxas reports its spills only when it runs, and only through a knob older Tritons lack
    spills_reported = hasattr(knobs.nvidia, "dump_ptxas_log")
    if spills_reported:
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
    else:
        print(f"triton {triton.__version__} does not report ptxas's spills: the defaults' are not checked",
              file=sys.stderr)
    features, tiles, defaults = feature_jobs(), candidate_jobs(capability), default_jobs()
    print(f"{len(features) + len(tiles) + len(defaults)} jobs", flush=True)
    for name, kernel, constexprs, types in features:
        compiled = compile_kernel(kernel, constexprs, target, **types)
        print(f"sm_{capability} {name}: compiled, {compiled.shared} bytes of shared memory", flush=True)
    failures = []
    for shape, candidate, mask_bytes in tiles:
        try:
            compiled = compile_candidate(shape, candidate, mask_bytes, target)
        except triton.errors.TritonError as error:  # go on: one run lists every candidate that fails
            failures.append(f"sm_{capability} {shape.key} {candidate} does not compile: {tuning.compile_error_summary(error)}")
            print(failures[-1], flush=True)
            continue
        bound = tuning.shared_memory_bytes(shape, candidate, capability // 10, mask_bytes)
        line = (f"sm_{capability} {shape.key} {candidate}: compiled, {compiled.shared} bytes of shared memory "
                f"(bound {bound}), {compiled.spilled} spilled")
        print(line, flush=True)
        if compiled.shared > bound:
            failures.append(f"tuning's shared-memory bound is too low: {line}")
    for shape, default, mask_bytes in defaults:
        compiled = compile_candidate(shape, default, mask_bytes, target)
        line = f"sm_{capability} {shape.key} default {default}: compiled, {compiled.spilled} bytes spilled"
        print(line, flush=True)
        if spills_reported and compiled.spilled > MAX_DEFAULT_SPILL:
            failures.append(f"a default spills: {line}")
        if runs_on_wgmma(shape, capability) and compiled.warp_mmas:
            failures.append(f"a default runs {compiled.warp_mmas} products on mma.sync, not wgmma: {line}")
    if failures:
        sys.exit("\n".join(failures))


if __name__ == "__main__":
    main(int(sys.argv[1]))
