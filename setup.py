"""Build script for fused_attn.

Install for development with::

    pip install --no-build-isolation --no-deps -e .

(``--no-build-isolation`` so the build sees the installed torch instead of downloading one.)

This builds the C++ kernels in csrc/ into ``fused_attn/_native`` (the CPU backend) with ninja
through torch.utils.cpp_extension. The package works without them: if the extension is missing
or cannot be loaded, fused_attn says why once and CPU calls go to the next backend. So a build
that fails (a compiler without OpenMP or GCC's options, say) does not fail the install: it warns,
and fused_attn/_native_build.txt records why (empty when the build succeeded), which the backends
report. FUSED_ATTN_NATIVE=1 makes a failed build an error (`make` sets it: its tests must run the
kernels); FUSED_ATTN_SKIP_NATIVE=1 installs without building it.

With a CUDA build of torch and a CUDA toolkit (CUDA_HOME with its headers), the same extension
also gets the CUDA kernels of csrc/cuda/ (the `cuda` backend), compiled by nvcc for sm_80 and
sm_90. fused_attn/_native_cuda.txt records why they were not built (empty when they were), and
the backend reports it. FUSED_ATTN_CUDA=0 skips them; FUSED_ATTN_CUDA=1 makes their absence an error;
FUSED_ATTN_CUDA_ARCHS (default "80 90") chooses the architectures.

FUSED_ATTN_SANITIZE=address,undefined compiles the C++ with those sanitizers (any error fatal), for
`make test-sanitized`, which builds such a copy in build/sanitized/ and runs the C++ kernels'
tests there (tests/run_sanitized.sh).
"""
import os
import platform
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Kernel sources compiled with extra flags of their own, after the common sources and linked
# after them (see csrc/cpu/kernels_portable.cpp for why the order matters). The binding picks
# them at run time only on a CPU that has the instruction set.
ISA_SOURCES = {
    "csrc/cpu/kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/kernels_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}

CUDA_SOURCES = ["csrc/cuda/forward.cu", "csrc/cuda/forward_f16.cu", "csrc/cuda/forward_bf16.cu",
                "csrc/cuda/forward_f32.cu", "csrc/cuda/merge_splits.cu", "csrc/cuda/append.cu", "csrc/cuda/backward.cu",
                "csrc/cuda/backward_f16.cu", "csrc/cuda/backward_bf16.cu", "csrc/cuda/backward_f32.cu"]
# Ampere (A100) and Hopper (H100/H200) code by default; newer GPUs run the newest PTX.
# FUSED_ATTN_CUDA_ARCHS (e.g. "90", or "80 90") builds for those architectures only. No
# --use_fast_math: the kernels' expf/logf/tanhf must stay accurate.
DEFAULT_CUDA_ARCHS = "80 90"


def nvcc_flags():
    archs = os.environ.get("FUSED_ATTN_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
    archs = {arch.replace(".", "") for arch in archs.replace(",", " ").replace(";", " ").split()}
    if not archs or any(not arch.isdigit() or int(arch) < 80 for arch in archs):
        raise RuntimeError(f"FUSED_ATTN_CUDA_ARCHS must list compute capabilities >= 80 (e.g. '80 90'), got {archs}")
    archs = sorted(archs, key=int)
    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs[:-1]]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=[sm_{archs[-1]},compute_{archs[-1]}]")
    return ["-O3", *gencode]

CUDA_NOTE = os.path.join(HERE, "fused_attn", "_native_cuda.txt")


def cuda_build_reason():
    """None when the CUDA kernels can be built here, else why not (FUSED_ATTN_CUDA=1: an error)."""
    wanted = os.environ.get("FUSED_ATTN_CUDA")
    if wanted == "0":
        return "FUSED_ATTN_CUDA=0"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        reason = "torch is a CPU-only build (torch.version.cuda is None)"
    elif CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    elif not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        reason = f"the CUDA toolkit at {CUDA_HOME} has no include/cuda_runtime_api.h"
    else:
        return None
    if wanted == "1":
        raise RuntimeError(f"FUSED_ATTN_CUDA=1, but the CUDA kernels cannot be built: {reason}")
    return reason


# Why the C++ extension was not built (empty when it was): fused_attn/backends/native.py reports it.
NATIVE_NOTE = os.path.join(HERE, "fused_attn", "_native_build.txt")


def _write_note(path, reason):
    with open(path, "w", encoding="utf-8") as f:
        f.write("" if reason is None else reason + "\n")


def _is_x86_64_gcc_like():
    return platform.machine().lower() in ("x86_64", "amd64") and os.name == "posix"


def native_extensions():
    """Return the list of compiled extensions (``ext_modules``) to build.

    One CppExtension, ``fused_attn._native``: the torch binding (csrc/binding.cpp) and the CPU
    kernels, built portable and, on x86-64, again for AVX2+FMA and for AVX-512. OpenMP is on so
    at::parallel_for runs in parallel. torch is imported here, not at the top, so that
    metadata-only commands work without it. The C++ standard is left to torch.
    """
    if os.environ.get("FUSED_ATTN_SKIP_NATIVE") == "1":
        _write_note(NATIVE_NOTE, "FUSED_ATTN_SKIP_NATIVE=1 was set when fused_attn was installed")
        _write_note(CUDA_NOTE, "FUSED_ATTN_SKIP_NATIVE=1")
        return []
    try:
        from torch.utils.cpp_extension import CppExtension, CUDAExtension
    except ImportError:
        return []
    sources = ["csrc/binding.cpp", "csrc/cpu/kernels_portable.cpp"]
    isa_sources = {}
    if _is_x86_64_gcc_like():
        isa_sources = ISA_SOURCES
    else:  # compiled without the flags it provides no kernels, and the portable ones serve
        sources += list(ISA_SOURCES)
    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi", "-Wno-unknown-pragmas"]
    link_flags = ["-fopenmp"]
    sanitizer = os.environ.get("FUSED_ATTN_SANITIZE")
    if sanitizer:
        cxx_flags += [f"-fsanitize={sanitizer}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1"]
        link_flags += [f"-fsanitize={sanitizer}"]
    reason = cuda_build_reason()
    _write_note(CUDA_NOTE, reason)
    if reason is None:
        extension = CUDAExtension(
            "fused_attn._native",
            sources + CUDA_SOURCES,
            include_dirs=[os.path.join(HERE, "csrc")],
            depends=_headers(),
            define_macros=[("FUSED_ATTN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags()},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            "fused_attn._native",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            depends=_headers(),
            extra_compile_args=cxx_flags,
            extra_link_args=link_flags,
        )
    extension.isa_sources = isa_sources
    return [extension]


def _headers():
    found = []
    for root, _, files in os.walk(os.path.join(HERE, "csrc")):
        found += [os.path.relpath(os.path.join(root, f), HERE) for f in files if f.endswith((".h", ".cuh"))]
    return sorted(found)


def native_cmdclass():
    """cmdclass building native_extensions() with ninja, plus the per-file ISA flags."""
    if not native_extensions():
        return {}
    from torch.utils.cpp_extension import BuildExtension

    class BuildNative(BuildExtension.with_options(use_ninja=True)):
        """BuildExtension, plus sources compiled with flags of their own (``isa_sources``), and a
        failed build reported instead of failing the install (unless FUSED_ATTN_NATIVE=1).

        setuptools has no per-file flags: each such source is compiled by itself into its own
        build directory and linked in as an extra object, after the common sources.
        """

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # the compiler refused a flag or the code, or is missing
                if os.environ.get("FUSED_ATTN_NATIVE") == "1":
                    raise
                reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
                self._write_native_note(f"its build failed: {reason} (pip install -v shows the compiler's messages)")
                print(f"warning: fused_attn's C++ extension was not built ({reason}); fused_attn installs "
                      "without it and CPU calls use the next backend (FUSED_ATTN_NATIVE=1 makes this an error)",
                      file=sys.stderr)
                self.extensions = []  # nothing to copy or install (build_ext --inplace, editable wheels)
                return
            self._write_native_note(None)

        def _write_native_note(self, reason):
            """NATIVE_NOTE in the source tree, and in the build's copy of the package, which
            build_py made before this command ran (a wheel installs that copy)."""
            _write_note(NATIVE_NOTE, reason)
            if not self.inplace and os.path.isdir(os.path.join(self.build_lib, "fused_attn")):
                _write_note(os.path.join(self.build_lib, "fused_attn", os.path.basename(NATIVE_NOTE)), reason)

        def build_extension(self, ext):
            for source, flags in getattr(ext, "isa_sources", {}).items():
                args = ext.extra_compile_args
                args = {key: value + flags for key, value in args.items()} if isinstance(args, dict) else args + flags
                name = os.path.splitext(os.path.basename(source))[0]
                ext.extra_objects = list(ext.extra_objects or []) + self.compiler.compile(
                    [source],
                    output_dir=os.path.join(self.build_temp, name),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=args,
                    depends=ext.depends,
                )
            super().build_extension(ext)

    return {"build_ext": BuildNative}


def read_readme():
    path = os.path.join(HERE, "README.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return ""


setup(
    name="fused_attn",
    version="0.1.0",
    description="Fused, memory-efficient scaled-dot-product attention for PyTorch (Triton and C++ kernels)",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fused_attn", "fused_attn.*"]),
    # Tile choices tuned per GPU architecture by `python -m benchmarks.tune` (fused_attn/triton/tuning.py).
    package_data={"fused_attn.triton": ["tuned/*.json"], "fused_attn": ["_native_cuda.txt", "_native_build.txt"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "triton; platform_system=='Linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "numpy"],
    },
    ext_modules=native_extensions(),
    cmdclass=native_cmdclass(),
    zip_safe=False,
)
