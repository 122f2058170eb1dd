"""Backends in one registry, by name. Dispatch order lives in dispatch.py."""
from __future__ import annotations

from .base import Backend
from .reference import ReferenceBackend
from .triton_backend import TritonBackend

BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (TritonBackend(), ReferenceBackend())}


def get_backend(name: str) -> Backend:
    return BACKENDS[name]
