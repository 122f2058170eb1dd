"""Build script for fused_attn.

Install for development with::

    pip install --no-build-isolation --no-deps -e .

(``--no-build-isolation`` so the build sees the installed torch instead of downloading one.)

The C++ (CPU) and CUDA fallback kernels in csrc/ will be added through ``native_extensions()``
below; everything else is a plain pure-Python package.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    """Return the list of compiled extensions (``ext_modules``) to build.

    Empty for now: the package is pure Python (Triton kernels are JIT-compiled at run time).

    When csrc/ gets its kernels, build them here with torch.utils.cpp_extension (import torch
    inside this function so that metadata-only commands work without torch), e.g. a
    CppExtension for csrc/cpu/*.cpp plus, only when
    ``torch.version.cuda is not None and CUDA_HOME is not None`` (not torch.cuda.is_available(),
    see shared/FACTS.md), a CUDAExtension for csrc/cuda/*.cu; and return
    ``{"build_ext": BuildExtension.with_options(use_ninja=True)}`` from ``native_cmdclass()``.
    Do not hard-code ``-std=``: torch chooses the C++ standard.
    """
    return []


def native_cmdclass():
    """cmdclass for building native_extensions(); empty while there are none."""
    return {}


def read_readme():
    path = os.path.join(HERE, "README.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return ""


setup(
    name="fused_attn",
    version="0.1.0",
    description="Fused, memory-efficient scaled-dot-product attention for PyTorch (Triton kernels)",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fused_attn", "fused_attn.*"]),
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
