"""Test set-up shared by every test file.

Without a GPU the Triton kernels run through Triton's interpreter, which must be switched on
before the kernels are imported (FACTS.md). Every kernel output starts as NaN, so an element a
kernel forgets to write fails the accuracy checks. Interpreted kernels are bounds- and race-checked
(interpreter_checks.py): an access outside the tensors a kernel was given, or one program of a
launch touching what another writes, fails its test, as either could go wrong on the GPU.
"""
import os
from typing import NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FUSED_ATTN_POISON_OUTPUTS"] = "1"
os.environ.pop("FUSED_ATTN_BACKEND", None)

import pytest  # noqa: E402

import fused_attn  # noqa: E402

from fused_attn.dispatch import refusal_reasons  # noqa: E402
from fused_attn.options import AttentionOptions, AttentionTensors  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    import interpreter_checks  # noqa: E402

    interpreter_checks.install()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _serving(probe=None, extras=AttentionTensors(), opts=AttentionOptions(), kvcache=False):
    """The available backends that serve a call like the probe on DEVICE (the `cpu` backend takes
    no CUDA tensors; not every backend has every feature: those say so and dispatch moves on,
    which tests/test_dispatch.py checks). The probe needs gradients, as the tests' calls do."""
    probe = torch.zeros(1, 1, 1, 8, device=DEVICE, requires_grad=not kvcache) if probe is None else probe
    return [name for name in fused_attn.available_backends()
            if not refusal_reasons(name, probe, probe, probe, extras, opts, kvcache)]


_probe = torch.zeros(1, 1, 1, 8, device=DEVICE, requires_grad=True)
_cu_seqlens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
# Every test taking one of these fixtures runs once per backend that serves what it tests.
BACKENDS = _serving()
VARIANT_BACKENDS = _serving(
    extras=AttentionTensors(bias=_probe, alibi_slopes=_probe[0, 0, 0, :1]),
    opts=AttentionOptions(window_left=2, window_right=2, softcap=1.0, dropout_p=0.1),
)
VARLEN_BACKENDS = _serving(_probe[0], AttentionTensors(cu_seqlens_q=_cu_seqlens, cu_seqlens_k=_cu_seqlens))
KVCACHE_BACKENDS = _serving(kvcache=True)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=VARIANT_BACKENDS)
def variant_backend(request):
    return request.param


@pytest.fixture(params=VARLEN_BACKENDS)
def varlen_backend(request):
    return request.param


@pytest.fixture(params=KVCACHE_BACKENDS)
def kvcache_backend(request):
    return request.param


@pytest.fixture(autouse=True)
def fresh_seed():
    """A different seed per test run keeps inputs fresh; it is printed when a test fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")  # shown with a failure's captured output
    yield seed


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch):
    """No plan (fused_attn/plans.py) from an earlier test: tests that change what dispatch sees
    (backends registered or made unavailable, warnings reset) start from the checks."""
    from fused_attn import plans

    monkeypatch.setattr(plans, "_plans", {})


# --- the cuda backend: on the CPU emulator (tests/cuda_emulator/), and natively where it runs ----

CUDA_EMULATED = "cuda_emulated"


class Target(NamedTuple):
    """A backend name for fused_attn.attention and the device of its tensors."""
    name: str
    device: torch.device


@pytest.fixture(scope="session")
def emulated_ops():
    """The CUDA kernels and their binding compiled for the emulator (torch.ops.fused_attn_emulated)."""
    from cuda_emulator.build import load_emulated_ops

    return load_emulated_ops()


@pytest.fixture
def emulated(emulated_ops, monkeypatch):
    """The cuda backend class on the emulated ops and CPU tensors, registered for this test."""
    from fused_attn.backends import BACKENDS
    from fused_attn.backends.cuda_backend import CudaBackend

    backend = CudaBackend(CUDA_EMULATED, ops=lambda: emulated_ops, device_type="cpu", availability=lambda: None,
                          stream=lambda device: 0)
    monkeypatch.setitem(BACKENDS, CUDA_EMULATED, backend)
    return Target(CUDA_EMULATED, torch.device("cpu"))


CUDA_NATIVE = [] if fused_attn.backends.BACKENDS["cuda"].unavailable_reason() is not None else ["native"]


@pytest.fixture(params=["emulated"] + CUDA_NATIVE)
def cuda(request):
    """The emulated cuda backend, and the real one on CUDA tensors where it is available."""
    if request.param == "native":
        return Target("cuda", torch.device("cuda"))
    return request.getfixturevalue("emulated")
