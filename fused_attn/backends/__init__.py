"""Backends in one registry, by name. Dispatch order lives in dispatch.py."""
from __future__ import annotations

from .base import Backend
from .cpu_backend import CpuBackend
from .cuda_backend import CudaBackend
from .reference import ReferenceBackend
from .triton_backend import TritonBackend

BACKENDS: dict[str, Backend] = {
    backend.name: backend for backend in (TritonBackend(), CudaBackend(), CpuBackend(), ReferenceBackend())
}


def get_backend(name: str) -> Backend:
    """The registered backend called `name` (KeyError if there is none)."""
    return BACKENDS[name]
