"""The CUDA kernels (csrc/cuda/*.cu) compile for Ampere and Hopper with warnings as errors, and
csrc/binding.cpp's CUDA section compiles (real and emulated modes), checked without a GPU.

nvcc builds each .cu for sm_80 and sm_90 with the flags torch's extension builder adds (its half
conversion switches included) and ptxas warnings on register spills and local memory, so a kernel
that keeps arrays in local memory (slow) fails here. The binding is compiled with -fsyntax-only against the installed (CPU) torch's headers and
the toolkit's cuda_runtime_api.h. Skips, saying why, where nvcc or the CUDA headers are missing.
"""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")
KERNEL_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
ARCHITECTURES = ("80", "90")


def cuda_home():
    """A CUDA toolkit directory with its headers (nvcc on PATH may be a wrapper outside it)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for candidate in candidates:
        if candidate and os.path.exists(os.path.join(candidate, "include", "cuda_runtime_api.h")):
            return candidate
    return None


CUDA_HOME = cuda_home()
NVCC = shutil.which("nvcc")
needs_toolkit = pytest.mark.skipif(NVCC is None or CUDA_HOME is None,
                                   reason=f"needs nvcc on PATH (found {NVCC}) and CUDA headers (found {CUDA_HOME})")


def test_every_kernel_file_is_checked():
    """setup.py builds exactly the .cu files this test compiles."""
    import ast

    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    listed = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CUDA_SOURCES")
    assert sorted(os.path.join(REPO, path) for path in listed) == KERNEL_FILES


@needs_toolkit
@pytest.mark.parametrize("source", KERNEL_FILES, ids=os.path.basename)
def test_kernels_compile_for_sm80_and_sm90(source, tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHITECTURES]
    command = [NVCC, "-c", "-std=c++17", "-O3", *gencode, *COMMON_NVCC_FLAGS, f"-I{CSRC}",
               "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas", "-warn-spills,-warn-lmem-usage,-Werror",
               source, "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]


def torch_include_flags():
    from torch.utils.cpp_extension import include_paths

    return [f"-I{path}" for path in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]


@needs_toolkit
@pytest.mark.parametrize("mode", ["cuda", "emulated"])
def test_binding_cuda_section_compiles(mode):
    defines = ["-DFUSED_ATTN_WITH_CUDA", f"-I{os.path.join(CUDA_HOME, 'include')}"]
    if mode == "emulated":
        defines += ["-DFUSED_ATTN_EMULATOR", f"-I{os.path.join(REPO, 'tests', 'cuda_emulator')}"]
    command = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-Wno-missing-field-initializers",
               *defines, *torch_include_flags(), f"-I{CSRC}", os.path.join(CSRC, "binding.cpp")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]
