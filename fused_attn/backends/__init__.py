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

# Each backend finds out here, once, whether it can run on this machine (loading the C++ extension,
# reading its build note): dispatch asks on every call, also while torch.compile traces one, where
# loading a module or reading a file would break the graph.
for _backend in BACKENDS.values():
    _backend.unavailable_reason()


def get_backend(name: str) -> Backend:
    """The registered backend called `name` (KeyError if there is none)."""
    return BACKENDS[name]
