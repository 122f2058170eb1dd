"""Choosing a backend for a call: the first in the device's preference order that can serve it.

`backend=` or the FUSED_ATTN_BACKEND environment variable force one; a forced backend that cannot
serve the call raises with its reasons. Automatic choice falls back silently past backends that
cannot run on this machine, and warns once when an installed backend refuses a call.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from .backends import BACKENDS
from .options import AttentionOptions, AttentionTensors

ENV_VARIABLE = "FUSED_ATTN_BACKEND"

# Fastest first. Names not (yet) registered are skipped.
PREFERENCE = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "triton", "reference"),
}
DEFAULT_PREFERENCE = ("reference",)


class BackendError(RuntimeError):
    """No backend (or not the forced one) can serve a call; the message lists every reason."""


_warned: set[tuple[str, str]] = set()


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in registration order."""
    return [name for name, backend in BACKENDS.items() if backend.unavailable_reason() is None]


def refusal_reasons(name: str, q, k, v, extras: AttentionTensors, opts: AttentionOptions,
                    kvcache: bool = False) -> list[str]:
    """Why backend `name` cannot serve this call (a KV-cache decoding call if kvcache); empty when it can."""
    backend = BACKENDS[name]
    unavailable = backend.unavailable_reason()
    if unavailable is not None:
        return [f"not available: {unavailable}"]
    reasons = backend.unsupported_reasons(q, k, v, extras, opts, kvcache)
    if kvcache and not backend.supports_kvcache:
        reasons.append("no KV-cache decoding")
    return reasons


def _requested(backend: Optional[str]) -> Optional[str]:
    if backend is None:
        backend = os.environ.get(ENV_VARIABLE) or None
        check_backend_name(backend, f"the {ENV_VARIABLE} environment variable")
    else:
        check_backend_name(backend)
    return backend


def check_backend_name(backend: Optional[str], source: str = "backend") -> None:
    """A backend's name, or None (automatic), else ValueError naming `source`."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {sorted(BACKENDS)} or None, got {backend!r}")


def preference(device: torch.device) -> list[str]:
    order = PREFERENCE.get(device.type, DEFAULT_PREFERENCE)
    return [name for name in order if name in BACKENDS]


def select_backend(q, k, v, extras: AttentionTensors, opts: AttentionOptions, backend: Optional[str] = None,
                   warn: bool = True, kvcache: bool = False) -> str:
    """The name of the backend that will run this call (see module docstring)."""
    forced = _requested(backend)
    if forced is not None:
        reasons = refusal_reasons(forced, q, k, v, extras, opts, kvcache)
        if reasons:
            raise BackendError(f"backend {forced!r} cannot serve this call: " + "; ".join(reasons))
        return forced
    refused: list[str] = []
    for name in preference(q.device):
        reasons = refusal_reasons(name, q, k, v, extras, opts, kvcache)
        if not reasons:
            if warn:
                _warn_fallback(name, refused)
            return name
        if BACKENDS[name].unavailable_reason() is None:
            refused.append(f"{name} ({'; '.join(reasons)})")
    raise BackendError("no backend can serve this call: " + ", ".join(refused))


def _warn_fallback(chosen: str, refused: list[str]) -> None:
    if not refused:
        return
    key = (chosen, " ".join(refused))
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fused_attn: using the {chosen!r} backend because " + ", ".join(refused) + " refused",
                      stacklevel=5)  # the caller of the entry point (through its _plan)


def explain_choice(q, k, v, extras: AttentionTensors, opts: AttentionOptions, backend: Optional[str] = None) -> str:
    """A report: the backend that would run, and for every other backend why it would not."""
    try:
        chosen = select_backend(q, k, v, extras, opts, backend, warn=False)
    except BackendError as error:
        chosen, header = None, f"no backend runs: {error}"
    else:
        header = f"would run: {chosen}"
    lines = [header]
    if chosen is None:
        path = None
    elif q.is_meta:  # ops.needs_the_op
        path = "on meta tensors no kernel runs: the op's fake implementation gives the outputs' shapes"
    else:
        path = BACKENDS[chosen].path(q, k, v, extras, opts)
    if path is not None:
        lines.append(f"  {path}")
    forced = _requested(backend)
    order = preference(q.device)
    for name in order + [n for n in BACKENDS if n not in order]:
        if name == chosen:
            continue
        reasons = refusal_reasons(name, q, k, v, extras, opts)
        if reasons:
            why = "; ".join(reasons)
        elif forced is not None:
            why = f"could serve it, but {forced!r} is forced"
        elif name in order:
            why = "could serve it, but comes later in the order"
        else:
            why = f"could serve it, but is not tried for {q.device.type} tensors unless forced"
        lines.append(f"  {name}: {why}")
    return "\n".join(lines)
