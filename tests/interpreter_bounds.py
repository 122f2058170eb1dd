"""Bounds checking for Triton's interpreter: every address an interpreted kernel loads, stores or
updates atomically must lie inside one of the tensors it was given.

The interpreter reads and writes host memory wherever a pointer points, so an access that the GPU
would make out of bounds (a missing or wrong mask) passes on the CPU unnoticed (FACTS.md) and can
fault, or read garbage such as a NaN that 0 * NaN then spreads, on the GPU. With `install()` such
an access fails the kernel with `OutOfBounds`, naming the kernel, the access and the arguments
nearest to the address. conftest.py installs it for every test when the kernels are interpreted.

A tensor argument's bounds are its own elements (storage offset to its last element by its
strides), not its whole storage: a view's neighbours in the storage belong to someone else.
Tensor-descriptor (TMA) loads clip to their descriptor's shape themselves and are not checked.
"""
import numpy as np
import torch
from triton.runtime import interpreter


class OutOfBounds(AssertionError):
    pass


class _Launch:
    """The memory one kernel launch may touch: the union of its tensor arguments' extents."""

    def __init__(self, kernel, named_tensors):
        self.kernel = kernel
        self.tensors = [(name, *_extent(t)) for name, t in named_tensors if t.numel() > 0]
        spans = sorted((start, end) for _, start, end in self.tensors)
        merged = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = np.array([s for s, _ in merged], dtype=np.uint64)
        self.ends = np.array([e for _, e in merged], dtype=np.uint64)

    def check(self, access, ptrs, mask):
        addresses = np.asarray(ptrs.data, dtype=np.uint64)
        if mask is not None:
            addresses, active = np.broadcast_arrays(addresses, np.asarray(mask.data, dtype=bool))
            addresses = addresses[active]
        addresses = addresses.ravel()
        if addresses.size == 0:
            return
        size = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
        region = np.searchsorted(self.starts, addresses, side="right") - 1
        inside = region >= 0
        inside[inside] = addresses[inside] + size <= self.ends[region[inside]]
        if not inside.all():
            bad = addresses[~inside]
            raise OutOfBounds(
                f"{self.kernel}: {access} of {bad.size} element(s) outside every tensor argument, "
                f"first at {int(bad[0]):#x}; {self._nearest(int(bad[0]))}")

    def _nearest(self, address):
        def distance(tensor):
            _, start, end = tensor
            return start - address if address < start else address - end + 1
        named = sorted(self.tensors, key=distance)[:2]
        return "nearest: " + ", ".join(f"{name} [{start:#x}, {end:#x})" for name, start, end in named)


def _extent(t):
    """[first byte, past the last byte) of a tensor's own elements (strides are never negative)."""
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (span + 1) * t.element_size()


def _tensors(value, name):
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{name}[{i}]")


_launches = []  # the launch running now (kernels do not nest; a list, so that a crash unwinds it)


def _checked_init_args(original):
    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = original(self, args_dev, kwargs)
        named = [pair for name, arg in zip(self.arg_names, args_hst) for pair in _tensors(arg, name)]
        named += [pair for name, arg in kwargs_hst.items() for pair in _tensors(arg, name)]
        _launches.append(_Launch(getattr(self.fn, "__name__", "kernel"), named))
        return args_hst, kwargs_hst
    return init_args_hst


def _checked_call(original):
    def call(self, *args, **kwargs):
        depth = len(_launches)
        try:
            return original(self, *args, **kwargs)
        finally:
            del _launches[depth:]
    return call


def _checked(original, access, ptr_at, mask_at):
    def method(self, *args):
        if _launches:
            _launches[-1].check(access, args[ptr_at], None if mask_at is None else args[mask_at])
        return original(self, *args)
    return method


def install():
    """Check every interpreted launch from now on (idempotent)."""
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    if getattr(executor, "_bounds_checked", False):
        return
    executor._init_args_hst = _checked_init_args(executor._init_args_hst)
    executor.__call__ = _checked_call(executor.__call__)
    builder.create_masked_load = _checked(builder.create_masked_load, "load", 0, 1)
    builder.create_masked_store = _checked(builder.create_masked_store, "store", 0, 2)
    builder.create_atomic_rmw = _checked(builder.create_atomic_rmw, "atomic update", 1, 3)
    builder.create_atomic_cas = _checked(builder.create_atomic_cas, "atomic compare-and-swap", 0, None)
    executor._bounds_checked = True
