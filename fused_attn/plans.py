"""Validated calls, remembered: a call like an earlier one skips its checks and backend choice.

A model calls attention with the same shapes, dtypes and keywords in every layer and step, and
what the checks (checks.py) and the backend choice (dispatch.py) conclude depends on nothing else;
in Python they cost ~20 us a call, more than a small call's kernels. So each entry point keys a
call by all of that (`signature`) and keeps, for the next call with the key, what a call that
passed concluded (its AttentionOptions and backend name, `remember`). The key holds:
  * each tensor's shape, dtype, device, requires_grad and layout (None for an absent one; no
    check or backend looks at strides);
  * every other argument with its type, so that a value that fails a check (causal=1, a window of
    floats) never finds the plan of an equal one that passed (True, ints);
  * the FUSED_ATTN_BACKEND variable, which dispatch reads on every call.
The SDPA drop-in (sdpa.py) keeps, inside its own plan, the plan of the `attention` call it
rewrites a call into, so its calls take one lookup, not two.
Checks of tensor contents (cu_seqlens, cache_seqlens, block tables) are not part of a plan: they
run as host_checks.py says, plan or not. A call that fails its checks keeps nothing, so bad input
always raises. Nothing is kept while torch.compile, torch.jit.trace or torch.func transforms
trace, nor for tensor subclasses or arguments of other types (a 0-d tensor as a scale, an int
cache_seqlens): such calls take the checks every time.
"""
from __future__ import annotations

import os
from typing import Optional, TypeVar

from .dispatch import ENV_VARIABLE
from .ops import PLAIN_TENSORS, being_traced

Plan = TypeVar("Plan")

# Arguments other than tensors are kept in keys when they are of these types (or tuples of them).
_KEYABLE = frozenset((bool, int, float, str, type(None)))
_KEYABLE_OR_TUPLE = _KEYABLE | {tuple}
_plans: dict[tuple, object] = {}
_MAX_PLANS = 256


def signature(entry_point: str, tensors: tuple, arguments: tuple) -> Optional[tuple]:
    """The key of a call of `entry_point` with these tensor arguments (None for absent ones) and
    other arguments, or None when its plan must not be kept (see the module docstring)."""
    if being_traced():
        return None
    key: list = [entry_point, os.environ.get(ENV_VARIABLE)]
    for t in tensors:  # (plain loops: this runs on every call)
        if t is None:
            key.append(None)
        elif type(t) in PLAIN_TENSORS:
            try:
                key.append((t.shape, t.dtype, t.device, t.requires_grad, t.layout))
            except RuntimeError:  # a nested tensor has no shape: the checks refuse it
                return None
        else:  # a tensor subclass, or not a tensor at all: the checks judge it
            return None
    # Each argument with its type: a tensor (its value may change in place), a NumPy number or a
    # list keeps no plan; a tuple is kept with its items' types.
    kinds = tuple(map(type, arguments))
    if not _KEYABLE_OR_TUPLE.issuperset(kinds):
        return None
    key += (kinds, arguments)
    if tuple in kinds:
        for value in arguments:
            if type(value) is tuple:
                items = tuple(map(type, value))
                if not _KEYABLE.issuperset(items):
                    return None
                key.append(items)
    return tuple(key)


def recall(key: Optional[tuple]):
    """The plan kept for this key, or None."""
    return None if key is None else _plans.get(key)


def remember(key: Optional[tuple], plan: Plan) -> Plan:
    """Keep `plan` (what a call with this key concluded after passing its checks) and return it."""
    if key is not None:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = plan
    return plan
