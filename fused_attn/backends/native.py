"""Loading fused_attn's compiled extension (fused_attn._native, built from csrc/ by setup.py).

Importing it registers the torch.ops.fused_attn_native ops. It is loaded when the backends are
registered (at `import fused_attn`, ~1 ms); when it is missing or fails to load, the reason is kept
(backends report it as their `unavailable_reason`) and a warning says it once, so a broken build
never goes unnoticed yet the package keeps working on its other backends.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

from ..options import AttentionOptions, AttentionTensors
from .base import Tensor, as_4d

_state: dict[str, Optional[str]] = {}


def load_error() -> Optional[str]:
    """None when the extension is loaded (loading it on the first call); else why it is not."""
    if "error" not in _state:
        _state["error"] = _load()
        if _state["error"] is not None:
            warnings.warn(f"fused_attn: the C++ extension is unavailable ({_state['error']}); "
                          "CPU calls use the next backend", stacklevel=3)
    return _state["error"]


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_note(name: str) -> Optional[str]:
    """A note setup.py wrote into the package when it built the extension (fused_attn/<name>):
    empty when the part it is about was built, else why not; None when there is no such file.
    _native_build.txt is about the extension (a failed build does not fail the install),
    _native_cuda.txt about its CUDA kernels."""
    try:
        with open(os.path.join(_PACKAGE, name), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _load() -> Optional[str]:
    try:
        importlib.import_module("fused_attn._native")
    except ImportError as error:
        if getattr(error, "name", None) == "fused_attn._native":
            return "fused_attn._native is not built: " + _why_not_built()
        return f"fused_attn._native failed to load: {error}"
    except OSError as error:  # e.g. a missing shared library
        return f"fused_attn._native failed to load: {error}"
    return None


def _why_not_built() -> str:
    """setup.py's note on the missing extension, or how to build it."""
    note = setup_note("_native_build.txt")
    how = "to build it, run `pip install --no-build-isolation --no-deps -e .` or `make env`"
    return f"{note}; {how}" if note else how


def scores_shape(q: Tensor, k: Tensor) -> tuple[int, int, int, int]:
    """(B, Hq, Lq, Lk) of a dense call."""
    return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def variant_args(q: Tensor, k: Tensor, extras: AttentionTensors, opts: AttentionOptions) -> tuple:
    """The native ops' arguments after their tensors (csrc/binding.cpp, FUSED_ATTN_VARIANT_SCHEMA),
    shared by the cpu and cuda backends."""
    mask, bias, cu_seqlens_q, cu_seqlens_k = extras.mask, extras.bias, extras.cu_seqlens_q, extras.cu_seqlens_k
    if mask is not None:  # (dense calls only: packed inputs take no mask or bias)
        mask = as_4d(mask).expand(scores_shape(q, k))
    if bias is not None:  # read in float32 or q's dtype (checks.py allows no other), as it is
        bias = as_4d(bias).expand(scores_shape(q, k))
    if cu_seqlens_q is not None:  # read as contiguous int32 rows
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    return (opts.scale, opts.left, opts.right, opts.bottom_right, opts.softcap, extras.alibi_slopes, mask, bias,
            extras.dropout_seed, opts.dropout_p, cu_seqlens_q, cu_seqlens_k)
