"""Checks of tensor contents (varlen's cu_seqlens, a KV cache's lengths and pages): when they run.

Reading a GPU tensor's values on the host waits for all queued GPU work (a sync), so that the host
can no longer run ahead of the GPU; while a CUDA graph is captured a sync is an error, and while
torch.compile traces it breaks the graph. So these checks:
  * are skipped while torch.compile traces or a CUDA graph is captured, and for GPU tensors when
    FUSED_ATTN_HOST_CHECKS=0: the kernels then judge what they read (never out of bounds; a KV-cache
    sequence outside its cache, or invalid cu_seqlens, give NaN rows; the cpu backend's ops check
    the values and raise);
  * run once per GPU tensor and version: the layers of a model pass one cu_seqlens, cache_seqlens
    or block_table each step, and only the first call of the step reads it. Any in-place change
    made through torch (``cache_seqlens += 1``, ``table[b, i] = page``) bumps the tensor's version
    counter, and the next call checks it again. Writes that bypass torch (a custom kernel's, or
    through ``.data``) are not seen: pass a new tensor after such writes.
  * Tensors made under torch.inference_mode have no version counter, so an in-place change to one
    cannot be seen. Where the caller guards values the host has not verified (`guarded`: the
    triton and cuda KV-cache kernels judge lengths and pages as they read them; varlen judges
    cu_seqlens on the device after the call), such a tensor is checked the first time it is seen
    and guarded after that; elsewhere it is checked on every call.
CPU tensors are read without a sync and checked on every call; meta tensors and FakeTensors have no
values to check.
"""
from __future__ import annotations

import os
import weakref
from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

VARIABLE = "FUSED_ATTN_HOST_CHECKS"


def skipped(device: torch.device) -> bool:
    """Whether checks reading values on `device` are skipped (see the module docstring)."""
    if torch.compiler.is_compiling() or device.type == "meta":  # meta tensors have shapes, no values
        return True
    return device.type == "cuda" and (torch.cuda.is_current_stream_capturing() or os.environ.get(VARIABLE) == "0")


def read(t: torch.Tensor) -> list:
    """t's values on the host (a sync for a GPU tensor): the one place the checks read them."""
    return t.tolist()


# check facts + ids of the checked tensors -> weak references to them and their versions then.
_passed: dict[tuple, tuple] = {}
_MAX_REMEMBERED = 64


def check_once(check: Callable[[], None], device: torch.device, facts: tuple, *tensors,
               guarded: bool = False) -> bool:
    """Run `check` (which reads `tensors` through `read` and raises on bad values), unless checks on
    `device` are skipped, or the same tensors (None allowed), unchanged since, passed it with the
    same `facts` (what else it depended on: totals, capacities...). guarded: the caller guards
    values this has not verified, so a tensor without a version counter may be remembered too
    (see the module docstring). Returns whether the values are verified: checked now, or the
    same versions of the tensors checked before."""
    if skipped(device) or _without_values(tensors):
        return False
    if not _remembered(tensors, guarded):
        check()
        return True
    key = (facts, *map(id, tensors))
    if _unchanged(_passed.get(key), tensors):
        return all(t is None or not t.is_inference() for t in tensors)
    check()
    if len(_passed) >= _MAX_REMEMBERED:
        _passed.clear()
    _passed[key] = tuple((None, 0) if t is None else (weakref.ref(t), _version(t)) for t in tensors)
    return True


def _without_values(tensors) -> bool:
    """Whether any of the tensors is a FakeTensor (FakeTensorMode: shapes, devices, no values, as
    meta tensors)."""
    for t in tensors:  # (a plain loop, exact types first: this runs on every call)
        if t is not None and type(t) is not torch.Tensor and is_fake(t):
            return True
    return False


def _remembered(tensors, guarded: bool) -> bool:
    """Whether a check of these tensors is remembered: where reading their values costs a sync,
    and each has a version counter (tensors made under torch.inference_mode have none) or the
    caller guards values not verified."""
    sync = False
    for t in tensors:  # (a plain loop: this runs on every call)
        if t is not None:
            if t.is_inference() and not guarded:
                return False
            sync = sync or costs_a_sync(t)
    return sync


def costs_a_sync(t: torch.Tensor) -> bool:
    """Whether reading t's values on the host waits for the device."""
    return t.device.type != "cpu"


def _version(t: torch.Tensor) -> Optional[int]:
    """t's version counter, None for an inference tensor (it has none)."""
    return None if t.is_inference() else t._version


def _unchanged(entry, tensors) -> bool:
    """Whether `tensors` are the very tensors of a remembered entry, at the same versions."""
    return entry is not None and all(
        (t is None and ref is None) or (ref is not None and ref() is t and _version(t) == version)
        for t, (ref, version) in zip(tensors, entry))
