"""Checks of what Triton's interpreter lets pass but a GPU would not: every address an
interpreted kernel loads, stores or updates atomically lies inside the tensors it was given, and no
two programs of one launch race on an address.

The interpreter reads and writes host memory wherever a pointer points, so an access that the GPU
would make out of bounds (a missing or wrong mask) passes on the CPU unnoticed (FACTS.md) and can
fault, or read garbage such as a NaN that 0 * NaN then spreads, on the GPU. It also runs a launch's
programs one after another, so a program reading what another writes, or two writing one address,
give the same answer every time there and an order-dependent one on the GPU. With `install()`
such an access fails the launch with `OutOfBounds` or `Race`, naming the kernel, the tensor and
the programs. conftest.py installs it for every test when the kernels are interpreted.

A tensor argument's bounds are its own elements (storage offset to its last element by its
strides), not its whole storage: a view's neighbours in the storage belong to someone else.
Atomic updates by several programs are no race, but a plain access to what another program
updates atomically is. Tensor-descriptor (TMA) loads are checked where the interpreter turns them
into masked loads (Triton 3.9 does).
"""
import numpy as np
import torch
from triton.runtime import interpreter


class OutOfBounds(AssertionError):
    pass


class Race(AssertionError):
    pass


LOAD, STORE, ATOMIC = 0, 1, 2  # ordered: an address's largest kind >= STORE means it is written
KINDS = ("load", "store", "atomic update")


class _Launch:
    """The memory one launch may touch (the union of its tensor arguments' extents), and what each
    of its programs touched."""

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
        self.grid = (1, 1, 1)
        self.program = 0
        self.touched = []  # (first byte addresses, program, kind) per access

    def enter_program(self, x, y, z, grid):
        self.grid = grid
        self.program = x + grid[0] * (y + grid[1] * z)

    def access(self, kind, ptrs, mask):
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
                f"{self.kernel}: {KINDS[kind]} of {bad.size} element(s) outside "
                f"every tensor argument, first at {int(bad[0]):#x}, by program {self._program_name(self.program)}; "
                f"{self._nearest(int(bad[0]))}")
        self.touched.append((addresses, self.program, kind))

    def check_races(self):
        """Raises Race if an address was written (or updated atomically) by one program and read,
        written or plainly updated by another."""
        if not self.touched:
            return
        addresses = np.concatenate([a for a, _, _ in self.touched])
        programs = np.concatenate([np.full(a.size, p, dtype=np.int64) for a, p, _ in self.touched])
        kinds = np.concatenate([np.full(a.size, k, dtype=np.int8) for a, _, k in self.touched])
        order = np.lexsort((programs, addresses))
        addresses, programs, kinds = addresses[order], programs[order], kinds[order]
        starts = np.flatnonzero(np.r_[True, addresses[1:] != addresses[:-1]])
        shared = np.minimum.reduceat(programs, starts) != np.maximum.reduceat(programs, starts)
        written = np.maximum.reduceat(kinds, starts) >= STORE
        only_atomic = np.minimum.reduceat(kinds, starts) == ATOMIC
        racy = np.flatnonzero(shared & written & ~only_atomic)
        if racy.size:
            first, end = np.r_[starts, addresses.size][[racy[0], racy[0] + 1]]
            address = int(addresses[first])
            who = sorted({(self._program_name(int(p)), KINDS[k]) for p, k in zip(programs[first:end], kinds[first:end])})
            raise Race(f"{self.kernel}: {racy.size} address(es) that one program writes and another "
                       f"accesses in the same launch, first {address:#x} in {self._owner(address)}: "
                       + ", ".join(f"program {p} {k}" for p, k in who[:4]))

    def _program_name(self, program):
        gx, gy, _ = self.grid
        return str((program % gx, program // gx % gy, program // (gx * gy)))

    def _owner(self, address):
        return next((name for name, start, end in self.tensors if start <= address < end), "?")

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
    elif isinstance(getattr(value, "base", None), torch.Tensor):  # a tensor descriptor (TMA)
        yield name, value.base
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
            result = original(self, *args, **kwargs)
            if len(_launches) > depth:
                _launches[depth].check_races()
            return result
        finally:
            del _launches[depth:]
    return call


def _checked_grid_idx(original):
    def set_grid_idx(self, x, y, z):
        original(self, x, y, z)
        if _launches:
            _launches[-1].enter_program(x, y, z, tuple(self.grid_dim))
    return set_grid_idx


def _checked(original, kind, ptr_at, mask_at):
    def method(self, *args, **kwargs):
        if _launches:
            _launches[-1].access(kind, args[ptr_at], None if mask_at is None else args[mask_at])
        return original(self, *args, **kwargs)
    return method


def install():
    """Check every interpreted launch from now on (idempotent)."""
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    if getattr(executor, "_checked", False):
        return
    executor._init_args_hst = _checked_init_args(executor._init_args_hst)
    executor.__call__ = _checked_call(executor.__call__)
    builder.set_grid_idx = _checked_grid_idx(builder.set_grid_idx)
    builder.create_masked_load = _checked(builder.create_masked_load, LOAD, 0, 1)
    builder.create_masked_store = _checked(builder.create_masked_store, STORE, 0, 2)
    builder.create_atomic_rmw = _checked(builder.create_atomic_rmw, ATOMIC, 1, 3)
    builder.create_atomic_cas = _checked(builder.create_atomic_cas, ATOMIC, 0, None)
    executor._checked = True
