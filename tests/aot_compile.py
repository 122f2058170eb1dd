"""Compile every Triton kernel for a GPU architecture without a GPU (run as a script).

Triton's interpreter executes the kernels on CPU but never compiles them, so type errors,
unsupported operations and resource overruns only show on a GPU. This script runs the real
compiler down to a cubin for the given target, for each kernel with every feature off and on.

    python tests/aot_compile.py 90     # sm_90 (Hopper); prints one line per kernel
"""
import inspect
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # must be off before the kernels are decorated

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_attn.triton.backward import _delta_kernel, _dkdv_kernel, _dq_kernel  # noqa: E402
from fused_attn.triton.bias_grad import _bias_grad_kernel  # noqa: E402
from fused_attn.triton.decode import _decode_kernel  # noqa: E402
from fused_attn.triton.forward import _forward_kernel  # noqa: E402

FP32_POINTERS = {"Lse", "Delta", "DLse", "Slopes", "DBias", "OutPartial", "LsePartial"}
INT32_POINTERS = {"CuSeqQ", "CuSeqK", "CacheSeqlens", "BlockTable"}
FLOAT_SCALARS = {"inv_keep", "scale", "softcap"}


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


def compile_kernel(kernel, constexprs, target, data_type="*bf16", mask_type="*bf16", num_warps=4, num_stages=2):
    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = {name: value for name, value in constexprs.items() if name in names}
    source = ASTSource(fn=kernel, signature=signature(kernel, constexprs, data_type, mask_type),
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.metadata.shared


def main(capability):
    target = GPUTarget("cuda", capability, 32)
    shapes = dict(HEAD_DIM=128, HEAD_DIM_V=128, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=128)
    plain = dict(VARLEN=False, BOTTOM_RIGHT=False, HAS_LEFT=False, HAS_RIGHT=False, SOFTCAP=False, HAS_ALIBI=False,
                 MASK_KIND=0, DROPOUT=False, UPCAST=False, DOT_PRECISION="ieee", PAGED=False)
    everything = dict(plain, BOTTOM_RIGHT=True, HAS_LEFT=True, HAS_RIGHT=True, SOFTCAP=True, HAS_ALIBI=True,
                      MASK_KIND=2, DROPOUT=True, PAGED=True)
    varlen = dict(plain, VARLEN=True, HAS_RIGHT=True, DROPOUT=True)
    bias_dims = dict(FULL_BATCH=False, FULL_HEADS=True, FULL_ROWS=True, FULL_COLS=True)
    jobs = [
        ("forward", _forward_kernel, dict(shapes, **plain), {}),
        ("forward+all", _forward_kernel, dict(shapes, **everything), {}),
        ("forward+varlen", _forward_kernel, dict(shapes, **varlen), {}),
        ("forward+bool-mask-fp32", _forward_kernel, dict(shapes, **dict(plain, MASK_KIND=1), BLOCK_M=32),
         dict(data_type="*fp32", mask_type="*u8")),
        ("delta", _delta_kernel, dict(HEAD_DIM_V=128, BLOCK_M=64, BLOCK_DV=128, VARLEN=False), {}),
        ("dkdv", _dkdv_kernel, dict(shapes, **plain), {}),
        ("dkdv+all", _dkdv_kernel, dict(shapes, **everything), {}),
        ("dq+all", _dq_kernel, dict(shapes, **everything), {}),
        ("dq+varlen", _dq_kernel, dict(shapes, **varlen), {}),
        ("bias-grad", _bias_grad_kernel, dict(shapes, **everything, **bias_dims), {}),
        ("decode+all", _decode_kernel, dict(shapes, **everything), {}),
    ]
    for name, kernel, constexprs, types in jobs:
        shared = compile_kernel(kernel, constexprs, target, **types)
        print(f"sm_{capability} {name}: compiled, {shared} bytes of shared memory")


if __name__ == "__main__":
    main(int(sys.argv[1]))
